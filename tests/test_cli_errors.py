"""The user's mistakes on the command line, run as a user runs them (``python -m
diffusion_jax.main`` / ``diffusion_jax.convert``): each is one paragraph on stderr naming the
setting and the fix, exit status 2, no traceback and nothing printed after it.

Each start of the CLI costs seconds (imports), so the runs that need no trained workdir start
together, two at a time, when the first test asks for one; tests then read their outcome.
"""

import os
import pathlib
import re
import subprocess
import sys
from concurrent import futures

import numpy as np
import pytest

from diffusion_jax import train, workdir_config
from diffusion_jax.errors import SetupError
from diffusion_jax.run import Run

from conftest import REPO, cli_env, load_config

TINY = f'--config={REPO / "configs" / "digits.py"}:tiny'
LOG_LINE = re.compile(r'[IWEF]\d{4} ')  # an absl log line
PARALLEL_RUNS = 2  # the cores of the target machine

# Every problem of the issue in one run (all problems come in one message): field -> value.
BAD_FIELDS = {
  'train.keep_checkpoints': '0',
  'train.checkpoint_every_steps': '0',
  'train.log_every_steps': '0',
  'train.sample_every_steps': '0',
  'train.num_train_steps': '0',
  'train.batch_size': '0',
  'optim.learning_rate': '-0.001',
  'num_cpu_devices': '0',
  'model.ch': '48',
  'model.ch_mult': '(1,1,1,1,1)',
  'model.attn_resolutions': '(3,)',
  'diffusion.beta_schedule': 'linaer',
  'dataset.name': 'cifarr10',
}


def cli(*args: str, module: str = 'main') -> tuple[int, str]:
  """(exit status, stdout and stderr) of ``python -m diffusion_jax.<module> args``."""
  run = subprocess.run(
    [sys.executable, '-m', f'diffusion_jax.{module}', *args],
    cwd=REPO,
    env=cli_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    timeout=300,
  )
  return run.returncode, run.stdout


def error_of(status: int, out: str) -> str:
  """The ``error:`` paragraph of a run, after checking that it is the one clean way out."""
  assert status == 2, out[-3000:]
  assert 'Traceback' not in out and 'Event loop is closed' not in out, out[-3000:]
  lines = out.rstrip('\n').splitlines()
  starts = [i for i, line in enumerate(lines) if line.startswith('error: ')]
  assert len(starts) == 1, out[-3000:]
  assert starts[0] <= 8, out[-3000:]  # before it: at most TF's and JAX's start-up lines
  paragraph = lines[starts[0] :]
  assert not any(LOG_LINE.match(line) for line in paragraph), out[-3000:]  # nothing after it
  return '\n'.join(paragraph)


def read_only_folder(tmp: pathlib.Path) -> str | None:
  """A folder this user cannot create anything in (root writes read-only folders: then /sys)."""
  folder = tmp / 'read_only'
  folder.mkdir()
  folder.chmod(0o555)
  for candidate in (str(folder), '/sys'):
    try:
      os.mkdir(os.path.join(candidate, 'probe'))
      os.rmdir(os.path.join(candidate, 'probe'))
    except OSError:
      return candidate
  return None


