"""Several processes joined by ``jax.distributed`` on 127.0.0.1 (4 CPU devices each) run the CLI
together: training, checkpoints and resuming, preemption of either process, shared data and
workdir checks."""

import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, cli_env, tiny_flags

pytestmark = pytest.mark.slow


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch(flags_per_process: list[list[str]]) -> list[subprocess.Popen]:
  """One ``diffusion_jax.main`` process per flag list, joined as one 2-process job."""
  port = free_port()
  return [
    subprocess.Popen(
      [
        sys.executable,
        '-m',
        'diffusion_jax.main',
        *flags,
        '--config.num_cpu_devices=4',
        '--distributed',
        f'--coordinator_address=127.0.0.1:{port}',
        f'--num_processes={len(flags_per_process)}',
        f'--process_id={process_id}',
      ],
      cwd=REPO,
      env=cli_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for process_id, flags in enumerate(flags_per_process)
  ]


def finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[str]:
  """Every process's output, after checking each exited 0."""
  outs = [p.communicate(timeout=timeout)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


def checkpoints(workdir) -> list[int]:
  return sorted(int(p.name) for p in (workdir / 'checkpoints').glob('*') if p.name.isdigit())


def test_sigterm_to_process_0_saves_one_step_on_both(tmp_path):
  """Both processes train and checkpoint together, from a fresh data dir (process 0 builds the
  data set while process 1 waits for it), two steps per call; a notice to process 0 saves the
  same step on both. (The notice to process 1 and the resume: the next test.)"""
  data_dir, workdir = str(tmp_path / 'tfds'), tmp_path / 'run'
  extra = ['--config.train.steps_per_call=2', '--config.train.log_every_steps=2']
  flags = tiny_flags(data_dir, workdir, 100_000) + extra
  flags = [f for f in flags if 'checkpoint_every_steps' not in f and 'sample_every' not in f]
  flags += ['--config.train.checkpoint_every_steps=2', '--config.train.sample_every_steps=100000']
  procs = launch([flags] * 2)
  deadline = time.time() + 300
  while not checkpoints(workdir):  # compiled and stepping
    assert all(p.poll() is None for p in procs) and time.time() < deadline
    time.sleep(0.5)
  procs[0].send_signal(signal.SIGTERM)
  signalled_at = time.time()
  outs = finish(procs, timeout=120)
  assert time.time() - signalled_at < 60
  for process_id, out in enumerate(outs):
    assert f'JAX process {process_id} / 2, 4 local / 8 global devices (cpu)' in out, out[-3000:]
  assert 'Building sklearn_digits' in outs[0] and 'Building sklearn_digits' not in outs[1]
  preempted = [out.split('Preempted (SIGTERM) at step ')[-1].split(':')[0] for out in outs]
  assert all('Preempted (SIGTERM)' in out for out in outs), [o[-2000:] for o in outs]
  assert preempted[0] == preempted[1]  # the same step on both hosts
  step = int(preempted[0])
  assert step % 2 == 0 and checkpoints(workdir)[-1] == step


def test_sigterm_during_an_evaluation_stops_both_hosts_and_the_resume_redoes_it(data_dir, tmp_path):
  """The evaluation at the last step, many chunks long: a notice to process 1 stops it on both
  hosts at the same chunk; the state is saved, and the next run evaluates that step again."""
  workdir = tmp_path / 'run'
  flags = tiny_flags(data_dir, workdir, 4) + ['--config.evals.digits.in_loop_num_samples=1500']
  procs = launch([flags] * 2)
  deadline = time.time() + 300
  while not (workdir / 'samples' / 'step_00000004.png').exists():  # the evaluation is next
    assert all(p.poll() is None for p in procs) and time.time() < deadline
    time.sleep(0.1)
  procs[1].send_signal(signal.SIGTERM)
  signalled_at = time.time()
  outs = finish(procs, timeout=120)
  assert time.time() - signalled_at < 30, 'the notice waited for the evaluation to end'
  assert all('Preempted (SIGTERM) at step 4' in out for out in outs), [o[-2000:] for o in outs]
  assert not any('evaluation digits at step' in out for out in outs)
  assert (workdir / 'interrupted_actions.json').read_text() == (
    '{"step": 4, "actions": ["eval digits"]}'
  )
  assert checkpoints(workdir)[-1] == 4
  outs = finish(launch([flags] * 2))
  assert all('Resumed from step 4' in out for out in outs), [o[-2000:] for o in outs]
  assert all('evaluation digits at step 4' in out and 'Done: step 4' in out for out in outs)
  assert not (workdir / 'interrupted_actions.json').exists()
  assert (workdir / 'samples' / 'step_00000004.png').read_bytes()[:4] == b'\x89PNG'


def test_a_workdir_not_shared_by_all_hosts_is_a_clear_error(data_dir, tmp_path):
  procs = launch([tiny_flags(data_dir, tmp_path / f'host{i}', 2) for i in range(2)])
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode != 0 for p in procs)
  for out in outs:
    assert 'is not shared by all 2 processes' in out and 'gs://' in out, out[-3000:]
    assert 'Traceback' not in out
