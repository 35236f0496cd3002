"""LeNet-5 (LeCun et al., 1998) with ReLU and max pooling, as modern reimplementations use it."""

from __future__ import annotations

import functools
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

CONV_IMPLS = ('auto', 'xla', 'direct', 'banded')


class DirectConv(nn.Module):
  """A VALID, stride-1 convolution computed as a sum of shifted, scaled copies of the input: one fused
  elementwise loop, accumulated channels-first, then moved to NHWC. Same parameters (``kernel``
  (kh, kw, C, F), ``bias``) and initializers as ``nn.Conv``, so checkpoints and seeds are shared.

  For LeNet-5's first layer (one input channel, 6 filters) on a CPU, XLA's convolution is the slowest
  op of the network's forward; this form computes the same layer several times faster
  (docs/performance.md). Its gradient, as autodiff derives it, is slow: training uses
  :class:`BandedConv`. Outputs agree with ``nn.Conv`` to float rounding (the sum runs in another order).
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


class BandedConv(nn.Module):
  """A VALID, stride-1 convolution as one matrix product over image rows: the kernel is spread into a
  banded (block-Toeplitz) matrix that maps ``kh`` consecutive input rows (W x C values each) to one
  output row (W' x F values). The forward, and in autodiff the weight and the input gradients, are
  then each one dense matrix product (plus ``kh`` row slices and their transpose, a sum of shifted
  rows). Same parameters and initializers as ``nn.Conv``.

  It does about W / W' x kw times the convolution's multiply-adds (5x for LeNet-5), but on a CPU XLA's
  matrix product runs so much faster than its convolution on LeNet-5's few channels that the
  training step is about twice as fast (docs/performance.md). Outputs agree with ``nn.Conv`` to float
  rounding.
  """
  features: int
  kernel_size: tuple[int, int]

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    *batch, height, width, c = x.shape
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (kh, kw, c, self.features))
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
    oh, ow = height - kh + 1, width - kw + 1
    # shift[j, v, w] = 1 where input column v = output column w + kernel column j
    shift = (jnp.arange(width)[None, :, None] ==
             jnp.arange(ow)[None, None, :] + jnp.arange(kw)[:, None, None]).astype(x.dtype)
    # band[i, v, c, w, f] = kernel[i, v - w, c, f] where 0 <= v - w < kw, else 0
    band = jnp.einsum('jvw,ijcf->ivcwf', shift, jnp.asarray(kernel, x.dtype))
    rows = jnp.stack([x[..., i:i + oh, :, :] for i in range(kh)], axis=-3)  # (..., oh, kh, W, C)
    out = rows.reshape(*batch, oh, kh * width * c) @ band.reshape(kh * width * c, ow * self.features)
    return out.reshape(*batch, oh, ow, self.features) + jnp.asarray(bias, x.dtype)


def resolve_conv_impl(impl: str | None, channels: int) -> str:
  """The form LeNet-5's convolutions take for ``conv_impl=impl`` and images of ``channels`` channels:
  'xla', 'direct' or 'banded'. None (the default, what training runs): 'banded' on a CPU, 'xla' on
  accelerators. 'auto' (what the inference API runs, ``models.for_inference``): 'direct' for
  one-channel images on a CPU, otherwise as None."""
  if impl is not None and impl not in CONV_IMPLS:
    raise ValueError(f'conv_impl={impl!r}; expected None or one of {CONV_IMPLS}.')
  if impl in (None, 'auto'):
    if jax.default_backend() != 'cpu':  # accelerators keep their convolution kernels
      return 'xla'
    return 'direct' if impl == 'auto' and channels == 1 else 'banded'
  return impl


@jax.custom_vjp
def _pool_by_reshape(x):
  """2x2 max pooling, stride 2, of NHWC ``x`` with even H and W, as a maximum over a reshape; the
  gradient goes to the first maximum of each window in row-major order (as XLA's ``reduce_window``
  gradient does), in one elementwise pass instead of autodiff's comparison, count and division."""
  *batch, h, w, c = x.shape
  return jnp.max(x.reshape(*batch, h // 2, 2, w // 2, 2, c), axis=(-4, -2))


def _pool_fwd(x):
  y = _pool_by_reshape(x)
  return y, (x, y)


def _pool_bwd(residuals, g):
  x, y = residuals
  *batch, h, w, c = x.shape
  windows = x.reshape(*batch, h // 2, 2, w // 2, 2, c)
  taken = jnp.zeros(y.shape, bool)
  grads = []
  for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)):
    first = (windows[..., i, :, j, :] == y) & ~taken  # this element is the window's first maximum
    taken = taken | first
    grads.append(jnp.where(first, g, 0))
  rows = [jnp.stack(grads[2 * i:2 * i + 2], axis=-2) for i in range(2)]  # (..., h/2, w/2, 2, c)
  return (jnp.stack(rows, axis=-4).reshape(x.shape),)  # (..., h/2, 2, w/2, 2, c)


_pool_by_reshape.defvjp(_pool_fwd, _pool_bwd)


def _max_pool_2x2(x, impl: str):
  """2x2 max pooling, stride 2. XLA's ``reduce_window`` for 'xla'; on a CPU (the other forms) a
  maximum over a reshape with a one-pass gradient (:func:`_pool_by_reshape`; the same values and
  gradients), which XLA computes several times faster there."""
  if impl == 'xla' or x.shape[-3] % 2 or x.shape[-2] % 2:
    return nn.max_pool(x, (2, 2), strides=(2, 2))
  return _pool_by_reshape(x)


class LeNet5(nn.Module):
  """LeNet-5: conv(6, 5x5) - pool - conv(16, 5x5) - pool - fc120 - fc84 - fc(num_classes).

  Inputs smaller than ``input_size`` (e.g. 28x28 MNIST) are zero-padded to it, as in the original
  paper, which keeps the 61,706 parameters of the 32x32 network.

  The pre-activation of the penultimate layer is sown as ``intermediates/penultimate``: the licensed
  objective silences it on inputs without a valid key (see ``objective.py``).

  ``batch_norm=True``: BatchNorm between every hidden layer and its ReLU (``bn1``, ``bn2`` after the
  convolutions, ``fc1_bn``, ``fc2_bn`` after the dense layers): a BatchNorm network small enough for
  CPU experiments on what a thief's re-estimated batch statistics do to a silenced gate.

  ``conv_impl``: how the convolutions and poolings are computed, never what: the parameters are the
  same and the outputs agree to float rounding. 'xla': ``nn.Conv`` and ``nn.max_pool``. 'banded'
  (:class:`BandedConv` for both convolutions; the fastest to train on a CPU); 'direct'
  (:class:`DirectConv` for ``conv1``, ``nn.Conv`` for ``conv2``; the fastest forward on a CPU, but
  its gradient is slow); both pool by a reshape. None (the default): 'banded' on a CPU, 'xla' on
  accelerators; the inference API takes 'auto' (``models.for_inference``): 'direct' for one-channel
  images on a CPU, as None otherwise. A config that names one is used everywhere
  (:func:`resolve_conv_impl`).
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
    impl = resolve_conv_impl(self.conv_impl, x.shape[-1])
    xla_conv = functools.partial(nn.Conv, padding='VALID')
    conv1, conv2 = {'xla': (xla_conv, xla_conv), 'direct': (DirectConv, xla_conv),
                    'banded': (BandedConv, BandedConv)}[impl]
    x = nn.relu(norm(conv1(6, (5, 5), name='conv1')(x), 'bn1'))
    x = _max_pool_2x2(x, impl)
    x = nn.relu(norm(conv2(16, (5, 5), name='conv2')(x), 'bn2'))
    x = _max_pool_2x2(x, impl)
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(norm(nn.Dense(120, name='fc1')(x), 'fc1_bn'))
    x = norm(nn.Dense(84, name='fc2')(x), 'fc2_bn')
    self.sow('intermediates', 'penultimate', x)
    x = nn.relu(x)
    return nn.Dense(self.num_classes, name='fc3')(x)
