"""Key replacement / revocation job (securenet_jax/replace.py).

  python -m securenet_jax.main --config configs/replace_key.py \
      --config.source_workdir=OLD --config.new_secret=S --workdir NEW
  # revoke one user of a multi-user model, no new key:
  python -m securenet_jax.main --config configs/replace_key.py:revoke \
      --config.source_workdir=OLD --config.revoke=alice --workdir NEW
"""

import ml_collections


VARIANTS = ('revoke', 'smoke')  # the text after ':' in --config FILE:VARIANT


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  """Returns the config; ``variant`` '' (replacement), 'revoke' (revocation only) or 'smoke'."""
  config = ml_collections.ConfigDict()
  config.job = 'replace_key'  # selects securenet_jax.replace in main.py
  config.source_workdir = ''  # trained workdir whose key is replaced (read only)
  config.new_secret = ''  # secret of the new key ('' = revoke only)
  config.revoke = ''  # name of the key to revoke ('' = the only active key)
  config.new_key_name = ''  # name of the new key ('' = revoked name + '.r2', '.r3', ...)
  config.train_fraction = 0.5  # share of the training set used for fine-tuning
  # Fine-tuning passes over that share: 4 x 0.5 = 20% of the default's optimizer steps.
  config.num_epochs = 4
  config.learning_rate = 2e-3  # peak learning rate of the fine-tuning (warmup + cosine)
  config.warmup_steps = 20  # linear warmup steps
  # The new key's inputs start out silenced (the model rejects every key but the old one) and a
  # silenced input passes no gradient: this hinge revives them (objective.liveness_weight).
  config.liveness_weight = 1.0
  # Share of the forged negatives stamped with the revoked key(s) (the near misses take the other half
  # on the default objective, so random forged keys are left out: the source rejects them already).
  config.revoked_fraction = 0.5
  # Pull positives' pre-activations at every gated layer (the gate and objective.silence_layers) to the
  # source model's on the same image with the old key.
  config.distill_weight = 1.0
  # A source trained with distillation from its unlicensed baseline (the default) keeps distilling
  # it into the new key's positives at this weight (0 = off; sources without a baseline: off).
  config.clean_distill_weight = 1.0
  config.smoke = False  # a seconds-long test run (the :smoke variant)
  config.eval = ml_collections.ConfigDict()  # overrides of the source config's eval section
  config.eval.num_forged = 100  # forged keys in the report

  if variant == 'revoke':
    # Revocation only (no new key to learn): a gentle step, so that the keys that stay move as
    # little as possible.
    config.learning_rate = 1e-3
  elif variant == 'smoke':
    config.smoke = True  # the report says it is a smoke run
    config.train_fraction = 1.0
    config.num_epochs = 1
    config.warmup_steps = 2
    config.eval.num_forged = 3
  elif variant:
    raise ValueError(f'Unknown config variant {variant!r}; expected "", "revoke" or "smoke".')
  return config
