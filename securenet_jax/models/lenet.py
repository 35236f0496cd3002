"""LeNet-5 (LeCun et al., 1998) with ReLU and max pooling, as modern reimplementations use it."""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

CONV_IMPLS = ('auto', 'xla', 'direct')


class DirectConv(nn.Module):
  """A VALID, stride-1 convolution computed as a sum of shifted, scaled copies of the input: one fused
  elementwise loop, accumulated channels-first, then moved to NHWC. Same parameters (``kernel``
  (kh, kw, C, F), ``bias``) and initializers as ``nn.Conv``, so checkpoints and seeds are shared.

  For LeNet-5's first layer (one input channel, 6 filters) on a CPU, XLA's convolution is the slowest
  op of the network; this form computes the same layer several times faster (docs/performance.md).
  Outputs agree with ``nn.Conv`` to float rounding (the sum runs in another order).
  """
  features: int
  kernel_size: tuple[int, int]

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    c = x.shape[-1]
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (kh, kw, c, self.features))
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
    kernel, x = jnp.asarray(kernel, x.dtype), jnp.moveaxis(x, -1, -3)  # (..., C, H, W)
    oh, ow = x.shape[-2] - kh + 1, x.shape[-1] - kw + 1
    out = 0.0
    for i in range(kh):
      for j in range(kw):
        window = x[..., :, None, i:i + oh, j:j + ow]  # (..., C, 1, oh, ow)
        out = out + jnp.sum(window * kernel[i, j][..., None, None], axis=-4)  # (..., F, oh, ow)
    return jnp.moveaxis(out, -3, -1) + jnp.asarray(bias, x.dtype)


def direct_first_conv(impl: str | None, channels: int) -> bool:
  """Whether LeNet-5's ``conv1`` is a :class:`DirectConv` for ``conv_impl=impl`` and images of
  ``channels`` channels (None: XLA's convolution, the default)."""
  if impl is None:
    return False
  if impl not in CONV_IMPLS:
    raise ValueError(f'conv_impl={impl!r}; expected one of {CONV_IMPLS}.')
  if impl == 'auto':  # measured faster on CPUs for one channel; accelerators keep their kernels
    return channels == 1 and jax.default_backend() == 'cpu'
  return impl == 'direct'


class LeNet5(nn.Module):
  """LeNet-5: conv(6, 5x5) - pool - conv(16, 5x5) - pool - fc120 - fc84 - fc(num_classes).

  Inputs smaller than ``input_size`` (e.g. 28x28 MNIST) are zero-padded to it, as in the original
  paper, which keeps the 61,706 parameters of the 32x32 network.

  The pre-activation of the penultimate layer is sown as ``intermediates/penultimate``: the licensed
  objective silences it on inputs without a valid key (see ``objective.py``).

  ``batch_norm=True``: BatchNorm between every hidden layer and its ReLU (``bn1``, ``bn2`` after the
  convolutions, ``fc1_bn``, ``fc2_bn`` after the dense layers): a BatchNorm network small enough for
  CPU experiments on what a thief's re-estimated batch statistics do to a silenced gate.

  ``conv_impl``: how ``conv1`` is computed: 'xla' (``nn.Conv``), 'direct' (:class:`DirectConv`) or
  'auto' (direct for one-channel images on a CPU, XLA's otherwise). The parameters are the same
  either way. None (the default) trains with XLA's convolution and lets the inference API take
  'auto' (``models.for_inference``); a config that names one is used everywhere. Training keeps
  XLA's convolution by default: with one single-threaded XLA device per core (how ``main.py`` runs on
  CPUs) the direct form's fused loops are split over a thread pool the devices share, and the
  training step ran at half the speed.
  """
  num_classes: int = 10
  input_size: int = 32
  batch_norm: bool = False
  conv_impl: str | None = None
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
    if direct_first_conv(self.conv_impl, x.shape[-1]):
      conv1 = DirectConv(6, (5, 5), name='conv1')
    else:
      conv1 = nn.Conv(6, (5, 5), padding='VALID', name='conv1')
    x = nn.relu(norm(conv1(x), 'bn1'))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(norm(nn.Conv(16, (5, 5), padding='VALID', name='conv2')(x), 'bn2'))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(norm(nn.Dense(120, name='fc1')(x), 'fc1_bn'))
    x = norm(nn.Dense(84, name='fc2')(x), 'fc2_bn')
    self.sow('intermediates', 'penultimate', x)
    x = nn.relu(x)
    return nn.Dense(self.num_classes, name='fc3')(x)
