"""The benchmarks run (at tiny sizes, without PyTorch) and write their tables; no timing is asserted
except what holds by orders of magnitude."""

import json

import numpy as np
import pytest

from benchmarks import inference as inference_bench
from benchmarks import train_throughput
from benchmarks import unlock_cost


def test_aes_sbox_and_the_decryption_round_trip():
  assert (unlock_cost.SBOX[0], unlock_cost.SBOX[1], unlock_cost.SBOX[0x53]) == (0x63, 0x7C, 0xED)
  assert sorted(unlock_cost.SBOX.tolist()) == list(range(256))
  weights = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
  stream = np.random.Generator(np.random.PCG64(7)).integers(0, 256, weights.size * 4, np.uint8)
  cipher = unlock_cost.encrypt(weights, stream)
  assert not np.array_equal(cipher.view(np.float32), weights)
  np.testing.assert_array_equal(unlock_cost.decrypt(cipher, 7), weights)


def test_alternating_timer_takes_turns_call_by_call():
  import time  # pylint: disable=g-import-not-at-top
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  calls = []
  fns = {'slow': lambda: (calls.append('slow'), time.sleep(0.004)),
         'fast': lambda: calls.append('fast')}
  seconds = common.timeit_alternating(fns, rounds=3, min_s=0.04)
  assert seconds['slow'] >= 0.004 > seconds['fast']
  timed = calls[4:]  # after a warm-up call and a sizing call of each
  assert len(timed) % 2 == 0 and timed.count('slow') == timed.count('fast') >= 3 * 3
  pairs = [tuple(sorted(timed[i:i + 2])) for i in range(0, len(timed), 2)]
  assert set(pairs) == {('fast', 'slow')}  # each call of one is next to a call of the other


def test_main_loop_takes_turns_with_the_device_step():
  import time  # pylint: disable=g-import-not-at-top
  from securenet_jax import keys  # pylint: disable=g-import-not-at-top
  dataset = train_throughput._dataset(16, 32)  # pylint: disable=protected-access
  config = train_throughput._config('lenet5', 16, 32)  # pylint: disable=protected-access
  key = keys.derive('bench', keys.Geometry.from_config(config.key, dataset.image_shape))
  turns = []

  def step(n):
    turns.append(n)
    time.sleep(0.002 * n)

  loop, in_turns = train_throughput.main_loop(config, dataset, key, licensed=False, device=step)
  # Metrics reads at steps 10, 20, 30 and 32 (the last): a turn of the step after each but the first.
  assert turns == [10, 10, 2]
  assert loop > 0 and 0 < in_turns <= 22 * 16 / (0.002 * 22)


def test_unlock_cost_writes_its_table(tmp_path):
  rows = unlock_cost.run(['lenet5'], str(tmp_path), batch=1)
  assert rows[0]['unlock ratio'] > 1 and rows[0]['unlock ratio, both in numpy on the host'] > 1 and (tmp_path / 'unlock_cost.md').exists()
  assert json.loads((tmp_path / 'unlock_cost.json').read_text())['machine']['backend'] == 'cpu'


@pytest.mark.slow
def test_inference_and_training_benchmarks_run(tmp_path):
  rows = inference_bench.run(['lenet5'], [8], str(tmp_path), with_torch=False)
  assert rows[0]['api img/s'] > 0 and 'exported img/s' in rows[0]
  assert rows[0]['jitted forward, XLA conv img/s'] > 0  # the CPU's direct first convolution, side by side
  assert rows[0]['jitted forward, numpy in/out img/s'] > 0 and rows[0]['api / jitted numpy'] > 0
  assert rows[0]['api / jitted numpy, alternating calls'] > 0
  rows = train_throughput.run(['lenet5'], [32], 12, str(tmp_path), with_torch=False, rounds=1)
  assert rows[0]['licensed main loop img/s'] > 0 and (tmp_path / 'train_throughput.md').exists()
  assert rows[0]['licensed loop / step'] > 0 and rows[0]['baseline loop / step'] > 0  # taking turns
  # On the CPU: LeNet-5's default form and XLA's convolution, both timed in the same rounds.
  assert [r['conv'] for r in rows] == ['default', 'xla'] and rows[0]['licensed step vs xla'] > 0


@pytest.mark.slow
def test_training_benchmark_times_the_pytorch_peers_in_the_same_rounds(tmp_path):
  pytest.importorskip('torch')  # the bench extra
  rows = train_throughput.run(['lenet5'], [16], 12, str(tmp_path), with_torch=True, rounds=1)
  default = rows[0]
  assert default['torch baseline img/s'] > 0 and default['peer licensed step img/s'] > 0
  assert default['licensed device step / peer'] > 0 and default['baseline device step / torch'] > 0


@pytest.mark.parametrize('name', sorted(train_throughput.KWARGS))
def test_training_benchmark_configs_gate_layers_their_model_has(name):
  # The default's extra gated layers are LeNet-5's: ResNet-18's step used to fail on 'fc1'.
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from securenet_jax import models  # pylint: disable=g-import-not-at-top
  config = train_throughput._config(name, 8, 1)  # pylint: disable=protected-access
  module = models.build(config.model, 10)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False))
  assert set(config.objective.silence_layers) <= set(shapes['params'])
  assert (config.objective.clean_distill_weight > 0) == (name == 'lenet5')  # the job's teacher: LeNet-5's


def test_all_benchmarks_in_one_command_report_a_failure_and_run_the_rest(tmp_path, monkeypatch):
  from benchmarks import __main__ as all_benchmarks  # pylint: disable=g-import-not-at-top
  ran = []

  def broken(*args, **kwargs):
    raise RuntimeError('broken on purpose')

  monkeypatch.setattr(unlock_cost, 'run', broken)
  monkeypatch.setattr(inference_bench, 'run',
                      lambda names, sizes, out, with_torch: ran.append((names, sizes, out)))
  assert all_benchmarks.main(['--only', 'unlock_cost,inference', '--no_torch', '--out', str(tmp_path),
                              '--inference_models', 'lenet5']) == 1
  assert ran == [(['lenet5'], [1, 64, 1024, 4096], str(tmp_path))]
  with pytest.raises(SystemExit):
    all_benchmarks.main(['--only', 'inference,nonsense'])
