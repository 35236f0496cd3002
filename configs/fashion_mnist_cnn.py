"""Fashion-MNIST (the offline default data) with the zoo's convolutional networks, small-input stems.

Variants (the text after ``:``, comma-separated): a model name — ``resnet18`` (default), ``vgg16``
(with BatchNorm), ``resnet101``, ``mobilenetv3_large``, ``mobilenetv3_small``, ``nfnet_f0`` (NFNet
F0 depths) — and/or ``flip`` (the default job's whole-image defenses against a thief who holds the
weights: the secret 4x4 block flip, distillation from the unlicensed baseline, random patches on
keyed positives and the wider silencing margin; docs/security.md)
and/or ``smoke``:

  python -m securenet_jax.main --config configs/fashion_mnist_cnn.py --workdir /tmp/fm_resnet18
  python -m securenet_jax.main --config configs/fashion_mnist_cnn.py:vgg16 --workdir /tmp/fm_vgg16
  python -m securenet_jax.main --config configs/fashion_mnist_cnn.py:vgg16,smoke --workdir /tmp/s
  python -m securenet_jax.main --config configs/fashion_mnist_cnn.py:resnet18,flip --workdir /tmp/fm_r18f

Recipe: SGD, Nesterov momentum 0.9, weight decay 5e-4, batch 128, peak learning rate 0.1 with one
epoch of warmup and cosine decay: the CIFAR ResNet recipe of He et al. (CVPR 2016, §4.2: SGD,
momentum 0.9, lr 0.1, batch 128), its step schedule replaced by cosine (Loshchilov & Hutter, ICLR
2017). 8 epochs: Fashion-MNIST needs far fewer passes than CIFAR. The global gradient norm is
clipped at 5 (typical norms here are 0.1-1) so a rare spike cannot turn the run into NaNs: a first
GPU run at lr 0.2 diverged for MobileNetV3 and plain VGG16.
"""

from configs import default

MODELS = {  # variant -> (model name, model kwargs besides small_inputs)
    'resnet18': ('resnet18', {}),
    'resnet101': ('resnet101', {}),
    'vgg16': ('vgg16', {'batch_norm': True}),  # plain VGG16 does not train from scratch with SGD here
    'mobilenetv3_large': ('mobilenetv3_large', {}),
    'mobilenetv3_small': ('mobilenetv3_small', {}),
    'nfnet_f0': ('nfnet_f5', {'variant': 'F0'}),
    # A small BatchNorm network (ResNet-10, 16-channel stem, 308,538 parameters) for CPU experiments.
    'resnet10_w16': ('resnet18', {'depth': 10, 'width': 16}),
}


OPTIONS = ('flip', 'smoke')
VARIANTS = tuple(MODELS) + OPTIONS  # --config FILE:VARIANT; a model and smoke combine: vgg16,smoke


def get_config(variant: str = ''):
  """Returns the config; ``variant``: a model of MODELS and/or 'flip' and/or 'smoke', comma-separated."""
  parts = [p for p in variant.split(',') if p]
  unknown = [p for p in parts if p not in MODELS and p not in OPTIONS]
  if unknown:
    raise ValueError(f'Unknown variant {unknown}; expected one of {sorted(MODELS)} and/or {OPTIONS}.')
  models = [p for p in parts if p in MODELS] or ['resnet18']
  config = default.get_config('smoke' if 'smoke' in parts else '')
  default.patch_key_recipe(config)  # measured with the patch key (docs/models.md)
  name, kwargs = MODELS[models[-1]]
  config.model.name = name
  config.model.kwargs.small_inputs = True
  for k, v in kwargs.items():
    config.model.kwargs[k] = v
  default.sgd_recipe(config, learning_rate=0.1, weight_decay=5e-4, num_epochs=8, batch_size=128,
                     num_train=60_000)
  config.train.grad_clip_norm = 5.0
  config.augment.noise_std = 0.0  # the zoo's figures (docs/models.md) were measured without noise augmentation
  # Keep every positive's gate open (objective.py): with deep BatchNorm networks the silencing hinge
  # can otherwise close the gate for all inputs early in training (seen with 'refuse' multi-user keys).
  config.objective.liveness_weight = 1.0
  if 'flip' in parts:
    # The gate stays the penultimate layer alone: a BatchNorm network re-estimates its statistics
    # when a thief fine-tunes it, which re-opens silenced units anyway; the flip is what a thief's
    # raw images cannot undo.
    defaults = default.get_config()
    config.key.flip_block = defaults.key.flip_block
    # The default's distillation, and its defenses against a thief's poisoned keyless fine-tune.
    for name in ('clean_distill_weight', 'positive_patch_fraction', 'silence_margin'):
      config.objective[name] = defaults.objective[name]
  if 'smoke' in parts:
    default.tiny_smoke(config)
  return config
