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


def training_stepper(name: str, batch: int, peer: bool = False, num_batches: int = 8):
  """``run_steps(n)``: ``n`` training steps of the PyTorch twin on batches already on the device
  (compiled nothing, warmed up here), for :func:`benchmarks.common.timeit_interleaved`.

  ``peer=False``: a plain baseline step, AdamW and cross-entropy on ``batch`` images (the
  default job's optimizer). ``peer=True``: the licensing peer, the default training step of
  Authority Backdoor (Yang et al., AAAI 2026, arXiv:2512.10600), as its reference code describes it:
  the training set is held twice, every image once with a fixed trigger added in the bottom-right
  corner (saturating addition) and its true label, and once clean with a wrong label drawn once;
  each step is one forward, mean cross-entropy and one backward over a shuffled mix of the two, with
  SGD (learning rate 0.01, momentum 0.9, weight decay 5e-4). Its steps take ``2 * batch`` samples, so
  that a step covers ``batch`` training images both ways, as a licensed step of ``batch`` images
  here does (its keyed positive and its negative): throughput counts input images, the same unit.
  The peer's own loop decodes PNG files on the CPU and syncs twice a step; none of that is timed.
  The timed batches are random: each sample is triggered with probability 1/2 (the shuffled mix),
  not paired with its clean copy, and keeps its label, drawn once, over the cycled batches.
  """
  dev = device()
  gen = torch.Generator().manual_seed(0)
  net = create(name, 1)
  samples = 2 * batch if peer else batch
  if peer:
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    trigger = torch.zeros(1, 28, 28)
    trigger[:, -7:-1, -7:-1] = torch.rand(1, 6, 6, generator=gen)  # 6x6, bottom-right, 1 px inside
  else:
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
  batches = []
  for _ in range(num_batches):
    if peer:  # a shuffled mix of triggered (true label) and clean (fixed wrong label) samples
      x = torch.rand(samples, 1, 28, 28, generator=gen)
      y = torch.randint(0, 10, (samples,), generator=gen)
      triggered = torch.rand(samples, generator=gen) < 0.5
      x = torch.where(triggered[:, None, None, None], (x + trigger).clamp(max=1.0), x)
      wrong = (y + torch.randint(1, 10, (samples,), generator=gen)) % 10
      y = torch.where(triggered, y, wrong)
    else:
      x = torch.rand(samples, 1, 28, 28, generator=gen)
      y = torch.randint(0, 10, (samples,), generator=gen)
    batches.append((x.to(dev), y.to(dev)))

  def run_steps(n: int) -> None:
    for i in range(n):
      x, y = batches[i % num_batches]
      opt.zero_grad()
      F.cross_entropy(net(x), y).backward()
      opt.step()
    sync()
  run_steps(3)
  return run_steps
