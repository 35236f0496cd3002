"""On-device data augmentation: pure functions of (batch, PRNG key), for use inside the jitted step."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def crop_flip(images: jax.Array, rng: jax.Array, pad: int = 4, flip: bool = True) -> jax.Array:
  """The standard CIFAR augmentation: per example, a random ``H x W`` crop of the image zero-padded
  by ``pad`` pixels on each side, then a horizontal flip with probability 1/2.

  Args:
    images: (N, H, W, C) batch, any dtype (float in training). Padding uses 0 in the batch's own
      scale (black for [0, 1] images).
    rng: a PRNG key; each example draws its own offset and flip from it.
    pad: padding in pixels (a Python int: it fixes shapes); 0 disables the crop.
    flip: whether to flip (a Python bool).

  Returns:
    A batch of the same shape and dtype. Pure and jittable; vmapped over the batch.
  """
  if images.ndim != 4:
    raise ValueError(f'crop_flip expects an (N, H, W, C) batch, got shape {images.shape}.')
  if pad < 0:
    raise ValueError(f'pad must be >= 0, got {pad}.')
  n, h, w, c = images.shape
  crop_rng, flip_rng = jax.random.split(rng)
  offsets = jax.random.randint(crop_rng, (n, 2), 0, 2 * pad + 1)
  flips = jax.random.bernoulli(flip_rng, 0.5, (n,)) if flip else jnp.zeros((n,), bool)
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0))) if pad else images

  def one(image, offset, flip_it):
    out = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c)) if pad else image
    return jnp.where(flip_it, out[:, ::-1, :], out) if flip else out

  return jax.vmap(one)(padded, offsets, flips)


def gaussian_noise(images: jax.Array, rng: jax.Array, max_std: float) -> jax.Array:
  """Additive Gaussian noise, its std drawn per example uniformly in [0, ``max_std``], clipped to
  [0, 1] (float images). Some examples stay nearly clean, so clean accuracy pays little.

  In training it runs on the clean image before any key is stamped, so a licensed step sees the same
  noisy image on both sides (positive and negatives: only the key separates them, and the key stays
  exact), and the baseline trains with it too. It makes a model less sensitive to small input changes:
  the defense against adversarial images transferred from a surrogate model, which need neither the
  weights' gradients nor the key (docs/security.md).
  """
  if max_std < 0:
    raise ValueError(f'noise std must be >= 0, got {max_std}.')
  std_rng, noise_rng = jax.random.split(rng)
  std = jax.random.uniform(std_rng, (images.shape[0],) + (1,) * (images.ndim - 1), images.dtype,
                           maxval=max_std)
  return jnp.clip(images + std * jax.random.normal(noise_rng, images.shape, images.dtype), 0.0, 1.0)


def from_config(cfg) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The training augmentation of a config's ``augment`` section as ``f(images, rng) -> images``.

  Fields: ``crop_flip`` (bool), ``crop_pad`` (pixels), ``noise_std`` (>= 0; 0 = off). Each
  augmentation draws from its own stream (``fold_in(rng, 0)`` crop and flip, ``fold_in(rng, 1)``
  noise), so switching one on does not change the other's randomness.

  Raises:
    ValueError: a negative noise std or crop padding.
  """
  crop_flip_on, pad, noise_std = bool(cfg.crop_flip), int(cfg.crop_pad), float(cfg.noise_std)
  if noise_std < 0:
    raise ValueError(f'augment.noise_std must be >= 0, got {noise_std}.')
  if pad < 0:
    raise ValueError(f'augment.crop_pad must be >= 0, got {pad}.')

  def augment(images: jax.Array, rng: jax.Array) -> jax.Array:
    if crop_flip_on:
      images = crop_flip(images, jax.random.fold_in(rng, 0), pad=pad)
    if noise_std > 0:
      images = gaussian_noise(images, jax.random.fold_in(rng, 1), noise_std)
    return images

  return augment
