"""CIFAR-100 + MobileNetV3-Large (small-input stem: stride-1 first conv).

Recipe: Howard et al. (ICCV 2019, §6.1) train on ImageNet with RMSProp, batch 4096 and weight decay
1e-5 on TPU pods; for 32x32 images we keep its weight decay scale (4e-5, the MobileNet family's
usual value) and dropout 0.2 before the classifier, with SGD (Nesterov momentum 0.9), lr 0.1,
batch 128, 200 epochs cosine, crop + flip as in the CIFAR literature. Data: as
configs/cifar100_resnet101.py. configs/celeba_mobilenetv3_small.py uses the Small variant.

  python -m securenet_jax.main --config configs/cifar100_mobilenetv3.py --workdir /tmp/c100_mnv3
"""

from configs import default


VARIANTS = ('smoke',)  # the text after ':' in --config FILE:VARIANT


def get_config(variant: str = ''):
  """Returns the config; ``variant`` '' or 'smoke'."""
  config = default.get_config(variant)
  default.patch_key_recipe(config)  # measured with the patch key (docs/models.md)
  default.use_dataset(config, 'cifar100', 'tfds', default.TFDS_DIR)
  config.augment.update(crop_flip=True, noise_std=0.0)  # crop + flip; noise measured on Fashion-MNIST only
  config.model.name = 'mobilenetv3_large'
  config.model.kwargs.small_inputs = True
  default.sgd_recipe(config, learning_rate=0.1, weight_decay=4e-5, num_epochs=200, batch_size=128)
  if variant == 'smoke':
    default.tiny_smoke(config)
  return config
