"""CelebA identities (the 1000 most frequent) + NFNet-F5, 64x64 aligned faces.

Data: the official release in `data_dir`: img_align_celeba/, identity_CelebA.txt,
list_attr_celeba.txt, list_eval_partition.txt (Liu et al., ICCV 2015). Decoded faces are cached.

Recipe: Brock et al. (ICML 2021, §4 and Table 2 / Appendix): SGD with Nesterov momentum 0.9, weight
decay 2e-5, adaptive gradient clipping at 0.01 (classifier excluded), dropout 0.5 and stochastic
depth 0.1 for F5, warmup then cosine decay; their lr 0.1 x batch/256 at batch 4096 scaled to our
batch 256 (lr 0.1). NFNet-F5 has about 377M parameters: this is a GPU/TPU job
(--config.model.kwargs.dtype=bfloat16 halves its activation memory).

  python -m securenet_jax.main --config configs/celeba_nfnet_f5.py \
      --config.dataset.data_dir=/data/celeba --workdir /tmp/celeba_nfnet_f5
"""

from configs import default


VARIANTS = ('smoke',)  # the text after ':' in --config FILE:VARIANT


def get_config(variant: str = ''):
  """Returns the config; ``variant`` '' or 'smoke' (a reduced-width F0: the same code, CPU-sized)."""
  config = default.get_config(variant)
  default.patch_key_recipe(config)  # measured with the patch key (docs/models.md)
  default.use_dataset(config, 'celeba', 'celeba', '/data/celeba',
                      celeba_task='identity', num_identities=1000, image_size=64)
  config.augment.update(crop_flip=True, noise_std=0.0)  # crop + flip; noise measured on Fashion-MNIST only
  config.key.size = 8
  config.model.name = 'nfnet_f5'
  config.model.kwargs.small_inputs = True
  config.model.kwargs.dropout_rate = 0.5
  config.model.kwargs.stochastic_depth_rate = 0.1
  default.sgd_recipe(config, learning_rate=0.1, weight_decay=2e-5, num_epochs=100, batch_size=256,
                     num_train=25_000)
  config.train.agc_clip = 0.01
  if variant == 'smoke':
    default.tiny_smoke(config)
    config.dataset.num_identities = 4
    config.model.kwargs.variant = 'F0'
    config.model.kwargs.width_multiplier = 0.125
  return config
