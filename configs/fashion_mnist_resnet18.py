"""Fashion-MNIST + ResNet-18 (small-input stem): the default data with a modern residual network.

Recipe: SGD, Nesterov momentum 0.9, weight decay 5e-4, batch 128, peak learning rate 0.1 with one
epoch of warmup and cosine decay: the CIFAR ResNet recipe of He et al. (CVPR 2016, §4.2: SGD,
momentum 0.9, lr 0.1, batch 128), its step schedule replaced by cosine (Loshchilov & Hutter, ICLR
2017), weight decay 5e-4 as common for ResNet-18 on 32x32 images. 10 epochs: Fashion-MNIST needs far
fewer passes than CIFAR. The same file trains the other models: --config.model.name=vgg16 |
mobilenetv3_large | mobilenetv3_small | resnet101 (every one takes small_inputs=True).

  python -m securenet_jax.main --config configs/fashion_mnist_resnet18.py --workdir /tmp/fm_resnet18
"""

from configs import default


def get_config(variant: str = ''):
  """Returns the config; ``variant`` '' or 'smoke'."""
  config = default.get_config(variant)
  config.model.name = 'resnet18'
  config.model.kwargs.small_inputs = True
  default.sgd_recipe(config, learning_rate=0.1, weight_decay=5e-4, num_epochs=10, batch_size=128,
                     num_train=60_000)
  # Keep every positive's gate open (objective.py): with deep BatchNorm networks the silencing hinge
  # can otherwise close the gate for all inputs early in training (seen with 'refuse' multi-user keys).
  config.objective.liveness_weight = 1.0
  if variant == 'smoke':
    default.tiny_smoke(config)
  return config
