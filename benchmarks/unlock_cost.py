"""What unlocking costs: SecureNet's key stamp against model-parameter encryption (Deep-Lock style).

  python -m benchmarks.unlock_cost [--out benchmarks/results] [--models lenet5,resnet18,resnet101]

SecureNet (Li et al., 2024) claims its unlocking costs at least 95% less than model-parameter
encryption. The peer here follows Deep-Lock (Alam et al., 2020): every byte of every float32 weight
is XORed with a keystream byte and substituted through the AES S-box; unlocking decrypts all weights
(inverse S-box, XOR) before the model can run. The implementation is vectorized numpy (table lookups
and XOR over the whole weight buffer), with a PCG64 keystream standing in for AES-CTR's: both are
faster than the S-box pass. Two costs per model:

* unlock once: decrypt every weight (Deep-Lock) vs stamp the key on one request's batch (SecureNet);
* per request, with the weights kept encrypted at rest: decrypt + forward vs stamp + forward.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from securenet_jax import keys
from securenet_jax import models


def aes_sbox() -> np.ndarray:
  """The AES S-box (FIPS-197), computed: multiplicative inverse in GF(2^8), then the affine map."""
  def mul(a, b):
    p = 0
    for _ in range(8):
      if b & 1:
        p ^= a
      carry = a & 0x80
      a = (a << 1) & 0xFF
      if carry:
        a ^= 0x1B
      b >>= 1
    return p
  inverse = [0] * 256
  for a in range(1, 256):
    inverse[a] = next(b for b in range(1, 256) if mul(a, b) == 1)
  sbox = np.zeros(256, np.uint8)
  for a in range(256):
    x, s = inverse[a], inverse[a]
    for _ in range(4):
      x = ((x << 1) | (x >> 7)) & 0xFF
      s ^= x
    sbox[a] = s ^ 0x63
  return sbox


SBOX = aes_sbox()
INV_SBOX = np.argsort(SBOX).astype(np.uint8)


def encrypt(weights: np.ndarray, keystream: np.ndarray) -> np.ndarray:
  return SBOX[weights.view(np.uint8) ^ keystream]


def decrypt(cipher: np.ndarray, key: int) -> np.ndarray:
  """Everything unlocking costs: the keystream from the key, inverse S-box, XOR, back to float32."""
  keystream = np.random.Generator(np.random.PCG64(key)).integers(0, 256, cipher.size, np.uint8)
  return (INV_SBOX[cipher] ^ keystream).view(np.float32)


MODELS = {  # name -> (create kwargs, input shape)
    'lenet5': ({}, (28, 28, 1)),
    'resnet18': ({'small_inputs': True}, (32, 32, 3)),
    'resnet101': ({'small_inputs': True}, (32, 32, 3)),
}


def run(names, out_dir: str, batch: int) -> list[dict]:
  rows = []
  for name in names:
    kwargs, shape = MODELS[name]
    module = models.create(name, 10, **kwargs)
    variables = module.init(jax.random.key(0), jnp.zeros((1, *shape)), train=False)
    flat = np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(variables)])
    key_int = 12345
    keystream = np.random.Generator(np.random.PCG64(key_int)).integers(0, 256, flat.size * 4, np.uint8)
    cipher = encrypt(flat, keystream)
    assert np.array_equal(decrypt(cipher, key_int), flat)  # the round trip is exact
    key = keys.derive('bench', keys.Geometry('patch', shape, size=6, position=(shape[0] - 7, shape[1] - 7)))
    arrays = jax.device_put(key.arrays())
    images = jax.device_put(np.random.default_rng(0).random((batch, *shape)).astype(np.float32))
    stamp = jax.jit(keys.stamp_arrays)
    floor = jax.jit(lambda x: x * 1.0)  # a copy of the batch (XLA drops the * 1.0): about a jitted call's cost
    # Like for like with the decryption, which runs in numpy on the host: the same stamp in numpy.
    host_images, host_arrays = np.asarray(images), jax.device_get(arrays)
    host_stamp = lambda: np.clip(host_images * host_arrays.keep + host_arrays.add, 0.0, 1.0)
    np.testing.assert_allclose(host_stamp(), np.asarray(stamp(images, arrays)), atol=1e-6)
    forward = jax.jit(lambda v, x: module.apply(v, x, train=False))
    stamped_forward = jax.jit(lambda v, x, a: module.apply(v, keys.stamp_arrays(x, a), train=False))
    # All six take turns in each round: the machine's drift (and the first calls' warm-up of its
    # thread pool) hits them alike.
    t = common.timeit_interleaved({
        'decrypt': lambda: decrypt(cipher, key_int),
        'stamp': lambda: stamp(images, arrays).block_until_ready(),
        'floor': lambda: floor(images).block_until_ready(),
        'host stamp': host_stamp,
        'forward': lambda: forward(variables, images).block_until_ready(),
        'stamped forward': lambda: stamped_forward(variables, images, arrays).block_until_ready()})
    decrypt_s, stamp_s, host_stamp_s = t['decrypt'], t['stamp'], t['host stamp']
    forward_s, stamped_s = t['forward'], t['stamped forward']
    rows.append({'model': name, 'parameters': f'{flat.size:,}', 'batch': batch,
                 'Deep-Lock unlock (decrypt all) s': decrypt_s,
                 'SecureNet unlock (stamp the batch, jitted) s': stamp_s,
                 'unlock ratio': decrypt_s / stamp_s,
                 'jitted x * 1.0 (dispatch floor) s': t['floor'],
                 'SecureNet unlock (stamp the batch, numpy on the host) s': host_stamp_s,
                 'unlock ratio, both in numpy on the host': decrypt_s / host_stamp_s,
                 'per request, Deep-Lock (decrypt + forward) s': decrypt_s + forward_s,
                 'per request, SecureNet (stamped forward) s': stamped_s,
                 'per-request ratio': (decrypt_s + forward_s) / stamped_s,
                 'SecureNet saving': f'{100 * (1 - stamped_s / (decrypt_s + forward_s)):.1f}%'})
  common.write(out_dir, 'unlock_cost', rows, list(rows[0]), 'Unlocking: key stamp vs parameter decryption',
               'Deep-Lock-style decryption (AES S-box + keystream XOR over every weight byte, vectorized '
               'numpy) against stamping the key on one request batch, jitted on the device (its time '
               'is mostly dispatch) and in numpy on the host like the decryption; times are medians of 7 '
               'rounds, the six timings of a model taking turns in each.')
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='benchmarks/results')
  parser.add_argument('--models', default='lenet5,resnet18,resnet101')
  parser.add_argument('--batch', type=int, default=1)
  args = parser.parse_args()
  print(common.device_line())
  run(args.models.split(','), args.out, args.batch)


if __name__ == '__main__':
  main()
