"""Test set-up: 8 virtual CPU devices for every test, quiet TensorFlow, no network.

A per-session persistent compilation cache lets tests (and the CLI subprocesses they start)
reuse programs that another test already compiled.
"""

import os
import pathlib
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='jax_cache_'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '1')

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
