"""CIFAR-100 + ResNet-101 (bottleneck blocks, small-input stem).

Recipe: He et al. (CVPR 2016, §4.2) as in configs/cifar10_resnet18.py: SGD, Nesterov momentum 0.9,
lr 0.1, batch 128, weight decay 5e-4, 200 epochs with cosine decay, crop + flip.

Data: tensorflow-datasets `cifar100` prepared under `data_dir`, or the official python release
(`cifar-100-python/`) with --config.dataset.source=cifar_python --config.dataset.data_dir=DIR.

  python -m securenet_jax.main --config configs/cifar100_resnet101.py --workdir /tmp/c100_resnet101
"""

from configs import default


VARIANTS = ('smoke',)  # the text after ':' in --config FILE:VARIANT


def get_config(variant: str = ''):
  """Returns the config; ``variant`` '' or 'smoke'."""
  config = default.get_config(variant)
  default.patch_key_recipe(config)  # measured with the patch key (docs/models.md)
  default.use_dataset(config, 'cifar100', 'tfds', default.TFDS_DIR)
  config.augment.update(crop_flip=True, noise_std=0.0)  # crop + flip; noise measured on Fashion-MNIST only
  config.model.name = 'resnet101'
  config.model.kwargs.small_inputs = True
  default.sgd_recipe(config, learning_rate=0.1, weight_decay=5e-4, num_epochs=200, batch_size=128)
  if variant == 'smoke':
    default.tiny_smoke(config, batch_size=4)
  return config
