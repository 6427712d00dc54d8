"""Test set-up: 8 virtual CPU devices for every test, quiet TensorFlow, no network.

A per-session persistent compilation cache lets tests (and the CLI subprocesses they start)
reuse programs that another test already compiled.
"""

import os
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='jax_cache_'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '1')

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory) -> str:
  """A TFDS data dir with sklearn_digits built (offline), shared by the whole session."""
  from configs import digits
  from diffusion_jax import input_pipeline

  path = str(tmp_path_factory.mktemp('tfds'))
  config = digits.get_config()
  config.dataset.data_dir = path
  input_pipeline.get_builder(config)
  return path
