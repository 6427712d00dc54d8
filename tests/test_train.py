"""The data-parallel train step and the CLU/Orbax loop, on a tiny model over the digits data."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow as tf

from configs import digits
from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import input_pipeline, sampling, train

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(data_dir: str, **train_overrides):
  """The digits config shrunk to seconds: 8x8 images, one level, 20 diffusion steps."""
  config = digits.get_config()
  config.dataset.data_dir = data_dir
  config.dataset.image_size = 8
  config.model.ch_mult = (1,)
  config.model.attn_resolutions = ()
  config.diffusion.num_diffusion_timesteps = 20
  config.optim.warmup_steps = 1
  config.train.update(
    batch_size=16,
    num_train_steps=4,
    log_every_steps=2,
    checkpoint_every_steps=2,
    sample_every_steps=4,
    num_sample_images=8,
  )
  config.train.update(train_overrides)
  config.eval.every_steps = 0
  return config


def fixed_batch(config, steps_per_call: int) -> np.ndarray:
  config = config.copy_and_resolve_references()
  config.train.steps_per_call = 1
  images = next(input_pipeline.create_train_iterator(config, process_index=0, process_count=1))[
    'image'
  ]
  return np.broadcast_to(images, (steps_per_call, *images.shape)).copy()


def setup(config, devices):
  mesh = sampling.make_mesh(devices)
  model = train.create_model(config)
  optimizer = train.create_optimizer(config)
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  state = train.init_train_state(config, model, optimizer, mesh)
  step = train.make_train_step(config, model, diffusion, optimizer, mesh)
  return mesh, state, step


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(data_dir):
  config = tiny_config(data_dir, steps_per_call=10)
  mesh, state, step = setup(config, jax.devices())
  batch = train.global_batch(mesh, fixed_batch(config, 10))
  losses = []
  for _ in range(5):
    state, metrics = step(state, batch)
    losses.append(float(metrics.compute()['loss']))
  assert int(state.step) == 50
  assert losses[-1] < 0.7 * losses[0], losses
  assert np.isfinite(losses).all()


def test_sharded_step_equals_single_device_step(data_dir):
  assert jax.device_count() == 8
  config = tiny_config(data_dir, steps_per_call=2)
  config.optim.grad_clip_mode = 'global'
  images = fixed_batch(config, 2)
  results = []
  for devices in (jax.devices(), jax.devices()[:1]):
    mesh, state, step = setup(config, devices)
    for _ in range(2):
      state, metrics = step(state, train.global_batch(mesh, images))
    results.append((jax.device_get(state.params), metrics.compute()))
  (params8, metrics8), (params1, metrics1) = results
  for name in ('loss', 'grad_norm'):
    np.testing.assert_allclose(metrics8[name], metrics1[name], rtol=1e-5)
  # Adam divides by √v: on the near-zero-initialized layers a gradient ~1e-9 becomes a ±lr
  # step, so reduction-order noise moves those params by a few % of one step (lr = 1e-3).
  for a, b in zip(jax.tree.leaves(params8), jax.tree.leaves(params1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-5)


def test_ema_starts_as_params_and_follows_decay(data_dir):
  config = tiny_config(data_dir)
  config.optim.ema_decay = 0.9
  mesh, state, step = setup(config, jax.devices())
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.ema_params)):
    np.testing.assert_array_equal(a, b)
  before = jax.device_get(state.ema_params)
  state, _ = step(state, train.global_batch(mesh, fixed_batch(config, 1)))
  after, params = jax.device_get(state.ema_params), jax.device_get(state.params)
  for e0, e1, p in zip(jax.tree.leaves(before), jax.tree.leaves(after), jax.tree.leaves(params)):
    np.testing.assert_allclose(e1, 0.9 * e0 + 0.1 * p, rtol=1e-5, atol=1e-7)


def logged_scalars(workdir: pathlib.Path, tag: str = 'train/loss') -> dict[int, float]:
  """The ``tag`` scalars by step from the TensorBoard event files in ``workdir``."""
  scalars = {}
  for path in sorted(workdir.glob('events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        if value.tag == tag:
          scalars[event.step] = float(tf.make_ndarray(value.tensor))
  return scalars


def test_stop_and_resume_reproduce_an_uninterrupted_run(data_dir, tmp_path):
  full = train.train_and_evaluate(tiny_config(data_dir), str(tmp_path / 'full'))
  train.train_and_evaluate(tiny_config(data_dir, num_train_steps=2), str(tmp_path / 'split'))
  resumed = train.train_and_evaluate(tiny_config(data_dir), str(tmp_path / 'split'))
  assert int(full.step) == int(resumed.step) == 4
  for a, b in zip(
    jax.tree.leaves(jax.device_get(full.params)), jax.tree.leaves(jax.device_get(resumed.params))
  ):
    np.testing.assert_array_equal(a, b)
  full_losses, split_losses = logged_scalars(tmp_path / 'full'), logged_scalars(tmp_path / 'split')
  assert sorted(full_losses) == [2, 4]
  assert full_losses == split_losses
  assert (tmp_path / 'full' / 'samples' / 'step_00000004.png').exists()
  assert sorted(
    p.name for p in (tmp_path / 'full' / 'checkpoints').iterdir() if p.name.isdigit()
  ) == ['2', '4']


def test_invalid_settings_are_clear_errors(data_dir, tmp_path):
  with pytest.raises(train.SetupError, match='multiple of train.steps_per_call'):
    train.train_and_evaluate(
      tiny_config(data_dir, num_train_steps=5, steps_per_call=2), str(tmp_path)
    )
  with pytest.raises(train.SetupError, match='divisible by the 8 devices'):
    train.train_and_evaluate(tiny_config(data_dir, batch_size=12), str(tmp_path))
  with pytest.raises(train.SetupError, match='No checkpoints'):
    train.sample_from_checkpoint(tiny_config(data_dir), str(tmp_path / 'empty'), num_samples=4)


# ----------------------------------------------------------------------------- end to end


def cli_env() -> dict[str, str]:
  """The test environment without its 8-device XLA_FLAGS: the CLI sets its own device count."""
  return {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}


def run_main(*args: str, cwd: pathlib.Path = REPO) -> subprocess.Popen:
  return subprocess.Popen(
    [sys.executable, '-m', 'diffusion_jax.main', *args],
    cwd=cwd,
    env=cli_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def tiny_flags(data_dir: str, workdir: pathlib.Path | str, num_steps: int) -> list[str]:
  return [
    f'--config={REPO / "configs" / "digits.py"}',
    f'--workdir={workdir}',
    f'--config.dataset.data_dir={data_dir}',
    '--config.dataset.image_size=8',
    '--config.model.ch_mult=(1,)',
    '--config.model.attn_resolutions=()',
    '--config.diffusion.num_diffusion_timesteps=20',
    '--config.train.batch_size=16',
    f'--config.train.num_train_steps={num_steps}',
    '--config.train.log_every_steps=1',
    '--config.train.checkpoint_every_steps=1',
    f'--config.train.sample_every_steps={num_steps}',
    '--config.train.num_sample_images=8',
    f'--config.eval.every_steps={num_steps}',
    '--config.eval.in_loop_num_samples=16',
    '--config.eval.batch_size=16',
  ]


@pytest.mark.slow
def test_cli_preemption_resume_and_sample(data_dir, tmp_path):
  workdir = tmp_path / 'run'
  # From another directory, with a relative workdir (Orbax needs it made absolute).
  flags = tiny_flags(data_dir, 'run', num_steps=400)
  proc = run_main(*flags, cwd=tmp_path)
  deadline = time.time() + 300
  while not any(p.name.isdigit() for p in (workdir / 'checkpoints').glob('*')):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  assert 'Preempted' in out
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert 0 < steps[-1] < 400

  flags = tiny_flags(data_dir, 'run', num_steps=steps[-1] + 2)
  out, _ = run_main(*flags, cwd=tmp_path).communicate(timeout=600)
  assert f'Resumed from step {steps[-1]}' in out, out[-3000:]
  assert '2 local / 2 global devices (cpu)' in out  # the digits config's num_cpu_devices
  assert (workdir / 'samples' / f'step_{steps[-1] + 2:08d}.png').exists()
  confident = logged_scalars(workdir, 'eval/digits_confident_fraction')
  assert list(confident) == [steps[-1] + 2] and 0 <= confident[steps[-1] + 2] <= 1

  proc = run_main(*flags, '--mode=sample', '--num_samples=5', cwd=tmp_path)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  with np.load(workdir / 'samples' / f'ema_step_{steps[-1] + 2:08d}_n5.npz') as f:
    assert f['images'].shape == (5, 8, 8, 1) and f['images'].dtype == np.uint8


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


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume_together(data_dir, tmp_path):
  """Two processes x 4 CPU devices joined by jax.distributed on 127.0.0.1 run the CLI together."""
  import socket

  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  workdir = tmp_path / 'run'

  def launch(num_steps: int) -> list[str]:
    procs = []
    for process_id in range(2):
      procs.append(
        subprocess.Popen(
          [
            sys.executable,
            '-m',
            'diffusion_jax.main',
            *tiny_flags(data_dir, workdir, num_steps),
            '--config.num_cpu_devices=4',
            '--distributed',
            f'--coordinator_address=127.0.0.1:{port}',
            '--num_processes=2',
            f'--process_id={process_id}',
          ],
          cwd=REPO,
          env=cli_env(),
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
        )
      )
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
      assert p.returncode == 0, out[-3000:]
    return outs

  outs = launch(2)
  assert all('process 0 / 2' in outs[0] or 'process 1 / 2' in out for out in outs)
  assert '8 global devices' in outs[0]
  outs = launch(4)
  assert all('Resumed from step 2' in out for out in outs)
  assert (workdir / 'samples' / 'step_00000004.png').exists()
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps[-1] == 4
