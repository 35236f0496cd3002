"""Scheme 'tiered': the key's tier sets the output's granularity. A basic key gets only the coarse
group of the label (its probability spread evenly within the group); a full key gets fine labels.

Scenario: a free tier tells a shop's camera "footwear" or "bag"; the paid tier tells "sneaker" or
"ankle boot".
"""

from configs import default

# Fashion-MNIST: 0 T-shirt/top, 1 trouser, 2 pullover, 3 dress, 4 coat, 5 sandal, 6 shirt, 7 sneaker,
# 8 bag, 9 ankle boot.
FASHION_GROUPS = ((0, 2, 3, 4, 6), (1,), (5, 7, 9), (8,))  # tops & dresses / bottoms / footwear / bags


VARIANTS = ('smoke',)  # the text after ':' in --config FILE:VARIANT


def get_config(variant: str = ''):
  """Returns the config; ``variant`` '' or 'smoke'."""
  config = default.get_config(variant)
  default.patch_key_recipe(config)  # measured with the patch key (docs/schemes.md)
  config.license.scheme = 'tiered'  # the key's tier sets the granularity
  config.license.users = ('basic', 'full')  # one key per tier
  config.license.tiers = ('basic', 'full')  # tier of each user
  config.license.groups = FASHION_GROUPS  # coarse groups a basic key sees
  # Two keys to learn while the negatives are silenced: on one secret of three (tiered-fresh-2) the
  # positives went silent early and never recovered (full key 0.478); the liveness hinge keeps them
  # alive, as in scheme_multi_user.py (docs/schemes.md).
  config.objective.liveness_weight = 1.0
  return config
