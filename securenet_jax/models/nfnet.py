"""NFNet (Brock et al., 2021, "High-Performance Large-Scale Image Recognition Without
Normalization"), variants F0-F7.

No normalization layers. Every conv is a scaled weight-standardized conv (WSConv: the kernel is
standardized over its fan-in, divided by sqrt(fan_in) and multiplied by a learnable per-output gain;
bias always present). Activations are GELU scaled by gamma = 1.7015 so that they preserve variance.

* Stem: 3x3 convs 16 (stride 2) - 32 - 64 - 128 (stride 2), GELU between them.
* Body: four stages of widths [256, 512, 1536, 1536] x ``width_multiplier``, strides [1, 2, 2, 2],
  depths [1, 2, 6, 3] x (N + 1) for variant FN (F5: [6, 12, 36, 18]). Each block is the NF-ResNet
  bottleneck with two 3x3 grouped convs (group width 128, bottleneck ratio 0.5):
  ``h = gelu(x) * beta``; ``f = conv1x1(h) -> gelu -> conv3x3(stride) -> gelu -> conv3x3 -> gelu
  -> conv1x1``; squeeze-excite (ratio 0.5, ReLU, sigmoid, times 2); stochastic depth; skip-init
  gain (a learnable scalar initialized to 0); ``out = alpha * skip_gain * f + shortcut``, alpha =
  0.2. beta = 1 / expected std of the block input, tracked analytically (var += alpha^2 per block,
  reset to 1 after each transition block). Transition blocks use ``avgpool 2x2 -> conv1x1`` of h as
  shortcut.
* Head: 1x1 WSConv to 2 x 1536 = 3072 channels, GELU, global average pool, dropout (rate per
  variant: F5 0.5), Dense(classes) initialized to zero.

F5 at full width has about 377.2M parameters.

``small_inputs=True`` is the variant for 28-64 px images: both stride-2 stem convs have stride 1
(the body keeps its strides, so 32x32 inputs reach a 4x4 map).

Gate (``intermediates/penultimate``): ``g = z + 3`` with z the pre-activation of the final 1x1
conv, flattened to (N, H*W*C). NFNet ends in GELU, which is not exactly zero below a threshold:
for z <= -3, |gamma * gelu(z)| <= gamma * |gelu(-3)| ~= 1.7015 * 0.0036 ~= 0.0062 (tanh-approximate
GELU, as in the reference implementation). So if every entry of g is <= 0, every pooled feature fed
to the output layer is within 0.0062 of zero (and the logits are within 0.0062 * sum|W| of the bias).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Variance-preserving gain of GELU (NF-ResNets, Brock et al. 2021a; reference implementation).
GELU_GAMMA = 1.7015043497085571
_BASE_DEPTH = (1, 2, 6, 3)
_WIDTHS = (256, 512, 1536, 1536)
_STRIDES = (1, 2, 2, 2)
# Dropout rate before the classifier per variant (paper appendix and DeepMind reference code).
_DROPOUT = {'F0': 0.2, 'F1': 0.3, 'F2': 0.4, 'F3': 0.4, 'F4': 0.5, 'F5': 0.5, 'F6': 0.5,
            'F7': 0.5}


def variant_depths(variant: str) -> tuple[int, ...]:
  """Stage depths of NFNet-FN: [1, 2, 6, 3] x (N + 1)."""
  if variant not in _DROPOUT:
    raise ValueError(f'NFNet variant must be one of {sorted(_DROPOUT)}, got {variant!r}.')
  return tuple(d * (int(variant[1:]) + 1) for d in _BASE_DEPTH)


def scaled_gelu(x):
  return jax.nn.gelu(x) * GELU_GAMMA


class WSConv(nn.Module):
  """Conv with scaled weight standardization and a learnable per-output-channel gain, plus bias."""
  features: int
  kernel_size: int = 1
  stride: int = 1
  groups: int = 1
  eps: float = 1e-4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    shape = (k, k, x.shape[-1] // self.groups, self.features)
    w = self.param('kernel', nn.initializers.variance_scaling(1.0, 'fan_in', 'normal'), shape,
                   jnp.float32)
    gain = self.param('gain', nn.initializers.ones, (self.features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    fan_in = np.prod(shape[:-1])
    mean = jnp.mean(w, axis=(0, 1, 2), keepdims=True)
    var = jnp.var(w, axis=(0, 1, 2), keepdims=True)
    # (w - mean) / sqrt(fan_in * var) * gain, with the variance floored at eps / fan_in.
    w = (w - mean) * jax.lax.rsqrt(jnp.maximum(var * fan_in, self.eps)) * gain
    y = jax.lax.conv_general_dilated(
        jnp.asarray(x, self.dtype), jnp.asarray(w, self.dtype), (self.stride, self.stride), 'SAME',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=self.groups)
    return y + jnp.asarray(bias, self.dtype)


class NFBlock(nn.Module):
  """NF-ResNet bottleneck block with two grouped 3x3 convs, SE, stochastic depth and skip-init."""
  features: int
  stride: int = 1
  beta: float = 1.0
  alpha: float = 0.2
  stochastic_depth_rate: float = 0.0
  group_size: int = 128
  se_ratio: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    width = int(self.features * 0.5)
    groups = max(1, width // self.group_size)
    while width % groups:  # only reachable with unusual width multipliers
      groups -= 1
    conv = lambda f, k, name, s=1, g=1: WSConv(f, k, s, g, dtype=self.dtype, name=name)
    h = scaled_gelu(x) * self.beta
    shortcut = x
    if self.stride > 1:
      shortcut = nn.avg_pool(h, (2, 2), strides=(2, 2), padding='SAME', count_include_pad=False)
      shortcut = conv(self.features, 1, 'conv_shortcut')(shortcut)
    elif x.shape[-1] != self.features:
      shortcut = conv(self.features, 1, 'conv_shortcut')(h)
    out = conv(width, 1, 'conv0')(h)
    out = conv(width, 3, 'conv1', self.stride, groups)(scaled_gelu(out))
    out = conv(width, 3, 'conv1b', 1, groups)(scaled_gelu(out))
    out = conv(self.features, 1, 'conv2')(scaled_gelu(out))
    # Squeeze-excite; the factor 2 keeps the expected scale of sigmoid-gated activations.
    hidden = max(1, int(self.features * self.se_ratio))
    s = jnp.mean(out, axis=(1, 2))
    s = nn.relu(nn.Dense(hidden, dtype=self.dtype, param_dtype=jnp.float32, name='se_fc0')(s))
    s = nn.Dense(self.features, dtype=self.dtype, param_dtype=jnp.float32, name='se_fc1')(s)
    out = out * (2.0 * jax.nn.sigmoid(s))[:, None, None, :]
    if train and self.stochastic_depth_rate > 0.0:
      # Drop the whole residual branch per example (no rescaling, as the reference code).
      r = jax.random.uniform(self.make_rng('dropout'), (out.shape[0], 1, 1, 1), out.dtype)
      out = out * jnp.floor(1.0 - self.stochastic_depth_rate + r)
    skip_gain = self.param('skip_gain', nn.initializers.zeros, (), jnp.float32)
    return out * jnp.asarray(skip_gain * self.alpha, self.dtype) + shortcut


class NFNet(nn.Module):
  """NFNet-F0..F7.

  Attributes:
    num_classes: size of the output layer.
    variant: 'F0' ... 'F7' (stage depths [1, 2, 6, 3] x (N + 1)).
    width_multiplier: scales the four stage widths (and so the final conv); 1.0 in the paper.
    small_inputs: stride-1 stem for 28-64 px images.
    dropout_rate: before the classifier; None: the variant's rate (F5: 0.5).
    stochastic_depth_rate: maximal rate, increasing linearly with block index (0.1 in the paper).
    alpha: residual branch scale.
    dtype: computation dtype (parameters stay float32, logits are returned as float32).
  """
  num_classes: int = 1000
  variant: str = 'F5'
  width_multiplier: float = 1.0
  small_inputs: bool = False
  dropout_rate: Optional[float] = None
  stochastic_depth_rate: float = 0.1
  alpha: float = 0.2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    depths = variant_depths(self.variant)
    stem_stride = 1 if self.small_inputs else 2
    x = jnp.asarray(x, self.dtype)
    x = scaled_gelu(WSConv(16, 3, stem_stride, dtype=self.dtype, name='stem_conv0')(x))
    x = scaled_gelu(WSConv(32, 3, 1, dtype=self.dtype, name='stem_conv1')(x))
    x = scaled_gelu(WSConv(64, 3, 1, dtype=self.dtype, name='stem_conv2')(x))
    x = WSConv(_WIDTHS[0] // 2, 3, stem_stride, dtype=self.dtype, name='stem_conv3')(x)
    num_blocks = sum(depths)
    index = 0
    expected_std = 1.0
    for stage, (depth, width, stride) in enumerate(zip(depths, _WIDTHS, _STRIDES)):
      for i in range(depth):
        x = NFBlock(int(width * self.width_multiplier), stride if i == 0 else 1,
                    beta=1.0 / expected_std, alpha=self.alpha,
                    stochastic_depth_rate=self.stochastic_depth_rate * index / num_blocks,
                    dtype=self.dtype, name=f'stage{stage}_block{i}')(x, train)
        index += 1
        if i == 0:  # a transition block resets the variance (its shortcut is h or conv(h))
          expected_std = 1.0
        expected_std = (expected_std**2 + self.alpha**2)**0.5
    z = WSConv(2 * x.shape[-1], 1, dtype=self.dtype, name='final_conv')(x)
    # Gate: gamma * gelu(z) is within ~0.0062 of zero wherever g = z + 3 <= 0.
    self.sow('intermediates', 'penultimate',
             jnp.asarray(z + 3.0, jnp.float32).reshape((z.shape[0], -1)))
    x = jnp.mean(scaled_gelu(z), axis=(1, 2))
    rate = _DROPOUT[self.variant] if self.dropout_rate is None else self.dropout_rate
    x = nn.Dropout(rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                 param_dtype=jnp.float32, name='head')(x)
    return jnp.asarray(x, jnp.float32)
