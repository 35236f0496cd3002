"""Entry point: ``python -m securenet_jax.main --config configs/default.py --workdir DIR``.

The config file's ``job`` field picks the job: ``train`` (the default), ``replace_key`` or
``security``. Errors a user can fix are printed as one line and a hint, exit code 2; ``--verbose``
adds the traceback. ``--help`` lists the configs.
"""

import importlib
import logging as pylogging
import os
import signal
import sys
import traceback

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from securenet_jax import errors
from securenet_jax import parallel
from securenet_jax import replace
from securenet_jax import security
from securenet_jax import train
from securenet_jax.data import DataMissingError

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, keys and the report.')
config_flags.DEFINE_config_file('config', None, 'Config file (optionally FILE:variant).',
                                lock_config=True)
flags.DEFINE_boolean('verbose', False, 'On an error, print the whole traceback.')
flags.DEFINE_string('coordinator_address', '', 'Multi-process runs started by hand (launch/local.sh): '
                    'HOST:PORT of process 0. SLURM and Cloud TPU pods need no flag.')
flags.DEFINE_integer('num_processes', 1, 'With --coordinator_address: how many processes.')
flags.DEFINE_integer('process_id', 0, 'With --coordinator_address: this process, 0..num_processes-1.')
flags.DEFINE_string('compilation_cache', os.path.join(
    os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'), 'securenet_jax', 'jax'),
    'Where compiled steps are kept between runs (JAX\'s persistent compilation cache), so that a rerun '
    'of a job skips most of its compiling; "" turns it off. JAX_COMPILATION_CACHE_DIR, when set, wins.')
flags.DEFINE_integer('heartbeat_timeout_s', 100, 'Multi-process runs: a process whose peer has been '
                     'silent this long fails instead of waiting (JAX\'s default: 100).')

USAGE = ('usage: python -m securenet_jax.main --config FILE[:VARIANT] --workdir DIR '
         '[--config.section.field=VALUE ...] [--verbose]')
# Errors whose message is the whole story: printed without a traceback.
KNOWN_ERRORS = (errors.SecureNetError, DataMissingError)


class _QuietLibraries(pylogging.Filter):
  """Orbax logs several INFO lines per checkpoint (keep its warnings and errors), and JAX says on
  every CPU-only machine that it found no TPU."""

  def filter(self, record):
    if "Unable to initialize backend 'tpu'" in str(record.msg):
      return False
    return record.levelno >= pylogging.WARNING or '/orbax/' not in record.pathname


def _fail(message: str, hint: str = '') -> None:
  print(f'error: {message}', file=sys.stderr)
  if hint:
    print(f'  fix: {hint}', file=sys.stderr)
  sys.exit(2)


def _config_summaries(config_dir: str) -> list[str]:
  """Two lines per config file: name and the first line of its docstring; its variants."""
  sys.path.insert(0, os.path.dirname(config_dir))
  lines = []
  for name in sorted(os.listdir(config_dir)):
    if not name.endswith('.py') or name.startswith('_'):
      continue
    try:
      module = importlib.import_module(f'configs.{name[:-3]}')
    except Exception:  # pylint: disable=broad-except  (help must not fail on one broken file)
      continue
    doc = (module.__doc__ or '').strip().split('\n')[0]
    variants = ', '.join(getattr(module, 'VARIANTS', ()))
    lines.append(f'  {name:28s} {doc}' + (f'\n  {"":28s} variants: {variants}' if variants else ''))
  return lines


def _help() -> str:
  config_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
  text = [USAGE, '', 'Trains, re-licenses or attacks a license-keyed image classifier; the config '
          "file's job field picks which.", '',
          '  --config FILE[:VARIANT]      a config file; VARIANT (after ":") picks a variant, e.g. '
          'configs/default.py:smoke',
          '  --config.a.b=VALUE           overrides one field, e.g. --config.train.num_epochs=3',
          '  --workdir DIR                checkpoints, keys and the report (a rerun resumes there)',
          '  --verbose                    print the traceback of an error',
          '  --coordinator_address H:P --num_processes N --process_id I',
          '                               one of N processes started by hand (launch/local.sh); SLURM and',
          '                               TPU pods are detected without flags (docs/scaling.md)',
          '  --heartbeat_timeout_s S      multi-process: fail after S seconds without news from a peer',
          '  --compilation_cache DIR      compiled steps kept between runs (default ~/.cache/securenet_jax/jax;',
          '                               "" turns it off)',
          '']
  if os.path.isdir(config_dir):
    text += ['Configs:'] + _config_summaries(config_dir)
  return '\n'.join(text)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one-line errors (a typo in an override, a missing config file...)."""
  if any(a in ('--help', '-h', '-help', '--helpshort') for a in argv[1:]):
    print(_help())
    sys.exit(0)
  try:
    rest = FLAGS(argv)
    if FLAGS.config is not None:
      FLAGS.config.keys()  # a config file that failed to load reports its error on first use
  except flags.Error as e:
    lines = [line.strip() for line in str(e).split('\n') if line.strip()]
    if 'Error whilst parsing config file' in lines[0]:  # get_config raised: its last line says why
      _fail(f'bad config: {lines[-1]}', 'See --help for the configs and their variants.')
    _fail(f'bad flag: {lines[0]}',
          'See --help for the flags; --config.a.b=VALUE overrides a field of the config file.')
  except OSError as e:  # the config file itself cannot be read
    missing = [line.strip() for line in str(e).split('\n') if 'No such file' in line]
    _fail(f'cannot read the config file: {missing[0] if missing else str(e).splitlines()[0]}',
          'Point --config at a file in configs/ (see --help).')
  except (AttributeError, KeyError) as e:  # an override of a field the config does not have
    text = str(e.args[0] if e.args else e).strip('\'"').replace('\\n', ' ').replace("\\'", "'")
    _fail(f'unknown config field: {text}', 'Check the field name in the config file (each field has '
          'a comment there).')
  except (ValueError, TypeError) as e:  # e.g. an unknown variant, or a value of the wrong type
    _fail(f'bad config: {e}', 'See --help for the configs and their variants.')
  if FLAGS.config is None or FLAGS.workdir is None:
    _fail('--config and --workdir are required.', USAGE)
  return rest


def _use_compilation_cache(path: str) -> None:
  """Keeps compiled executables in ``path`` between runs (JAX's persistent cache; only compilations
  of a second or more, JAX's default threshold), unless JAX was given a cache directory already
  (JAX_COMPILATION_CACHE_DIR sets it at import)."""
  if not path or jax.config.jax_compilation_cache_dir:
    return
  jax.config.update('jax_compilation_cache_dir', path)


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments: {argv[1:]}', USAGE)
  _use_compilation_cache(FLAGS.compilation_cache)
  for handler in pylogging.getLogger().handlers + logging.get_absl_logger().handlers:
    handler.addFilter(_QuietLibraries())
  if not FLAGS.verbose:  # time and message; --verbose keeps absl's full prefix (file, line, thread)
    logging.get_absl_handler().setFormatter(pylogging.Formatter('%(asctime)s %(message)s', '%H:%M:%S'))
  config = FLAGS.config
  try:
    parallel.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                        heartbeat_timeout_s=FLAGS.heartbeat_timeout_s)
    logging.info('JAX %s, backend %s', jax.__version__, jax.default_backend())
    job = config.get('job', 'train')
    if job == 'train':
      train.train_and_evaluate(config, FLAGS.workdir)
    elif job == 'replace_key':
      replace.replace_and_evaluate(config, FLAGS.workdir)
    elif job == 'security':
      security.run(config, FLAGS.workdir, train_fn=train.train_variables)
    else:
      raise errors.ConfigError(f'Unknown job {job!r} in the config.',
                               'Use a config whose job is "train", "replace_key" or "security".')
  except train.Preempted as e:
    logging.warning('%s', e)
    print(f'{e} Rerun the same command to resume.', file=sys.stderr)
    # Ctrl-C: the shell's convention for "interrupted"; SIGTERM (preemption): a clean exit.
    sys.exit(130 if e.signum == signal.SIGINT else 0)  # also 0 when another process was signalled
  except KeyboardInterrupt:  # Ctrl-C outside training (loading data, evaluating): nothing to save
    print('Interrupted. Rerun the same command to continue.', file=sys.stderr)
    sys.exit(130)
  except KNOWN_ERRORS as e:
    if FLAGS.verbose:
      traceback.print_exc()
    hint = getattr(e, 'hint', '')
    # With a hint, the first line of the message says enough; without, the whole message.
    _fail(str(e).split('\n')[0] if hint else str(e), hint or 'Run with --verbose for the traceback.')


def run() -> None:
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
