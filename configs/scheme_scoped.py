"""Scheme 'scoped': the key unlocks a subset of the classes; stamped images of the other classes get
the same uninformative output as images without a key.

Scenario: a customer who paid for the clothing classes only (T-shirt, trouser, pullover, dress,
coat) gets a key that classifies those and refuses to say anything about footwear and bags.
"""

from configs import default


VARIANTS = ('smoke',)  # the text after ':' in --config FILE:VARIANT


def get_config(variant: str = ''):
  """Returns the config; ``variant`` '' or 'smoke'."""
  config = default.get_config(variant)
  default.patch_key_recipe(config)  # measured with the patch key (docs/schemes.md)
  config.license.scheme = 'scoped'  # one key, a subset of classes
  config.license.users = ('clothing',)  # the licensee's key name
  config.license.matrix = ((1, 1, 1, 1, 1, 0, 0, 0, 0, 0),)  # granted: Fashion-MNIST classes 0-4
  return config
