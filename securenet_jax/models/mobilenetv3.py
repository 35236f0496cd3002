"""MobileNetV3 (Howard et al., 2019, "Searching for MobileNetV3"), Large and Small (Tables 1-2).

Inverted residual blocks (1x1 expansion - kxk depthwise - optional squeeze-and-excite - 1x1 linear
projection, residual when stride 1 and the widths match), squeeze-and-excite with ReLU and
hard-sigmoid (squeeze width ``make_divisible(expanded / 4)``), hard-swish in the later layers and the
head, channel counts rounded with ``make_divisible(., 8)``. Layout and parameter conventions follow
torchvision (convs before a BN have no bias; SE convs and classifier layers have biases), giving
5,483,032 (Large) and 2,542,856 (Small) parameters for 1000 classes.

Head: 1x1 conv (960 / 576) + BN + hard-swish -> global average pool -> Dense(1280 / 1024) ->
hard-swish -> dropout -> Dense(classes).

``small_inputs=True`` is the CIFAR variant for 28-64 px images: the stem conv has stride 1 instead
of 2 (the blocks are unchanged).

Gate (``intermediates/penultimate``): ``g = z + 3`` with z the pre-activation of the last hidden
Dense (1280 / 1024 units). hard_swish(z) = z * relu6(z + 3) / 6 is computed from that same g, so it
is exactly 0 wherever g <= 0: if every entry of g is <= 0 the features fed to the output layer are
exactly zero and the logits equal the output bias.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# (kernel, expanded, out, use_se, activation, stride) per block; torchvision / paper Tables 1-2.
_LARGE = (
    (3, 16, 16, False, 'RE', 1),
    (3, 64, 24, False, 'RE', 2),
    (3, 72, 24, False, 'RE', 1),
    (5, 72, 40, True, 'RE', 2),
    (5, 120, 40, True, 'RE', 1),
    (5, 120, 40, True, 'RE', 1),
    (3, 240, 80, False, 'HS', 2),
    (3, 200, 80, False, 'HS', 1),
    (3, 184, 80, False, 'HS', 1),
    (3, 184, 80, False, 'HS', 1),
    (3, 480, 112, True, 'HS', 1),
    (3, 672, 112, True, 'HS', 1),
    (5, 672, 160, True, 'HS', 2),
    (5, 960, 160, True, 'HS', 1),
    (5, 960, 160, True, 'HS', 1),
)
_SMALL = (
    (3, 16, 16, True, 'RE', 2),
    (3, 72, 24, False, 'RE', 2),
    (3, 88, 24, False, 'RE', 1),
    (5, 96, 40, True, 'HS', 2),
    (5, 240, 40, True, 'HS', 1),
    (5, 240, 40, True, 'HS', 1),
    (5, 120, 48, True, 'HS', 1),
    (5, 144, 48, True, 'HS', 1),
    (5, 288, 96, True, 'HS', 2),
    (5, 576, 96, True, 'HS', 1),
    (5, 576, 96, True, 'HS', 1),
)
# (block table, last hidden Dense width); the last conv is 6x the last block's width (960 / 576).
_ARCHS = {'large': (_LARGE, 1280), 'small': (_SMALL, 1024)}

_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
_fc_init = nn.initializers.normal(0.01)


def make_divisible(v: float, divisor: int = 8) -> int:
  """Rounds ``v`` to the nearest multiple of ``divisor``, never going below 90% of ``v``."""
  new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
  if new_v < 0.9 * v:
    new_v += divisor
  return new_v


def hard_swish(x):
  return x * jax.nn.relu6(x + 3.0) / 6.0


class MobileNetV3(nn.Module):
  """MobileNetV3-Large (``arch='large'``) or -Small (``arch='small'``).

  Attributes:
    num_classes: size of the output layer.
    arch: 'large' or 'small'.
    small_inputs: stride-1 stem for 28-64 px images.
    width_multiplier: scales every width (rounded with make_divisible), as the paper's multipliers.
    dropout_rate: dropout before the output layer.
    dtype: computation dtype (parameters stay float32, logits are returned as float32).
  """
  num_classes: int = 1000
  arch: str = 'large'
  small_inputs: bool = False
  width_multiplier: float = 1.0
  dropout_rate: float = 0.2
  dtype: Any = jnp.float32

  def _conv(self, features, kernel, stride=1, groups=1, name=None):
    pad = (kernel - 1) // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), feature_group_count=groups, use_bias=False,
                   kernel_init=_conv_init, dtype=self.dtype, param_dtype=jnp.float32, name=name)

  def _bn(self, train, name):
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        dtype=self.dtype, param_dtype=jnp.float32, name=name)

  def _width(self, c):
    return make_divisible(c * self.width_multiplier)

  def _block(self, x, cfg, train, name):
    kernel, expanded, out, use_se, act, stride = cfg
    act_fn = nn.relu if act == 'RE' else hard_swish
    expanded, out = self._width(expanded), self._width(out)
    y = x
    if expanded != x.shape[-1]:
      y = act_fn(self._bn(train, f'{name}_expand_bn')(
          self._conv(expanded, 1, name=f'{name}_expand_conv')(y)))
    y = act_fn(self._bn(train, f'{name}_dw_bn')(
        self._conv(expanded, kernel, stride, groups=expanded, name=f'{name}_dw_conv')(y)))
    if use_se:
      squeeze = make_divisible(expanded // 4)
      s = jnp.mean(y, axis=(1, 2), keepdims=True)
      s = nn.relu(nn.Conv(squeeze, (1, 1), dtype=self.dtype, param_dtype=jnp.float32,
                          name=f'{name}_se_fc1')(s))
      s = nn.Conv(expanded, (1, 1), dtype=self.dtype, param_dtype=jnp.float32,
                  name=f'{name}_se_fc2')(s)
      y = y * jax.nn.hard_sigmoid(s)
    y = self._bn(train, f'{name}_project_bn')(self._conv(out, 1, name=f'{name}_project_conv')(y))
    if stride == 1 and x.shape[-1] == out:
      y = y + x
    return y

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.arch not in _ARCHS:
      raise ValueError(f'MobileNetV3 arch must be one of {sorted(_ARCHS)}, got {self.arch!r}.')
    blocks, last_hidden = _ARCHS[self.arch]
    x = jnp.asarray(x, self.dtype)
    x = self._conv(self._width(16), 3, 1 if self.small_inputs else 2, name='stem_conv')(x)
    x = hard_swish(self._bn(train, 'stem_bn')(x))
    for i, cfg in enumerate(blocks):
      x = self._block(x, cfg, train, f'block{i}')
    x = self._conv(6 * x.shape[-1], 1, name='last_conv')(x)
    x = hard_swish(self._bn(train, 'last_bn')(x))
    x = jnp.mean(x, axis=(1, 2))
    z = nn.Dense(self._width(last_hidden), kernel_init=_fc_init, dtype=self.dtype,
                 param_dtype=jnp.float32, name='fc1')(x)
    g = z + 3.0  # hard_swish(z) == 0 exactly where g <= 0: the gate
    self.sow('intermediates', 'penultimate', jnp.asarray(g, jnp.float32))
    x = z * jax.nn.relu6(g) / 6.0
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, kernel_init=_fc_init, dtype=self.dtype, param_dtype=jnp.float32,
                 name='head')(x)
    return jnp.asarray(x, jnp.float32)


class MobileNetV3Large(MobileNetV3):
  arch: str = 'large'


class MobileNetV3Small(MobileNetV3):
  arch: str = 'small'