class Runs:
  """The file's CLI runs that need no trained workdir, started together (``PARALLEL_RUNS`` at a
  time); ``runs[name]`` waits for one: (exit status, output)."""

  def __init__(self, tmp: pathlib.Path, data_dir: str):
    self.tmp = tmp
    (tmp / 'file').write_text('')
    (tmp / 'broken.py').write_text('def get_config(:\n  pass\n')
    self.read_only = read_only_folder(tmp)
    for name, config_json in (('ddpm', '{"_class_name": "UNet2DModel"}'), ('ddpm_json', '{"a": ')):
      (tmp / name).mkdir()
      garbage = np.random.default_rng(0).bytes(300)
      (tmp / name / 'diffusion_pytorch_model.safetensors').write_bytes(garbage)
      (tmp / name / 'config.json').write_text(config_json)
    work = f'--workdir={tmp / "run"}'
    problems = [f'--config.{field}={value}' for field, value in BAD_FIELDS.items()]
    convert = ['--source=diffusers', TINY, f'--workdir={tmp / "converted"}']
    commands = {
      'unknown_field': [TINY, work, '--config.no_such=1'],
      'near_field': [TINY, work, '--config.model.chh=64'],
      'field_elsewhere': [TINY, work, '--config.ch=64'],
      'bad_value': [TINY, work, '--config.train.batch_size=abc'],
      'unknown_mode': [TINY, work, '--mode=bogus'],
      'bad_flag': [TINY, work, '--worddir=w'],
      'config_missing': ['--config=configs/nope.py', work, '--config.seed=1'],
      'config_variant': ['--config=configs/digits.py:huge', work],
      'config_syntax': [f'--config={tmp / "broken.py"}', work],
      'config_problems': [TINY, work, f'--config.dataset.data_dir={data_dir}', *problems],
      'num_samples_0': [TINY, work, '--mode=sample', '--num_samples=0'],
      'num_samples_negative': [TINY, work, '--mode=sample', '--num_samples=-5'],
      'workdir_file': [TINY, f'--workdir={tmp / "file"}'],
      'workdir_under_file': [TINY, f'--workdir={tmp / "file" / "run"}'],
      'workdir_read_only': [TINY, f'--workdir={self.read_only}/run'],
      'debug_flag_error': [TINY, work, '--config.no_such=1', '--debug'],
      'verbosity_setup_error': [TINY, work, '--mode=sample', '--num_samples=0', '--verbosity=1'],
      'convert_weights': [*convert, f'--checkpoint={tmp / "ddpm"}'],
      'convert_config_json': [*convert, f'--checkpoint={tmp / "ddpm_json"}'],
    }
    self._pool = futures.ThreadPoolExecutor(PARALLEL_RUNS)
    self._runs = {
      name: self._pool.submit(
        cli, *args, module=name.split('_')[0] if 'convert' in name else 'main'
      )
      for name, args in commands.items()
    }

  def __getitem__(self, name: str) -> tuple[int, str]:
    return self._runs[name].result()

  def close(self) -> None:
    self._pool.shutdown(cancel_futures=True)
    (self.tmp / 'read_only').chmod(0o755)


@pytest.fixture(scope='module')
def runs(tmp_path_factory, data_dir):
  started = Runs(tmp_path_factory.mktemp('cli'), data_dir)
  yield started
  started.close()


# ----------------------------------------------------------------------------- the workdir's run


@pytest.fixture(scope='module')
def trained(runs, tmp_path_factory, data_dir) -> str:
  """A workdir of 2 train steps of digits.py:tiny (config.json with T=20, ch=32), trained while
  the other runs go on."""
  config = load_config('digits.py:tiny', data_dir)
  config.train.update(num_train_steps=2, sample_every_steps=2)
  workdir = str(tmp_path_factory.mktemp('trained'))
  train.train_and_evaluate(Run.create(config, workdir))
  return workdir


def test_the_workdir_config_in_process(trained, data_dir):
  config = load_config('digits.py:tiny', data_dir)
  workdir_config.check(config, trained, allow_change=False)
  config.diffusion.num_diffusion_timesteps = 10
  with pytest.raises(SetupError, match='num_diffusion_timesteps: the run in .* with 20, .* for 10'):
    workdir_config.check(config, trained, allow_change=False)


def test_sampling_with_another_process_needs_allow_config_change(trained, data_dir):
  args = [
    TINY,
    f'--workdir={trained}',
    f'--config.dataset.data_dir={data_dir}',
    '--mode=sample',
    '--num_samples=4',
    '--config.diffusion.num_diffusion_timesteps=10',
  ]
  message = error_of(*cli(*args))
  assert (
    f'diffusion.num_diffusion_timesteps: the run in {trained} was trained with 20, the config '
    'asks for 10' in message
  )
  assert '--config.diffusion.num_diffusion_timesteps=20' in message
  assert '--allow_config_change' in message
  status, out = cli(*args, '--allow_config_change')
  assert status == 0, out[-3000:]
  with np.load(os.path.join(trained, 'samples', 'ema_step_00000002_n4.npz')) as f:
    assert f['images'].shape == (4, 8, 8, 1)


