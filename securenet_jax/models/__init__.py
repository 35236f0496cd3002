"""Model zoo: ``create(name, num_classes, **kwargs) -> flax.linen.Module``.

Every model takes NHWC float images in [0, 1], accepts ``train: bool`` in ``__call__`` and sows the
pre-activation of its penultimate layer as ``intermediates/penultimate`` (used by the licensed
objective and the leakage probes): a (N, D) float32 "gate" such that if all its entries are <= 0 the
features fed to the output layer are zero (within ~0.006 for the GELU network NFNet), so the logits
equal the output bias. ``create(name, num_classes)`` is the standard ImageNet architecture;
``small_inputs=True`` selects the CIFAR-style variant for 28-64 px images (all models but LeNet-5),
and ``dtype`` the computation dtype (parameters stay float32, logits are float32). The output
layer is named ``head`` (``fc3`` in LeNet-5; :func:`head_name`): adaptive gradient clipping leaves
it alone.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from securenet_jax.models.lenet import LeNet5
from securenet_jax.models.mobilenetv3 import MobileNetV3Large, MobileNetV3Small
from securenet_jax.models.nfnet import NFNet
from securenet_jax.models.resnet import ResNet18, ResNet101
from securenet_jax.models.vgg import VGG16

_MODELS = {
    'lenet5': LeNet5,
    'vgg16': VGG16,
    'resnet18': ResNet18,
    'resnet101': ResNet101,
    'nfnet_f5': NFNet,  # variant='F5' by default; ``variant`` selects F0-F7
    'mobilenetv3_large': MobileNetV3Large,
    'mobilenetv3_small': MobileNetV3Small,
}


def names() -> list[str]:
  return sorted(_MODELS)


def create(name: str, num_classes: int, **kwargs) -> nn.Module:
  """Builds a model by name.

  Args:
    name: one of :func:`names`.
    num_classes: size of the output layer.
    **kwargs: architecture options of that model (e.g. ``input_size`` for LeNet-5,
      ``small_inputs``, ``dtype``, ``batch_norm`` for VGG-16, ``variant`` for NFNet).
  """
  if name not in _MODELS:
    raise ValueError(f'Unknown model {name!r}; available: {names()}.')
  if num_classes < 2:
    raise ValueError(f'num_classes must be >= 2, got {num_classes}.')
  return _MODELS[name](num_classes=num_classes, **kwargs)


def for_inference(module: nn.Module) -> nn.Module:
  """``module`` as the inference API runs it: a LeNet-5 left at its default ``conv_impl`` (banded
  matrix products on a CPU, the fastest to train) gets ``'auto'`` (its first convolution in the direct
  form on a CPU, the fastest forward there, the same outputs to float rounding); one a config chose
  is kept; other models unchanged."""
  if isinstance(module, LeNet5) and module.conv_impl is None:
    return module.clone(conv_impl='auto')
  return module


def build(model_cfg, num_classes: int) -> nn.Module:
  """The model of a config's ``model`` section: ``name`` and ``kwargs`` (a computation ``dtype`` may
  be given by name, e.g. 'bfloat16')."""
  kwargs = dict(model_cfg.get('kwargs', {}))
  if isinstance(kwargs.get('dtype'), str):
    kwargs['dtype'] = jnp.dtype(kwargs['dtype'])
  return create(model_cfg.name, num_classes, **kwargs)


def head_name(module: nn.Module) -> str:
  """Name of the output layer's parameters: ``head``, or the model's own ``HEAD`` (LeNet-5: fc3)."""
  return getattr(module, 'HEAD', 'head')


def variables_dict(params: Any, batch_stats: Any = None) -> dict:
  """``{'params': ..., 'batch_stats': ...}`` as ``module.apply`` takes them (no empty statistics)."""
  return {'params': params, **({'batch_stats': batch_stats} if batch_stats else {})}


def as_variables(tree: Any) -> dict:
  """Accepts a variables dict (``{'params': ...}``) or bare parameters; returns a variables dict."""
  return dict(tree) if isinstance(tree, dict) and 'params' in tree else {'params': tree}

