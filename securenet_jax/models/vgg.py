"""VGG-16 (Simonyan & Zisserman, 2015, "Very Deep Convolutional Networks for Large-Scale Image
Recognition"), configuration D: 13 3x3 convs in five blocks (64, 128, 256, 512, 512), each block
followed by a 2x2 max pool, then three fully connected layers.

ImageNet configuration (as torchvision): the feature map is average-pooled adaptively to 7x7 (the
identity for 224x224 inputs), then FC-4096 - FC-4096 - FC-classes with ReLU and dropout 0.5 after
each hidden FC (138,357,544 parameters for 1000 classes). ``batch_norm=True`` is the common BN
variant (BN after every conv, conv biases kept: 138,365,992 parameters).

``small_inputs=True`` is the CIFAR VGG variant: the same 13 convs with a compact classifier
FC-512 - FC-512 - FC-classes on the flattened features (1x1x512 for 32x32 inputs).

Inputs smaller than 32x32 (e.g. 28x28 MNIST) are zero-padded to 32x32, as LeNet-5 does, so the five
pools never meet an empty map.

Gate (``intermediates/penultimate``): the pre-ReLU activation of the last hidden FC layer. It goes
through ReLU and dropout (which keeps zeros) into the output layer, so if every entry is <= 0 the
logits equal the output bias.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

_CONFIG_D = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512,
             'M')
_MIN_SIZE = 32

# torchvision's VGG initialization.
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
_fc_init = nn.initializers.normal(0.01)


def _adaptive_avg_pool_matrix(size_in: int, size_out: int) -> np.ndarray:
  """(size_out, size_in) averaging weights of PyTorch's AdaptiveAvgPool along one axis."""
  m = np.zeros((size_out, size_in), np.float32)
  for i in range(size_out):
    start = (i * size_in) // size_out
    end = -((-(i + 1) * size_in) // size_out)  # ceil
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x, size: tuple[int, int]):
  """NHWC adaptive average pooling to ``size`` (as torch.nn.AdaptiveAvgPool2d)."""
  h, w = x.shape[1:3]
  if (h, w) == tuple(size):
    return x
  mh = jnp.asarray(_adaptive_avg_pool_matrix(h, size[0]), x.dtype)
  mw = jnp.asarray(_adaptive_avg_pool_matrix(w, size[1]), x.dtype)
  return jnp.einsum('ih,jw,nhwc->nijc', mh, mw, x)


class VGG16(nn.Module):
  """VGG-16 (configuration D).

  Attributes:
    num_classes: size of the output layer.
    batch_norm: BN (+ReLU) after every conv.
    small_inputs: CIFAR-style compact classifier (512-512-classes) for 28-64 px images.
    dropout_rate: dropout after each hidden FC layer (0.5 in the paper).
    dtype: computation dtype (parameters stay float32, logits are returned as float32).
  """
  num_classes: int = 1000
  batch_norm: bool = False
  small_inputs: bool = False
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = jnp.asarray(x, self.dtype)
    h, w = x.shape[1:3]
    if h < _MIN_SIZE or w < _MIN_SIZE:
      dh, dw = max(_MIN_SIZE - h, 0), max(_MIN_SIZE - w, 0)
      x = jnp.pad(x, ((0, 0), (dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2), (0, 0)))
    i = 0
    for v in _CONFIG_D:
      if v == 'M':
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        continue
      x = nn.Conv(v, (3, 3), padding=((1, 1), (1, 1)), kernel_init=_conv_init, dtype=self.dtype,
                  param_dtype=jnp.float32, name=f'conv{i}')(x)
      if self.batch_norm:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         dtype=self.dtype, param_dtype=jnp.float32, name=f'bn{i}')(x)
      x = nn.relu(x)
      i += 1
    if self.small_inputs:
      hidden = 512
    else:
      hidden = 4096
      x = adaptive_avg_pool(x, (7, 7))
    x = x.reshape((x.shape[0], -1))
    for j in range(2):
      x = nn.Dense(hidden, kernel_init=_fc_init, dtype=self.dtype, param_dtype=jnp.float32,
                   name=f'fc{j}')(x)
      if j == 1:  # pre-activation of the last hidden FC layer: the gate.
        self.sow('intermediates', 'penultimate', jnp.asarray(x, jnp.float32))
      x = nn.relu(x)
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, kernel_init=_fc_init, dtype=self.dtype, param_dtype=jnp.float32,
                 name='head')(x)
    return jnp.asarray(x, jnp.float32)
