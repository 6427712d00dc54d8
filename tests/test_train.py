"""The data-parallel train step and the CLU/Orbax loop, on configs/digits.py:tiny."""

import json
import re
import signal
import time

import chex
import jax
import numpy as np
import pytest
import tensorflow as tf

from diffusion_jax import draw, hardware, parallel, train
from diffusion_jax.errors import SetupError
from diffusion_jax.run import Run

from conftest import fixed_batch, run_main, setup, tiny_flags


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(tiny_config):
  mesh, state, step = setup(tiny_config, jax.devices())
  batch = parallel.shard_steps(mesh, fixed_batch(tiny_config, 1))
  losses = []
  for _ in range(50):
    state, metrics = step(state, batch)
    losses.append(float(metrics.compute()['loss']))
  assert int(state.step) == 50
  assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10]), losses
  assert np.isfinite(losses).all()


def test_sharded_step_equals_single_device_step(tiny_config):
  """Holds with global clipping and no dropout (per-device clipping clips each device's slice)."""
  assert jax.device_count() == 8
  tiny_config.optim.grad_clip_mode = 'global'
  assert tiny_config.model.dropout == 0
  images = fixed_batch(tiny_config, 2)
  results = []
  for devices in (jax.devices(), jax.devices()[:1]):
    mesh, state, step = setup(tiny_config, devices)
    for _ in range(2):
      state, metrics = step(state, parallel.shard_steps(mesh, images))
    results.append((jax.device_get(state.params), metrics.compute()))
  (params8, metrics8), (params1, metrics1) = results
  for name in ('loss', 'grad_norm'):
    np.testing.assert_allclose(metrics8[name], metrics1[name], rtol=1e-5)
  # Adam divides by √v: on the near-zero-initialized layers a gradient ~1e-9 becomes a ±lr
  # step, so reduction-order noise moves those params by a few % of one step (lr = 2e-3).
  chex.assert_trees_all_close(params8, params1, rtol=1e-4, atol=6e-5)


def test_per_device_clipping_depends_on_the_layout(tiny_config):
  """With per-device clipping (the original's) the step is not layout-free: the README says so."""
  tiny_config.optim.update(grad_clip_mode='per_device', grad_clip=1e-3)
  images = fixed_batch(tiny_config, 1)
  norms = []
  for devices in (jax.devices(), jax.devices()[:1]):
    mesh, state, step = setup(tiny_config, devices)
    _, metrics = step(state, parallel.shard_steps(mesh, images))
    norms.append(float(metrics.compute()['grad_norm']))
  assert norms[1] == pytest.approx(1e-3, rel=1e-3)  # one device: the clipped full gradient
  assert norms[0] < 0.999e-3  # 8 devices: the mean of 8 clipped, differently directed slices


