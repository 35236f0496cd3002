"""ResNet (He et al., 2016, "Deep Residual Learning for Image Recognition").

Basic blocks (two 3x3 convs) for ResNet-18/34, bottleneck blocks (1x1-3x3-1x1, expansion 4) for
ResNet-50/101/152. As in torchvision ("ResNet v1.5"), a bottleneck block downsamples with its 3x3
conv, not its first 1x1 conv, and projection shortcuts are 1x1 conv + BN ("option B"). Convs that
feed a BN have no bias, so the ImageNet networks have torchvision's parameter counts (ResNet-18
11,689,512; ResNet-101 44,549,160).

``small_inputs=True`` is the CIFAR-literature variant for 28-64 px images: the 7x7 stride-2 stem and
its 3x3 max pool are replaced by one 3x3 stride-1 conv (+ BN + ReLU); the four stages are unchanged.

Gate (``intermediates/penultimate``): the output of the last residual block *after the residual add
and before its final ReLU*, flattened to (N, H*W*C). The head is ReLU -> global average pool ->
Dense, so if every entry of the gate is <= 0 the pooled features are exactly zero and the logits
equal the Dense bias.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu').
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

# (block type, blocks per stage) for each depth of the paper's Table 1.
_DEPTHS = {
    10: ('basic', (1, 1, 1, 1)),  # not in the paper: a small BatchNorm network for CPU experiments
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
    152: ('bottleneck', (3, 8, 36, 3)),
}


class ResNet(nn.Module):
  """ResNet of the given ``depth`` (18, 34, 50, 101 or 152).

  Attributes:
    num_classes: size of the output layer.
    depth: number of weighted layers.
    small_inputs: CIFAR-style 3x3 stride-1 stem without max pool, for 28-64 px images.
    width: channels of the stem and the first stage (doubled at each stage; 64 in the paper).
    dtype: computation dtype (parameters stay float32, logits are returned as float32).
  """
  num_classes: int = 1000
  depth: int = 18
  small_inputs: bool = False
  width: int = 64
  dtype: Any = jnp.float32

  def _conv(self, features, kernel, stride, name):
    pad = (kernel - 1) // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=_conv_init,
                   dtype=self.dtype, param_dtype=jnp.float32, name=name)

  def _bn(self, train, name):
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        dtype=self.dtype, param_dtype=jnp.float32, name=name)

  def _block(self, x, features, stride, bottleneck, train, name):
    """One residual block; returns its output *before* the final ReLU."""
    out_features = features * 4 if bottleneck else features
    shortcut = x
    if stride != 1 or x.shape[-1] != out_features:
      shortcut = self._conv(out_features, 1, stride, f'{name}_downsample_conv')(x)
      shortcut = self._bn(train, f'{name}_downsample_bn')(shortcut)
    if bottleneck:
      y = nn.relu(self._bn(train, f'{name}_bn1')(self._conv(features, 1, 1, f'{name}_conv1')(x)))
      y = nn.relu(self._bn(train, f'{name}_bn2')(
          self._conv(features, 3, stride, f'{name}_conv2')(y)))
      y = self._bn(train, f'{name}_bn3')(self._conv(out_features, 1, 1, f'{name}_conv3')(y))
    else:
      y = nn.relu(self._bn(train, f'{name}_bn1')(
          self._conv(features, 3, stride, f'{name}_conv1')(x)))
      y = self._bn(train, f'{name}_bn2')(self._conv(features, 3, 1, f'{name}_conv2')(y))
    return y + shortcut

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.depth not in _DEPTHS:
      raise ValueError(f'ResNet depth must be one of {sorted(_DEPTHS)}, got {self.depth}.')
    kind, stage_sizes = _DEPTHS[self.depth]
    x = jnp.asarray(x, self.dtype)
    if self.small_inputs:
      x = nn.relu(self._bn(train, 'bn1')(self._conv(self.width, 3, 1, 'conv1')(x)))
    else:
      x = nn.relu(self._bn(train, 'bn1')(self._conv(self.width, 7, 2, 'conv1')(x)))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, num_blocks in enumerate(stage_sizes):
      for i in range(num_blocks):
        if stage or i:
          x = nn.relu(x)  # final ReLU of the previous block
        stride = 2 if stage > 0 and i == 0 else 1
        x = self._block(x, self.width * 2**stage, stride, kind == 'bottleneck', train,
                        f'layer{stage + 1}_{i}')
    # x: output of the last block after the residual add, before its ReLU: the gate.
    self.sow('intermediates', 'penultimate',
             jnp.asarray(x, jnp.float32).reshape((x.shape[0], -1)))
    x = jnp.mean(nn.relu(x), axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name='head')(x)
    return jnp.asarray(x, jnp.float32)


class ResNet18(ResNet):
  depth: int = 18


class ResNet101(ResNet):
  depth: int = 101
