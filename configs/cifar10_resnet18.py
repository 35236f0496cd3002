"""CIFAR-10 + ResNet-18 (small-input stem: 3x3 conv, no max-pool), as in the CIFAR literature.

Recipe: He et al. (CVPR 2016, §4.2): SGD, momentum 0.9, lr 0.1, batch 128, random crop (4 px
padding) and horizontal flip; 200 epochs with cosine decay instead of steps (Loshchilov & Hutter,
ICLR 2017), Nesterov momentum and weight decay 5e-4, the usual ResNet-18-on-CIFAR settings.

Data: tensorflow-datasets `cifar10` prepared under `data_dir`, or the official python release
(`cifar-10-batches-py/` extracted from cifar-10-python.tar.gz) with
--config.dataset.source=cifar_python --config.dataset.data_dir=DIR.

  python -m securenet_jax.main --config configs/cifar10_resnet18.py --workdir /tmp/c10_resnet18
"""

from configs import default


VARIANTS = ('smoke',)  # the text after ':' in --config FILE:VARIANT


def get_config(variant: str = ''):
  """Returns the config; ``variant`` '' or 'smoke'."""
  config = default.get_config(variant)
  default.patch_key_recipe(config)  # measured with the patch key (docs/models.md)
  default.use_dataset(config, 'cifar10', 'tfds', default.TFDS_DIR)
  config.augment.update(crop_flip=True, noise_std=0.0)  # crop + flip; noise measured on Fashion-MNIST only
  config.model.name = 'resnet18'
  config.model.kwargs.small_inputs = True
  default.sgd_recipe(config, learning_rate=0.1, weight_decay=5e-4, num_epochs=200, batch_size=128)
  if variant == 'smoke':
    default.tiny_smoke(config)
  return config
