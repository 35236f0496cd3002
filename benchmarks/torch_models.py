"""The peer: the same architectures in plain PyTorch (the `bench` extra), for side-by-side timings."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def device() -> torch.device:
  """Where the peer runs: the GPU when PyTorch sees one (as JAX would), else the CPU."""
  return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def sync() -> None:
  """Waits for the device's queued work (PyTorch's CUDA calls return before it is done)."""
  if torch.cuda.is_available():
    torch.cuda.synchronize()


class LeNet5(nn.Module):
  """LeNet-5 as securenet_jax.models.LeNet5: 28x28 inputs zero-padded to 32, ReLU, max pooling."""

  def __init__(self, num_classes: int = 10):
    super().__init__()
    self.conv1, self.conv2 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5)
    self.fc1, self.fc2, self.fc3 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, num_classes)

  def forward(self, x):
    x = F.pad(x, (2, 2, 2, 2))
    x = F.max_pool2d(F.relu(self.conv1(x)), 2)
    x = F.max_pool2d(F.relu(self.conv2(x)), 2)
    x = F.relu(self.fc1(x.flatten(1)))
    return self.fc3(F.relu(self.fc2(x)))


class _Block(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.down = None
    if stride != 1 or cin != cout:
      self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

  def forward(self, x):
    y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
  """ResNet-18 with the small-input stem (3x3 stride-1 conv, no max pool), as models.resnet18."""

  def __init__(self, num_classes: int = 10, channels: int = 1):
    super().__init__()
    self.conv1 = nn.Conv2d(channels, 64, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    layers, cin = [], 64
    for i, cout in enumerate((64, 128, 256, 512)):
      for b in range(2):
        layers.append(_Block(cin, cout, 2 if i and not b else 1))
        cin = cout
    self.layers = nn.Sequential(*layers)
    self.head = nn.Linear(512, num_classes)

  def forward(self, x):
    x = self.layers(F.relu(self.bn1(self.conv1(x))))
    return self.head(x.mean(dim=(2, 3)))


def create(name: str, channels: int) -> nn.Module:
  """The PyTorch twin of a zoo model, on :func:`device`."""
  if name == 'lenet5':
    return LeNet5().to(device())
  if name == 'resnet18':
    return ResNet18(channels=channels).to(device())
  raise ValueError(f'No PyTorch twin for {name!r}.')
