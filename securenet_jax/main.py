"""Entry point: ``python -m securenet_jax.main --config configs/default.py --workdir DIR``."""

import logging as pylogging
import signal
import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from securenet_jax import parallel
from securenet_jax import replace
from securenet_jax import security
from securenet_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, keys and the report.')
config_flags.DEFINE_config_file('config', None, 'Config file (optionally FILE:variant).',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietOrbax(pylogging.Filter):
  """Orbax logs several INFO lines per checkpoint; keep its warnings and errors only."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  for handler in pylogging.getLogger().handlers + logging.get_absl_logger().handlers:
    handler.addFilter(_QuietOrbax())
  config = FLAGS.config
  if config.get('distributed') is not None:
    parallel.maybe_initialize_distributed(config.distributed)
  logging.info('JAX %s, backend %s', jax.__version__, jax.default_backend())
  job = config.get('job', 'train')
  try:
    if job == 'train':
      train.train_and_evaluate(config, FLAGS.workdir)
    elif job == 'replace_key':
      replace.replace_and_evaluate(config, FLAGS.workdir)
    elif job == 'security':
      security.run(config, FLAGS.workdir, train_fn=train.train_variables)
    else:
      raise app.UsageError(f'Unknown job {job!r} in the config; expected "train", "replace_key" or '
                           f'"security".')
  except train.Preempted as e:
    logging.warning('%s Rerun the same command to resume.', e)
    # Ctrl-C: the shell's convention for "interrupted"; SIGTERM (preemption): a clean exit.
    sys.exit(130 if e.signum == signal.SIGINT else 0)


if __name__ == '__main__':
  app.run(main)
