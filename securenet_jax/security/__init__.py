"""The security suite: every attack of the threat model (docs/design.md) against a trained workdir,
next to the unprotected baseline trained beside it, in one report.

  python -m securenet_jax.main --config configs/security.py --config.target_workdir=W --workdir OUT

Sections (``config.sections``), each a function below returning (flat figures, nested details):

1. ``forgery``: random forged keys (distribution, mean, max), near keys (the true key with a growing
   share of its pixels re-randomized) and shifted keys (moved 1-4 px).
2. ``leakage``: argmin of the no-key logits, a logistic probe on them, a probe on the penultimate
   features (white box).
3. ``recovery``: Neural-Cleanse-style trigger inversion on 1% of the labeled training data
   (whole image and each image quadrant, several mask penalties; the thief keeps the best).
4. ``removal``: fine-tuning the stolen weights without the key on 1/5/10% of the labeled data vs
   the same architecture from scratch on the same data; magnitude pruning 10-90%.
5. ``theft``: every transfer move of a thief with the weights and 1/5/10% of the labels
   (re-initialized top layers, new heads on frozen lower layers, probes on every layer, re-opened
   gates), each against training from scratch, for the licensed and the unprotected model.
6. ``adversarial``: L-inf FGSM/PGD against (a) the unprotected model, (b) the licensed pipeline
   attacked without the key (gradients through no key, a forged key, or a surrogate model trained on
   the thief's own data; the best of them), (c) an adaptive attacker who has the key.
7. ``backdoor``: (a) the thief fine-tunes the stolen weights on poisoned key-less data (BadNets patch,
   Blend), attack success rate (ASR) on licensed inputs (trigger, then key); (b) poisoned data in the
   owner's own (shortened) licensed training, next to an unprotected model trained on the same data.

All figures are on the test split; randomness is seeded by ``config.seed``.
"""

from __future__ import annotations

import time

import ml_collections
from absl import logging

from securenet_jax import errors
from securenet_jax import metrics
from securenet_jax import parallel
from securenet_jax import workdir as workdir_lib
from securenet_jax.security import report
from securenet_jax.security import sections as sections_lib

SECTIONS = ('forgery', 'leakage', 'recovery', 'keysearch', 'removal', 'theft', 'adversarial', 'backdoor')


def _wanted_sections(config) -> list[str]:
  # --config.sections=a,b arrives as one string: accept commas inside the entries too.
  entries = [config.sections] if isinstance(config.sections, str) else config.sections
  wanted = {part.strip() for entry in entries for part in entry.split(',') if part.strip()}
  unknown = wanted - set(SECTIONS)
  if unknown:
    raise errors.ConfigError(f'Unknown security sections {sorted(unknown)}; available: {SECTIONS}.')
  return [name for name in SECTIONS if name in wanted]


def run(config: ml_collections.ConfigDict, workdir: str, train_fn: sections_lib.TrainFn) -> dict:
  """Runs the configured sections on ``config.target_workdir`` and writes WORKDIR/report.

  Args:
    config: configs/security.py.
    workdir: where the report (and the models the backdoor section trains) go.
    train_fn: the owner's training procedure, for the sections that retrain
      (``sections.TrainFn``).

  Returns:
    The flat figures of security.json, rounded as written there.
  """
  wanted = _wanted_sections(config)
  wd = workdir_lib.Workdir(workdir)
  if wd.same_as(config.target_workdir or '/nonexistent'):
    raise errors.ConfigError('--workdir must differ from the target workdir (the report goes there).')
  t = sections_lib.load_target(config)
  flat, sections, timings = {}, {}, {}
  for name in wanted:
    t0 = time.perf_counter()
    logging.info('Security section %s...', name)
    if name == 'backdoor':
      f, d = sections_lib.backdoor(t, config, wd.sub('backdoor'), train_fn)
    else:
      f, d = getattr(sections_lib, name)(t, config)
    timings[name] = time.perf_counter() - t0
    logging.info('Section %s (%.0fs): %s', name, timings[name], metrics.rounded(f))
    flat.update(f)
    sections[name] = dict(d, figures=f)
    # After each section: nothing finished is lost on a crash. One process writes.
    if parallel.is_primary():
      report.write(wd.report_dir, config, flat, sections, timings)
  return metrics.rounded(flat)
