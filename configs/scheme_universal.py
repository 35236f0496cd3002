"""Scheme 'universal': one key unlocks every class (the base SecureNet). Same as default.py.

Scenario: a company sells a model to one customer; the customer's key unlocks the whole model.
"""

from configs import default


VARIANTS = ('smoke',)  # the text after ':' in --config FILE:VARIANT


def get_config(variant: str = ''):
  """Returns the config; ``variant`` '' or 'smoke'."""
  config = default.get_config(variant)
  default.patch_key_recipe(config)  # measured with the patch key (docs/schemes.md)
  config.license.scheme = 'universal'  # one key, every class
  return config
