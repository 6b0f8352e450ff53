"""experiments/train.py as a user runs it: a subprocess, on generated data and (integration) on real MNIST."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, SHARED_DATA

TRAIN = [sys.executable, str(REPO / 'experiments' / 'train.py')]


def train(*flags, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run(TRAIN + list(flags), capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def test_a_cli_run_produces_every_output(data_dir, tmp_path):
  result = train(f'--data_dir={data_dir}', '--data_source=files', '--epochs=2', '--batch_size=100',
                 f'--workdir={tmp_path}', '--norm=bn', '--momentum=0.9')
  assert result.returncode == 0, result.stderr[-3000:]
  for name in ('config.json', 'metrics.jsonl', 'summary.json', 'curves.png'):
    assert (tmp_path / name).is_file(), name
  assert list((tmp_path / 'checkpoints').iterdir())
  assert json.loads((tmp_path / 'config.json').read_text())['config']['momentum'] == 0.9
  assert len((tmp_path / 'metrics.jsonl').read_text().splitlines()) == 2
  assert 'completed' in result.stdout and 'test acc' in result.stdout
  assert 'epoch' in result.stderr  # the tqdm progress bar


def test_cli_resume_after_an_interruption(data_dir, tmp_path):
  common = [f'--data_dir={data_dir}', '--data_source=files', '--epochs=2', '--batch_size=100', '--progress=false']
  assert train(*common, f'--workdir={tmp_path / "whole"}').returncode == 0
  cut = train(*common, f'--workdir={tmp_path / "cut"}', '--interrupt_after_epoch=1')
  assert cut.returncode == 3, cut.stderr[-2000:]
  resumed = train(*common, f'--workdir={tmp_path / "cut"}', '--resume')
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert 'resumed from the checkpoint of epoch 1' in resumed.stdout
  drop_time = lambda m: {k: v for k, v in m.items() if 'second' not in k}
  lines = lambda d: [drop_time(json.loads(l)) for l in (tmp_path / d / 'metrics.jsonl').read_text().splitlines()]
  assert lines('cut') == lines('whole')


def test_a_diverging_cli_run_says_so_in_one_line(data_dir, tmp_path):
  result = train(f'--data_dir={data_dir}', '--data_source=files', '--epochs=2', '--batch_size=100', '--norm=none',
                 '--optimizer=sgd', '--learning_rate=10000', f'--workdir={tmp_path}', '--progress=false')
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  assert 'diverged in epoch 1' in result.stdout
  assert json.loads((tmp_path / 'summary.json').read_text())['status'] == 'diverged'


INVALID_FLAGS = [
    (['--batch_size=-1'], '--batch_size=-1'),
    (['--momentum=1.5'], '--momentum=1.5'),
    (['--norm=bn', '--rmax=2'], '--rmax=2.0'),
    (['--dropout_placement=end', '--dropout_rate=1.0'], '--dropout_rate=1.0'),
    (['--norm=batchnorm'], 'norm'),
    (['--model=resnet'], "--model='resnet' is invalid: expected a registered model (mnist_mlp"),
    (['--preset=mnist_plain_vs_bn'], "Unknown command line flag 'preset'"),
    (['--epochs=0'], '--epochs=0'),
    (['--resume'], '--resume needs the --workdir'),
]


@pytest.mark.parametrize('flags, message', INVALID_FLAGS, ids=[m for _, m in INVALID_FLAGS])
def test_invalid_flags_are_rejected_before_any_work(flags, message, tmp_path):
  result = train(*flags, f'--data_dir={tmp_path}', timeout=120)
  assert result.returncode == 2
  assert message in result.stderr, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
  assert not (REPO / 'runs').exists() or not any(p.name.startswith('seed999') for p in (REPO / 'runs').iterdir())


def test_help_documents_every_flag():
  result = train('--helpfull', timeout=120)
  for flag in ('--[no]update_stats', '--eval_stats', '--virtual_batch_size', '--renorm_clipping', '--[no]resume'):
    assert flag in result.stdout
  assert '--preset' not in result.stdout


needs_mnist = pytest.mark.skipif(
    not (SHARED_DATA / 'mnist').is_dir(), reason=f'the real MNIST is not at {SHARED_DATA / "mnist"}'
)


@pytest.mark.integration
@needs_mnist
def test_mnist_plain_vs_bn_one_epoch_on_real_mnist(tmp_path):
  """Both models reach 93% after one epoch, on the mean of three seeds.

  One seed is too noisy a bar for the BN model: Keras 3 on the same data and
  model gives 0.943, 0.924, 0.921 for seeds 0-2 (mean 0.929); bnjax gives
  0.926, 0.940, 0.933 (mean 0.933). The moving averages still hold 0.99**120
  = 30% of their initial values after one epoch of 120 steps. The study
  `mnist_plain_vs_bn` trains seed 0 (as `./launch.sh mnist_plain_vs_bn` does);
  seeds 1 and 2 train as the lanes of `repro_seed000` (a lane equals the
  single run of its seed up to float noise: tests/test_sweep.py).
  """
  from bnjax.lab import studies
  from conftest import run_script

  result = run_script('study.py', '--study=mnist_plain_vs_bn', '--epochs=1', '--seed=0', f'--data_dir={SHARED_DATA}',
                      f'--out={tmp_path}', '--progress_updates=0', '--checkpoint_every=0')
  assert result.returncode == 0, result.stderr[-3000:]
  folder = tmp_path / 'mnist_plain_vs_bn'
  assert (folder / 'curves.png').is_file()
  single = {run: json.loads((folder / run / 'summary.json').read_text())['test_accuracy'] for run in ('plain', 'bn')}
  lanes = studies.run_study('repro_seed000', tmp_path, overrides=dict(epochs=1, seeds=[1, 2], momenta=[0.99]),
                            data_dir=str(SHARED_DATA), log=lambda message: None)['results']
  accuracy = {'plain': [single['plain']] + lanes['plain']['test_accuracy'],
              'bn': [single['bn']] + lanes['bn (momentum 0.99)']['test_accuracy']}
  for run, values in accuracy.items():
    assert len(values) == 3 and sum(values) / 3 >= 0.93, (run, values)
    assert min(values) >= 0.9, (run, values)


@pytest.mark.integration
@needs_mnist
def test_moving_statistics_bug_on_real_mnist(tmp_path):
  result = train('--epochs=1', '--norm=bn', '--update_stats=false', f'--data_dir={SHARED_DATA}',
                 f'--workdir={tmp_path}', '--progress=false')
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((tmp_path / 'summary.json').read_text())
  # Measured: about 0.63 with the (never updated) moving statistics, 0.96 with batch statistics.
  assert summary['test_accuracy_moving_stats'] < 0.8
  assert summary['test_accuracy_batch_stats'] > 0.93


def test_sigint_and_sigterm_end_a_run_in_one_line_and_it_resumes_to_the_same_numbers(data_dir, tmp_path):
  """Ctrl-C in epoch 3, SIGTERM in the resumed run, then a resume to the end: exit 130 and 143 with one line
  each, the last checkpoint resumable, and the metrics of the uninterrupted run, each epoch once."""
  import signal

  from bnjax.lab import config as C
  from bnjax.lab import experiment

  settings = dict(data_dir=str(data_dir), data_source='files', epochs=8, batch_size=100, progress_updates=1)
  common = [f'--{k}={v}' for k, v in settings.items()] + ['--progress=false', f'--workdir={tmp_path / "cut"}']
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  for signum, code, flags, after in ((signal.SIGINT, 130, [], 2), (signal.SIGTERM, 143, ['--resume'], 1)):
    # SIGINT as in a terminal: a runner started in the background ignores it, and would pass that on.
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    if ignored:
      signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
      process = subprocess.Popen(TRAIN + common + flags, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 cwd=REPO, env=env)
    finally:
      if ignored:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    epochs = 0
    for line in process.stdout:
      epochs += line.startswith('epoch ')
      if epochs == after:
        break
    process.send_signal(signum)
    _, err = process.communicate(timeout=300)
    lines = err.strip().splitlines()
    assert process.returncode == code, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f'stopped by {signum.name}: ') and '--resume' in lines[0], lines
  log = []  # the last resume, and the uninterrupted run, in this process (one compile for both)
  experiment.run(C.make(dict(settings, workdir=str(tmp_path / 'cut'))), resume=True, progress=False, log=log.append)
  assert 'resumed from the checkpoint of epoch' in ' '.join(log)
  experiment.run(C.make(dict(settings, workdir=str(tmp_path / 'whole'))), progress=False, log=lambda m: None)
  drop_time = lambda m: {k: v for k, v in m.items() if 'second' not in k}
  lines = lambda d: [drop_time(json.loads(l)) for l in (tmp_path / d / 'metrics.jsonl').read_text().splitlines()]
  assert [m['epoch'] for m in lines('cut')] == list(range(1, 9))
  assert lines('cut') == lines('whole')
