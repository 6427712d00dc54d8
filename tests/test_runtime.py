"""Runtime checks: a run refuses a platform it was not asked for, on one process."""

import subprocess
import sys
import types

import jax
import ml_collections
import pytest

from diffusion_jax import accelerator, runtime
from diffusion_jax.errors import SetupError

from conftest import REPO, cli_env, load_config, tiny_flags


def fake_chips(monkeypatch, folder, *names):
  """This host's TPU device files are ``names`` in ``folder`` (``accel0``, ``vfio/0``)."""
  for name in names:
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text('')
  globs = (str(folder / 'accel*'), str(folder / 'vfio' / '[0-9]*'))
  monkeypatch.setattr(accelerator, 'TPU_DEVICE_GLOBS', globs)
  monkeypatch.delenv(accelerator.TPU_ENV, raising=False)


@pytest.mark.parametrize('chip', ['accel0', 'vfio/0'])  # v2-v4 and v5p; v5e, v6e and TPU7x
def test_a_tpu_vm_running_on_its_cpu_is_refused(tmp_path, monkeypatch, chip):
  fake_chips(monkeypatch, tmp_path, chip, 'vfio/vfio')  # vfio's own control file is no chip
  assert accelerator.tpu_chips() == [str(tmp_path / chip)] and accelerator.kind() == 'tpu'
  monkeypatch.setattr(runtime, 'asked_platforms', lambda: '')  # nothing asked: JAX's choice
  name = chip.replace('/', '.')
  with pytest.raises(SetupError, match=rf'TPU chips .*{name}.* JAX started on the CPU.*lsof'):
    runtime.check_platform()


def test_a_tpu_host_known_by_its_environment_is_a_tpu_host(tmp_path, monkeypatch):
  fake_chips(monkeypatch, tmp_path)
  assert accelerator.kind() == 'cpu'
  monkeypatch.setenv(accelerator.TPU_ENV, 'v5litepod-1')
  monkeypatch.setattr(runtime, 'asked_platforms', lambda: '')
  assert accelerator.kind() == 'tpu'
  with pytest.raises(SetupError, match=rf'{accelerator.TPU_ENV} is set.* JAX started on the CPU'):
    runtime.check_platform()


def test_the_cpu_asked_for_on_a_tpu_vm_is_allowed(tmp_path, monkeypatch):
  fake_chips(monkeypatch, tmp_path, 'accel0')
  assert runtime.asked_platforms() == 'cpu'  # the tests run with JAX_PLATFORMS=cpu
  runtime.check_platform()


def test_the_accelerator_command_prints_the_kind():
  script = REPO / 'diffusion_jax' / 'accelerator.py'  # as launch/tpu.sh runs it: no package
  out = subprocess.run([sys.executable, script], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == accelerator.kind()


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
