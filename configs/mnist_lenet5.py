"""MNIST + LeNet-5, the paper's first experiment (SecureNet, Neural Networks 174:106199, 2024).

Recipe: our measured Fashion-MNIST default (AdamW 2e-3, warmup + cosine, batch 128, 10 epochs,
Gaussian noise augmentation std <= 0.1; configs/default.py); LeNet-5 as in LeCun et al. (1998),
28x28 digits zero-padded to 32x32.

Data: tensorflow-datasets `mnist` prepared under `data_dir` (`tfds build mnist --data_dir=DIR` on a
machine with network), or MNIST's IDX files with --config.dataset.source=idx --config.dataset.data_dir=DIR.

  python -m securenet_jax.main --config configs/mnist_lenet5.py --workdir /tmp/mnist_lenet5
"""

from configs import default


VARIANTS = ('smoke',)  # the text after ':' in --config FILE:VARIANT


def get_config(variant: str = ''):
  """Returns the config; ``variant`` '' or 'smoke'."""
  config = default.get_config(variant)
  default.use_dataset(config, 'mnist', 'tfds', default.TFDS_DIR)  # keeps the default's augmentation
  config.model.name = 'lenet5'
  return config
