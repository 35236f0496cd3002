"""Model zoo: ``create(name, num_classes, **kwargs) -> flax.linen.Module``.

Every model takes NHWC float images in [0, 1], accepts ``train: bool`` in ``__call__`` and sows the
pre-activation of its penultimate layer as ``intermediates/penultimate`` (used by the licensed
objective and the leakage probes).
"""

from __future__ import annotations

import flax.linen as nn

from securenet_jax.models.lenet import LeNet5

_MODELS = {
    'lenet5': LeNet5,
}


def names() -> list[str]:
  return sorted(_MODELS)


def create(name: str, num_classes: int, **kwargs) -> nn.Module:
  """Builds a model by name.

  Args:
    name: one of :func:`names`.
    num_classes: size of the output layer.
    **kwargs: architecture options of that model (e.g. ``input_size`` for LeNet-5).
  """
  if name not in _MODELS:
    raise ValueError(f'Unknown model {name!r}; available: {names()}.')
  if num_classes < 2:
    raise ValueError(f'num_classes must be >= 2, got {num_classes}.')
  return _MODELS[name](num_classes=num_classes, **kwargs)
