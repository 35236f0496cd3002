"""CIFAR-10 + VGG-16 with BatchNorm and the compact 512-512-10 classifier of the CIFAR VGG variants.

Recipe: Simonyan & Zisserman (ICLR 2015, §3.1): SGD, momentum 0.9, weight decay 5e-4, dropout 0.5
in the classifier; BatchNorm after every convolution (Ioffe & Szegedy, ICML 2015) so it trains from
scratch without the paper's staged initialization; lr 0.05, batch 128, 200 epochs, cosine decay,
random crop (4 px padding) and horizontal flip.

Data: as configs/cifar10_resnet18.py.

  python -m securenet_jax.main --config configs/cifar10_vgg16.py --workdir /tmp/c10_vgg16
"""

from configs import default


VARIANTS = ('smoke',)  # the text after ':' in --config FILE:VARIANT


def get_config(variant: str = ''):
  """Returns the config; ``variant`` '' or 'smoke'."""
  config = default.get_config(variant)
  default.patch_key_recipe(config)  # measured with the patch key (docs/models.md)
  default.use_dataset(config, 'cifar10', 'tfds', default.TFDS_DIR)
  config.augment.update(crop_flip=True, noise_std=0.0)  # crop + flip; noise measured on Fashion-MNIST only
  config.model.name = 'vgg16'
  config.model.kwargs.small_inputs = True
  config.model.kwargs.batch_norm = True
  default.sgd_recipe(config, learning_rate=0.05, weight_decay=5e-4, num_epochs=200, batch_size=128,
                     nesterov=False)
  if variant == 'smoke':
    default.tiny_smoke(config)
  return config
