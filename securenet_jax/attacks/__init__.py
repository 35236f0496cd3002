"""Attacks a thief (weights, no key) or an adaptive attacker (weights and key) can mount, as jitted JAX
functions; ``securenet_jax.security`` runs them on a trained workdir and writes the security report.

Conventions shared by every attack module:

* A model is ``(module, variables)``: a ``flax.linen`` module and ``{'params', 'batch_stats'?}``.
* Images are float32 NHWC in [0, 1]. An attack that perturbs or stamps images works on the *clean*
  image domain; ``transform`` maps such an image to what the model sees (e.g. stamping a key:
  ``functools.partial(keys.stamp_arrays, arrays=key.arrays())``; ``None`` = identity).
* Every attack is seeded by an explicit ``jax.random`` key or ``seed`` and deterministic given it.
"""
