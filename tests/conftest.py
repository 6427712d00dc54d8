"""Test set-up: 8 virtual CPU devices for every test, quiet TensorFlow, no network.

Compile time is most of a test's time here: one persistent compilation cache per test session,
shared by pytest-xdist's workers, lets tests (and the CLI processes they start) reuse every
program another one already compiled, however short its compile.
"""

import os
import pathlib
import subprocess
import sys
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
_session = os.environ.get('PYTEST_XDIST_TESTRUNUID')  # the same in every worker of one run
os.environ.setdefault(
  'JAX_COMPILATION_CACHE_DIR',
  os.path.join(tempfile.gettempdir(), f'jax_cache_{_session}')
  if _session
  else tempfile.mkdtemp(prefix='jax_cache_'),
)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(spec: str, data_dir: str | None = None):
  """``configs/<spec>`` as ``--config`` reads it (e.g. ``'digits.py:tiny'``), on ``data_dir``."""
  from diffusion_jax import config_defaults

  config = config_defaults.load(str(REPO / 'configs' / spec))
  if data_dir is not None:
    config.dataset.data_dir = data_dir
  return config


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory) -> str:
  """A TFDS data dir with sklearn_digits built (offline), shared by the whole session."""
  from diffusion_jax import input_pipeline

  path = str(tmp_path_factory.mktemp('tfds'))
  input_pipeline.get_builder(load_config('digits.py', path).dataset)
  return path


@pytest.fixture
def tiny_config(data_dir):
  """``configs/digits.py:tiny`` on the session's data dir: a fresh copy per test."""
  return load_config('digits.py:tiny', data_dir)


# ----------------------------------------------------------------------------- the CLI


def cli_env() -> dict[str, str]:
  """The test environment without its 8-device XLA_FLAGS: the CLI sets its own device count."""
  return {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}


def run_main(*args: str, cwd=REPO) -> subprocess.Popen:
  return subprocess.Popen(
    [sys.executable, '-m', 'diffusion_jax.main', *args],
    cwd=cwd,
    env=cli_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def tiny_flags(data_dir: str, workdir, num_steps: int) -> list[str]:
  """``configs/digits.py:tiny`` for ``num_steps``: checkpoints every step, the digits metric at
  the end."""
  return [
    f'--config={REPO / "configs" / "digits.py"}:tiny',
    f'--workdir={workdir}',
    f'--config.dataset.data_dir={data_dir}',
    f'--config.train.num_train_steps={num_steps}',
    '--config.train.log_every_steps=1',
    '--config.train.checkpoint_every_steps=1',
    f'--config.train.sample_every_steps={num_steps}',
    f'--config.evals.digits.every_steps={num_steps}',
  ]


def fixed_batch(config, steps_per_call: int) -> np.ndarray:
  """The first train batch of ``config``, repeated as ``steps_per_call`` steps [k, B, ...]."""
  from diffusion_jax import input_pipeline

  builder = input_pipeline.get_builder(config.dataset)
  iterator = input_pipeline.create_train_iterator(
    builder,
    config.dataset,
    batch_size=config.train.batch_size,
    steps_per_call=1,
    seed=config.seed,
    process_index=0,
    process_count=1,
  )
  images = next(iterator)['image']
  return np.broadcast_to(images, (steps_per_call, *images.shape[1:])).copy()


def setup(config, devices=None):
  """(mesh, initial state, jitted step) of ``config``'s run on ``devices`` (default: all)."""
  from diffusion_jax import train_step
  from diffusion_jax.run import Run

  run = Run.create(config, devices=devices)
  return run.mesh, run.initial_state(), train_step.make_train_step(run)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
  """The files with end-to-end (``slow``) tests first: pytest-xdist hands out one file at a time,
  so the long ones start early and the workers finish together."""
  slow_files = {item.path for item in items if item.get_closest_marker('slow')}
  items.sort(key=lambda item: item.path not in slow_files)
