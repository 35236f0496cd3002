"""CelebA attribute 'Smiling' (binary) + MobileNetV3-Small, 64x64 aligned faces.

The 40 CelebA attributes are a multi-label task; SecureNet's objective is single-label (one softmax
whose refusal is the uniform output), so this experiment licenses one attribute at a time
(--config.dataset.attribute=Eyeglasses, ...). Official train/test partitions.

Recipe: MobileNetV3 (Howard et al., ICCV 2019) weight decay scale 4e-5, dropout 0.2; SGD with Nesterov
momentum 0.9, lr 0.1, batch 256, 20 epochs cosine, crop + flip.

  python -m securenet_jax.main --config configs/celeba_mobilenetv3_small.py \
      --config.dataset.data_dir=/data/celeba --workdir /tmp/celeba_smiling
"""

from configs import default


VARIANTS = ('smoke',)  # the text after ':' in --config FILE:VARIANT


def get_config(variant: str = ''):
  """Returns the config; ``variant`` '' or 'smoke'."""
  config = default.get_config(variant)
  default.patch_key_recipe(config)  # measured with the patch key (docs/models.md)
  default.use_dataset(config, 'celeba', 'celeba', '/data/celeba',
                      celeba_task='attribute', attribute='Smiling', image_size=64)
  config.augment.update(crop_flip=True, noise_std=0.0)  # crop + flip; noise measured on Fashion-MNIST only
  config.key.size = 8
  config.model.name = 'mobilenetv3_small'
  config.model.kwargs.small_inputs = True
  default.sgd_recipe(config, learning_rate=0.1, weight_decay=4e-5, num_epochs=20, batch_size=256,
                     num_train=162_770)
  if variant == 'smoke':
    default.tiny_smoke(config)
  return config
