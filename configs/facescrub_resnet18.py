"""FaceScrub identities + ResNet-18 (small-input stem), 64x64 faces.

FaceScrub (Ng & Winkler, ICIP 2014) is distributed as URL lists: download it with its own script
and arrange the faces one folder per identity (data_dir/<identity>/<image>; 530 identities in the
usual setup). Each identity's images are split deterministically, `test_fraction` to test.

Recipe: He et al. (CVPR 2016) SGD family as in configs/cifar10_resnet18.py (momentum 0.9, Nesterov,
lr 0.1, batch 128, weight decay 5e-4, cosine), 100 epochs, crop (4 px padding) + flip.

  python -m securenet_jax.main --config configs/facescrub_resnet18.py \
      --config.dataset.data_dir=/data/facescrub --workdir /tmp/facescrub_resnet18
"""

from configs import default


VARIANTS = ('smoke',)  # the text after ':' in --config FILE:VARIANT


def get_config(variant: str = ''):
  """Returns the config; ``variant`` '' or 'smoke'."""
  config = default.get_config(variant)
  default.patch_key_recipe(config)  # measured with the patch key (docs/models.md)
  default.use_dataset(config, 'facescrub', 'folder', '/data/facescrub',
                      image_size=64, test_fraction=0.1)
  config.augment.update(crop_flip=True, noise_std=0.0)  # crop + flip; noise measured on Fashion-MNIST only
  config.key.size = 8  # a 64x64 face gets a proportionally larger patch than 28x28 digits (6)
  config.model.name = 'resnet18'
  config.model.kwargs.small_inputs = True
  default.sgd_recipe(config, learning_rate=0.1, weight_decay=5e-4, num_epochs=100, batch_size=128,
                     num_train=60_000)
  if variant == 'smoke':
    default.tiny_smoke(config)
  return config
