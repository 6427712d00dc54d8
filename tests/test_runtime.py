"""Runtime checks: a run refuses a platform it was not asked for, on one process."""

import subprocess
import sys
import types

import jax
import ml_collections
import pytest

from diffusion_jax import runtime
from diffusion_jax.errors import SetupError

from conftest import REPO, cli_env, load_config, tiny_flags


def test_a_tpu_vm_running_on_its_cpu_is_refused(tmp_path, monkeypatch):
  chip = tmp_path / 'accel0'
  chip.write_text('')
  monkeypatch.setattr(runtime, 'TPU_DEVICE_GLOB', str(tmp_path / 'accel*'))
  monkeypatch.setattr(runtime, 'asked_platforms', lambda: '')  # nothing asked: JAX's choice
  with pytest.raises(SetupError, match=r'TPU chips .*accel0.* JAX started on the CPU.*lsof'):
    runtime.check_platform()


def test_the_cpu_asked_for_on_a_tpu_vm_is_allowed(tmp_path, monkeypatch):
  (tmp_path / 'accel0').write_text('')
  monkeypatch.setattr(runtime, 'TPU_DEVICE_GLOB', str(tmp_path / 'accel*'))
  assert runtime.asked_platforms() == 'cpu'  # the tests run with JAX_PLATFORMS=cpu
  runtime.check_platform()


@pytest.mark.slow
def test_an_asked_for_tpu_that_does_not_start_is_a_clear_error(data_dir, tmp_path):
  env = {**cli_env(), 'JAX_PLATFORMS': 'tpu'}
  proc = subprocess.run(
    [sys.executable, '-m', 'diffusion_jax.main', *tiny_flags(data_dir, tmp_path / 'run', 2)],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  out = proc.stdout + proc.stderr
  assert proc.returncode != 0 and 'Traceback' not in out
  assert "JAX could not start the platform asked for (jax_platforms='tpu')" in out, out[-3000:]
  assert 'launch/tpu.sh stop' in out
  assert not (tmp_path / 'run').exists()  # refused before anything was written


def test_steps_per_call_defaults_to_one_on_a_cpu_and_ten_elsewhere(monkeypatch):
  train = ml_collections.ConfigDict({'steps_per_call': 3})
  assert runtime.steps_per_call(train) == 3
  train = load_config('cifar10.py').train
  assert train.steps_per_call is None
  assert runtime.steps_per_call(train) == 1  # this CPU
  tpu = types.SimpleNamespace(platform='tpu')
  monkeypatch.setattr(jax, 'devices', lambda *a: [tpu])
  assert runtime.steps_per_call(train) == 10