def test_another_model_stops_before_the_checkpoint_is_read(trained, data_dir):
  args = [TINY, f'--workdir={trained}', f'--config.dataset.data_dir={data_dir}']
  status, out = cli(*args, '--config.model.ch=64')
  message = error_of(status, out)
  assert f'model.ch: the run in {trained} was trained with 32, the config asks for 64' in message
  assert 'CheckpointManager' not in out and 'partial_restore' not in out  # Orbax untouched


# ----------------------------------------------------------------------------- flags


@pytest.mark.parametrize(
  'name, expected',
  [
    (
      'unknown_field',
      [
        "--config.no_such=1: the config has no field 'no_such' (",
        'Fields under config: dataset, diffusion, eval, evals, model,',
      ],
    ),
    ('near_field', ["no field 'model.chh'", 'Did you mean --config.model.ch?']),
    ('field_elsewhere', ['Did you mean --config.model.ch?']),
    ('bad_value', ['--config.train.batch_size=abc', 'takes an int']),
    ('unknown_mode', ['--mode=bogus: value should be one of <train|sample|eval|figures>']),
    ('bad_flag', ["Unknown command line flag 'worddir'", 'workdir']),
    ('config_missing', ['--config=configs/nope.py: there is no file', 'configs/digits.py']),
    (
      'config_variant',
      ["the config file failed: ValueError: Unknown digits config variant 'huge'"],
    ),
    ('config_syntax', ['broken.py: the config file is not valid Python: invalid syntax']),
  ],
)
def test_command_line_mistakes(runs, name, expected):
  message = error_of(*runs[name])
  for text in expected:
    assert text in message


# ----------------------------------------------------------------------------- the config


def test_every_config_problem_is_in_one_message(runs):
  lines = error_of(*runs['config_problems']).splitlines()
  assert lines[0] == f'error: the config has {len(BAD_FIELDS)} problems:'
  assert len(lines) == 1 + len(BAD_FIELDS)
  assert not (runs.tmp / 'run').exists()  # stopped before anything was written


@pytest.mark.parametrize('field', BAD_FIELDS)
def test_config_problem(runs, field):
  lines = error_of(*runs['config_problems']).splitlines()
  line = next(x for x in lines if x.startswith(f'  {field}='))
  assert f'--config.{field}' in line  # the fix


# ----------------------------------------------------------------------------- main's flags


@pytest.mark.parametrize('name, value', [('num_samples_0', '0'), ('num_samples_negative', '-5')])
def test_num_samples_must_be_positive(runs, name, value):
  message = error_of(*runs[name])
  assert f'--num_samples={value} must be >= 1' in message and '--num_samples=64' in message


@pytest.mark.parametrize('case', ['file', 'under_file', 'read_only'])
def test_unusable_workdirs(runs, case):
  if case == 'read_only' and runs.read_only is None:
    pytest.skip('no read-only folder here')
  workdir, expected = {
    'file': (runs.tmp / 'file', 'is a file, not a folder'),
    'under_file': (runs.tmp / 'file' / 'run', f'cannot be created: {runs.tmp / "file"} is a file'),
    'read_only': (f'{runs.read_only}/run', 'cannot be written'),
  }[case]
  message = error_of(*runs[f'workdir_{case}'])
  assert message.startswith(f'error: --workdir={workdir} ') and expected in message


@pytest.mark.parametrize(
  'name, expected',
  [
    ('debug_flag_error', 'AttributeError'),
    ('verbosity_setup_error', 'SetupError: --num_samples=0 must be >= 1'),
  ],
)
def test_a_traceback_on_request(runs, name, expected):
  status, out = runs[name]
  assert status == 1 and 'Traceback' in out and expected in out


# ----------------------------------------------------------------------------- convert


@pytest.mark.parametrize(
  'name, expected',
  [
    ('convert_weights', 'ddpm/diffusion_pytorch_model.safetensors is not a readable safetensors'),
    ('convert_config_json', 'ddpm_json/config.json is not JSON ('),
  ],
)
def test_convert_garbage_files(runs, name, expected):
  message = error_of(*runs[name])
  assert expected in message and 'download it again' in message
  assert not (runs.tmp / 'converted').exists()