def logged_scalars(workdir, tag: str = 'train/loss') -> dict[int, float]:
  """The ``tag`` scalars by step from the TensorBoard event files in ``workdir``."""
  scalars = {}
  for path in sorted(workdir.glob('events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        if value.tag == tag:
          scalars[event.step] = float(tf.make_ndarray(value.tensor))
  return scalars


def test_stop_and_resume_reproduce_an_uninterrupted_run(tiny_config, tmp_path):
  full = train.train_and_evaluate(Run.create(tiny_config, tmp_path / 'full'))
  half = tiny_config.copy_and_resolve_references()
  half.train.num_train_steps = 2
  train.train_and_evaluate(Run.create(half, tmp_path / 'split'))
  resumed = train.train_and_evaluate(Run.create(tiny_config, tmp_path / 'split'))
  assert int(full.step) == int(resumed.step) == 4
  chex.assert_trees_all_equal(
    *(jax.device_get((s.params, s.ema_params, s.opt_state, s.rng)) for s in (full, resumed))
  )
  full_losses, split_losses = logged_scalars(tmp_path / 'full'), logged_scalars(tmp_path / 'split')
  assert sorted(full_losses) == [2, 4]
  assert full_losses == split_losses
  grid = tmp_path / 'full' / 'samples' / 'step_00000004.png'
  assert grid.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert sorted(
    p.name for p in (tmp_path / 'full' / 'checkpoints').iterdir() if p.name.isdigit()
  ) == ['2', '4']


def test_steps_per_call_runs_the_loop_with_every_period(tiny_config, tmp_path):
  tiny_config.train.steps_per_call = 2
  state = train.train_and_evaluate(Run.create(tiny_config, tmp_path))
  assert int(state.step) == 4
  assert sorted(logged_scalars(tmp_path)) == [2, 4]


def test_invalid_settings_are_clear_errors(tiny_config, tmp_path):
  odd = tiny_config.copy_and_resolve_references()
  odd.train.update(num_train_steps=5, steps_per_call=2)
  with pytest.raises(SetupError, match='multiple of train.steps_per_call'):
    train.train_and_evaluate(Run.create(odd, tmp_path))
  tiny_config.train.batch_size = 12
  with pytest.raises(SetupError, match='divisible by the 8 devices'):
    train.train_and_evaluate(Run.create(tiny_config, tmp_path))
  with pytest.raises(SetupError, match='No checkpoints'):
    draw.sample_from_checkpoint(Run.create(tiny_config, tmp_path / 'empty'), num_samples=4)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_cli_preemption_resume_and_sample(data_dir, tmp_path):
  workdir = tmp_path / 'run'
  # From another directory, with a relative workdir (Orbax needs it made absolute).
  proc = run_main(*tiny_flags(data_dir, 'run', num_steps=400), cwd=tmp_path)
  deadline = time.time() + 300
  while not any(p.name.isdigit() for p in (workdir / 'checkpoints').glob('*')):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  signalled = time.monotonic()
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  assert 'Preempted' in out
  assert time.monotonic() - signalled < 30  # seconds, not the minutes a VM may not have left
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert 0 < steps[-1] < 400

  flags = tiny_flags(data_dir, 'run', num_steps=steps[-1] + 2)
  cache = tmp_path / 'jax cache'  # JAX's own flag, as launch/tpu.sh passes it
  out, _ = run_main(*flags, f'--jax_compilation_cache_dir={cache}', cwd=tmp_path).communicate(
    timeout=600
  )
  assert f'Resumed from step {steps[-1]}' in out, out[-3000:]
  assert any(cache.iterdir())  # compiled programs were cached there
  # The console: the run's own lines, and no INFO line of a library (Orbax, TFDS, TensorStore,
  # absl); only TensorFlow's C++ start-up notice (port.cc) gets through.
  for line in (
    'step ',
    'checkpoint of step',
    'samples of step',
    'evaluation digits at step',
    'Done:',
  ):
    assert line in out, (line, out[-3000:])
  assert 'sampling 16 (chunks): 1/1' in out  # evaluation progress
  library = [x for x in out.splitlines() if re.match(r'I\d{4} ', x) and 'port.cc' not in x]
  assert not library, library[:5]
  assert not library_warnings(out), library_warnings(out)[:5]  # a restore warns of nothing
  assert '2 local / 2 global devices (cpu)' in out  # the digits config's num_cpu_devices
  grid = workdir / 'samples' / f'step_{steps[-1] + 2:08d}.png'
  assert grid.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  confident = logged_scalars(workdir, 'eval/digits_confident_fraction')
  assert list(confident) == [steps[-1] + 2] and 0 <= confident[steps[-1] + 2] <= 1

  proc = run_main(*flags, '--mode=sample', '--num_samples=5', '--verbosity=1', cwd=tmp_path)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  assert re.search(r'checkpoint_manager\.py:\d+\]', out)  # --verbosity=1: Orbax's logs are back
  proc = run_main(*flags, '--mode=figures', cwd=tmp_path)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  assert library_warnings(out) == ['Given directory is read only'], out[-3000:]
  for name in ('progressive', 'shared_latents', 'interpolation', 'ddim_interpolation'):
    assert (workdir / 'figures' / f'{name}.png').read_bytes()[:4] == b'\x89PNG'
  assert (workdir / 'figures' / 'rate_distortion.csv').exists()
  with np.load(workdir / 'samples' / f'ema_step_{steps[-1] + 2:08d}_n5.npz') as f:
    assert f['images'].shape == (5, 8, 8, 1) and f['images'].dtype == np.uint8
    assert int(f['step']) == steps[-1] + 2 and f['images'].max() > 0


@pytest.mark.slow
def test_sigterm_during_a_sample_grid_saves_and_the_resume_draws_it_again(data_dir, tmp_path):
  """A grid of many chunks at the last step: the notice stops it at the next chunk, within
  seconds; the next run draws that grid, then evaluates, then ends."""
  workdir = tmp_path / 'run'
  flags = tiny_flags(data_dir, workdir, 4) + ['--config.train.num_sample_images=1200']
  proc = run_main(*flags)
  deadline = time.time() + 300
  while not (workdir / 'checkpoints' / '4' / 'commit_success.txt').exists():  # the grid is next
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  signalled_at = time.monotonic()
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-3000:]
  assert time.monotonic() - signalled_at < 20, 'the notice waited for the grid to end'
  assert 'Preempted (SIGTERM) at step 4' in out and 'samples of step 4' not in out
  record = json.loads((workdir / 'interrupted_actions.json').read_text())
  assert record == {'step': 4, 'actions': ['samples', 'eval digits']}
  out, _ = run_main(*flags).communicate(timeout=600)
  assert 'samples of step 4' in out and 'evaluation digits at step 4' in out, out[-3000:]
  assert 'Done: step 4' in out and not (workdir / 'interrupted_actions.json').exists()


def library_warnings(out: str) -> list[str]:
  """The WARNING lines of libraries (absl format), by message."""
  return [m.group(1) for m in re.finditer(r'^W\d{4} [^\]]*\] (.*?)(?:=.*)?$', out, re.M)]


@pytest.mark.slow
def test_cli_errors_are_clear(tmp_path):
  proc = run_main(
    '--config=configs/cifar10.py',
    f'--workdir={tmp_path / "w"}',
    f'--config.dataset.data_dir={tmp_path / "tfds"}',
  )
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode != 0
  assert 'Traceback' not in out
  assert 'download_and_prepare()' in out and str(tmp_path / 'tfds') in out


def test_mfu_is_logged_where_the_device_peak_is_known(tiny_config, tmp_path, monkeypatch):
  cpu_chip = hardware.Chip(peak_flops=1e12, hbm_bytes=hardware.GiB, devices=1)
  monkeypatch.setitem(hardware.CHIPS, jax.devices()[0].device_kind, cpu_chip)
  train.train_and_evaluate(Run.create(tiny_config, tmp_path))
  rate = logged_scalars(tmp_path, 'train/flops_per_second')
  mfu = logged_scalars(tmp_path, 'train/mfu')
  assert sorted(mfu) == sorted(rate) == sorted(logged_scalars(tmp_path)) != []
  for step, value in mfu.items():
    assert value == pytest.approx(rate[step] / (1e12 * jax.device_count()))
    assert 0 < value < 1


def test_a_step_too_big_for_the_device_stops_before_it_runs(tiny_config, tmp_path, monkeypatch):
  """On a TPU, JAX reports the device's memory: a step that needs more stops with the fix."""
  monkeypatch.setattr(hardware, 'device_bytes_limit', lambda device: 1024)
  with pytest.raises(
    SetupError, match=r'train step at train.batch_size=16 needs .* GiB per device'
  ):
    train.train_and_evaluate(Run.create(tiny_config, tmp_path))
  assert not list((tmp_path / 'checkpoints').iterdir())  # not a single step ran


def test_profile_steps_write_a_trace_tensorboard_reads(tiny_config, tmp_path):
  tiny_config.train.profile_steps = 2
  train.train_and_evaluate(Run.create(tiny_config, tmp_path))
  traces = list((tmp_path / 'plugins' / 'profile').glob('*/*.xplane.pb'))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
