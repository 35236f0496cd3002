"""LeNet-5 (LeCun et al., 1998) with ReLU and max pooling, as modern reimplementations use it."""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp


class LeNet5(nn.Module):
  """LeNet-5: conv(6, 5x5) - pool - conv(16, 5x5) - pool - fc120 - fc84 - fc(num_classes).

  Inputs smaller than ``input_size`` (e.g. 28x28 MNIST) are zero-padded to it, as in the original
  paper, which keeps the 61,706 parameters of the 32x32 network.

  The pre-activation of the penultimate layer is sown as ``intermediates/penultimate``: the licensed
  objective silences it on inputs without a valid key (see ``objective.py``).

  ``batch_norm=True``: BatchNorm between every hidden layer and its ReLU (``bn1``, ``bn2`` after the
  convolutions, ``fc1_bn``, ``fc2_bn`` after the dense layers): a BatchNorm network small enough for
  CPU experiments on what a thief's re-estimated batch statistics do to a silenced gate.
  """
  num_classes: int = 10
  input_size: int = 32
  batch_norm: bool = False
  HEAD: ClassVar[str] = 'fc3'  # the output layer (models.head_name)

  @nn.compact
  def __call__(self, x, train: bool = False):
    # Without batch_norm: no dropout or batch norm, the same behaviour in training and evaluation.
    def norm(y, name):
      if not self.batch_norm:
        return y
      return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)(y)

    h, w = x.shape[-3:-1]
    if h < self.input_size or w < self.input_size:
      dh, dw = max(self.input_size - h, 0), max(self.input_size - w, 0)
      x = jnp.pad(x, ((0, 0), (dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2), (0, 0)))
    x = nn.relu(norm(nn.Conv(6, (5, 5), padding='VALID', name='conv1')(x), 'bn1'))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(norm(nn.Conv(16, (5, 5), padding='VALID', name='conv2')(x), 'bn2'))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(norm(nn.Dense(120, name='fc1')(x), 'fc1_bn'))
    x = norm(nn.Dense(84, name='fc2')(x), 'fc2_bn')
    self.sow('intermediates', 'penultimate', x)
    x = nn.relu(x)
    return nn.Dense(self.num_classes, name='fc3')(x)
