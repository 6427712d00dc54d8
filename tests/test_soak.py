"""Soak: SIGKILL the digits CLI at 10 seeded random moments, then let it finish (slow).

Every restart must resume from the newest checkpoint that was complete when it started, and the
finished run must equal an uninterrupted one bit for bit: state, logged losses and sample grid.
"""

import collections
import dataclasses
import os
import random
import re
import signal
import threading
import time

import chex
import jax
import pytest
import tensorflow as tf

from diffusion_jax import run as run_lib
from diffusion_jax import train_state

from conftest import load_config, run_main

NUM_STEPS = 40
TMP_SUFFIX = '.orbax-checkpoint-tmp'
# What each kill waits for (shuffled with the seed): a delay from launch (in [0, 8] s, or in
# [0, 2.5] s: before JAX is up), the restore, the n-th save this process starts (its temporary
# folder in flight), the n-th step folder it completes (killed at once, or a moment later).
KILL_MODES = ['delay'] * 2 + ['early'] + ['restore'] + ['save'] * 4 + ['saved'] + ['step']
NUM_KILLS = len(KILL_MODES)  # 10
PHASES = ('start-up', 'set-up', 'restore', 'step', 'save')


def cli_flags(data_dir: str, workdir) -> list[str]:
  return [
    '--config=configs/digits.py:tiny',
    f'--workdir={workdir}',
    f'--config.dataset.data_dir={data_dir}',
    f'--config.train.num_train_steps={NUM_STEPS}',
    '--config.train.log_every_steps=1',
    '--config.train.checkpoint_every_steps=1',
    '--config.train.keep_checkpoints=3',
    f'--config.train.sample_every_steps={NUM_STEPS}',
    '--config.evals.digits.every_steps=0',
    '--verbosity=0',  # Orbax's INFO lines ('Saving checkpoint at step N') time the kills
  ]


def kill_schedule(rng: random.Random) -> list[tuple[str, object]]:
  """(mode, argument) of each kill: seconds for 'delay'/'early', n for 'save'/'saved', (n,
  seconds) for 'step'."""
  modes = list(KILL_MODES)
  rng.shuffle(modes)
  schedule = []
  for mode in modes:
    if mode in ('delay', 'early'):
      schedule.append((mode, round(rng.uniform(0, 8 if mode == 'delay' else 2.5), 2)))
    elif mode in ('save', 'saved'):
      schedule.append((mode, rng.randint(1, 3)))
    elif mode == 'step':
      schedule.append((mode, (rng.randint(1, 3), round(rng.uniform(0, 0.4), 2))))
    else:
      schedule.append((mode, None))
  return schedule


def listing(ckpt_dir) -> list[str]:
  try:
    return sorted(os.listdir(ckpt_dir), key=lambda n: (len(n), n))
  except FileNotFoundError:
    return []


def complete_steps(ckpt_dir) -> set[int]:
  """Steps Orbax finalized: renamed from the temporary name, with commit and metadata files."""
  return {
    int(name)
    for name in listing(ckpt_dir)
    if name.isdigit()
    and os.path.exists(os.path.join(ckpt_dir, name, 'commit_success.txt'))
    and os.path.exists(os.path.join(ckpt_dir, name, '_CHECKPOINT_METADATA'))
  }


def in_flight(ckpt_dir) -> set[int]:
  """Steps with a temporary folder (a save not finalized)."""
  names = [n.split('.')[0] for n in listing(ckpt_dir) if TMP_SUFFIX in n]
  return {int(n) for n in names if n.isdigit()}


class Run:
  """One CLI process and what its log said, read as it comes."""

  def __init__(self, args: list[str]):
    self.started = time.monotonic()
    self.proc = run_main(*args)
    self.lines: list[str] = []
    self.jax_up = self.restoring = False
    self.resumed: int | None = None
    self.saving: list[int] = []  # steps whose save started, in order
    self.finished: set[int] = set()  # steps whose save was finalized
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self) -> None:
    for line in self.proc.stdout:
      self.lines.append(line)
      if 'JAX process' in line:
        self.jax_up = True
      elif 'Restoring checkpoint' in line:
        self.restoring = True
      elif m := re.search(r'Resumed from step (\d+)', line):
        self.resumed = int(m[1])
      elif m := re.search(r'Saving checkpoint at step (\d+)', line):
        self.saving.append(int(m[1]))
      elif m := re.search(r'Finished saving checkpoint .*/(\d+)`', line):
        self.finished.add(int(m[1]))

  def elapsed(self) -> float:
    return time.monotonic() - self.started

  def wait(self, kill: bool = False, timeout: float = 300) -> str:
    """Its whole output, once it ended (killed with SIGKILL if ``kill``)."""
    if kill:
      self.proc.send_signal(signal.SIGKILL)
    self.proc.wait(timeout)
    self._reader.join(30)
    return ''.join(self.lines)

  def start_step(self) -> int | None:
    """The step it resumed from (0: a fresh start), None if it died before deciding."""
    return self.resumed if self.resumed is not None else (0 if self.saving else None)

  def phase(self, ckpt_dir) -> str:
    """Where it was when it died: a save in flight is one it started whose folder is temporary."""
    if in_flight(ckpt_dir) & (set(self.saving) - self.finished):
      return 'save'
    if self.saving:
      return 'step'
    if self.restoring and self.resumed is None:
      return 'restore'
    return 'set-up' if self.jax_up else 'start-up'


def wait_for_moment(run: Run, ckpt_dir, mode: str, arg, complete_at_launch: set[int]) -> None:
  """Returns at the moment ``(mode, arg)`` names; fails if the process ends first."""
  step_time = None
  while run.proc.poll() is None:
    assert run.elapsed() < 300, f'no kill moment {mode} {arg} after 300 s'
    if mode in ('delay', 'early'):
      if run.elapsed() >= arg:
        return
    elif mode == 'restore':
      if run.restoring or run.saving:  # a fresh start (nothing to restore): at its first save
        return
    elif mode == 'save':
      if len(run.saving) >= arg and in_flight(ckpt_dir) & set(run.saving[arg - 1 :]):
        return
    else:
      n, delay = (arg, 0.0) if mode == 'saved' else arg
      if step_time is None and len(complete_steps(ckpt_dir) - complete_at_launch) >= n:
        step_time = time.monotonic()
      if step_time is not None and time.monotonic() - step_time >= delay:
        return
    time.sleep(0.002)
  out = run.wait()
  pytest.fail(
    f'the run ended (exit {run.proc.returncode}) before its kill moment {mode} {arg}; '
    f'checkpoints: {listing(ckpt_dir)}\n{out[-3000:]}'
  )


def check_resume(run: Run, ckpt_dir, complete_at_launch: set[int], previous: int, name: str):
  """The step ``run`` resumed from is the newest complete one at its launch (or fresh if none)."""
  start = run.start_step()
  if start is None:
    return previous
  expected = max(complete_at_launch, default=0)
  assert start == expected and start >= previous, (
    f'{name} resumed from step {start}; complete at its launch: {sorted(complete_at_launch)}, '
    f'previous restart from {previous}; checkpoints now: {listing(ckpt_dir)}\n'
    f'{"".join(run.lines)[-3000:]}'
  )
  return start


def event_losses(workdir) -> dict[int, set[float]]:
  """Every ``train/loss`` in ``workdir``'s TensorBoard files by step (killed writers: up to the
  last whole record)."""
  losses = collections.defaultdict(set)
  for path in sorted(workdir.glob('events.out.tfevents.*')):
    try:
      for event in tf.compat.v1.train.summary_iterator(str(path)):
        for value in event.summary.value:
          if value.tag == 'train/loss':
            losses[event.step].add(float(tf.make_ndarray(value.tensor)))
    except tf.errors.DataLossError:
      pass
  return losses


def printed_losses(output: str) -> dict[int, set[str]]:
  losses = collections.defaultdict(set)
  for step, loss in re.findall(r'\[(\d+)\] train/.*train/loss=(\S+)', output):
    losses[int(step)].add(loss)
  return losses


@dataclasses.dataclass
class Kill:
  """One kill: the moment it waited for, when it came, where the process was and had started."""

  mode: str
  arg: object
  at: float  # seconds after launch
  phase: str
  start_step: int | None
  complete: int | None  # newest complete step after the kill


@pytest.mark.slow
def test_sigkill_at_10_random_moments_loses_nothing(data_dir, tmp_path):
  began = time.monotonic()
  reference, soak = tmp_path / 'reference', tmp_path / 'soak'
  ckpt_dir = soak / 'checkpoints'
  logs = tmp_path / 'logs'
  logs.mkdir()

  run = Run(cli_flags(data_dir, reference))
  reference_out = run.wait()
  (logs / 'reference.log').write_text(reference_out)
  assert run.proc.returncode == 0, reference_out[-3000:]

  outputs, kills, previous = [], [], 0
  for i, (mode, arg) in enumerate(kill_schedule(random.Random(0))):
    complete_at_launch = complete_steps(ckpt_dir)
    run = Run(cli_flags(data_dir, soak))
    wait_for_moment(run, ckpt_dir, mode, arg, complete_at_launch)
    at = run.elapsed()
    outputs.append(run.wait(kill=True))
    (logs / f'{i:02d}_{mode}.log').write_text(outputs[-1])
    assert run.proc.returncode == -signal.SIGKILL, outputs[-1][-3000:]
    complete = max(complete_steps(ckpt_dir), default=None)
    kills.append(Kill(mode, arg, at, run.phase(ckpt_dir), run.start_step(), complete))
    previous = check_resume(run, ckpt_dir, complete_at_launch, previous, f'restart {i}')

  complete_at_launch = complete_steps(ckpt_dir)
  run = Run(cli_flags(data_dir, soak))
  outputs.append(run.wait())
  (logs / 'final.log').write_text(outputs[-1])
  assert run.proc.returncode == 0, outputs[-1][-3000:]
  check_resume(run, ckpt_dir, complete_at_launch, previous, 'the final run')
  assert run.start_step() is not None

  by_phase = collections.Counter(k.phase for k in kills)
  resumed = [k.start_step for k in kills if k.start_step is not None]
  print(
    f'\nsoak: {NUM_KILLS} SIGKILLs by phase: '
    + ', '.join(f'{p} {by_phase[p]}' for p in PHASES)
    + f'; {len(resumed)} killed runs had started, each at the newest complete step ({resumed}),'
    f' the final run at {run.start_step()}; {time.monotonic() - began:.0f} s'
  )
  for i, k in enumerate(kills):
    print(
      f'  kill {i:2d}: {k.mode:7s} {k.arg!s:11s} at {k.at:5.2f} s  phase {k.phase:8s} '
      f'started at {k.start_step!s:4s} complete up to {k.complete}'
    )
  assert by_phase['save'] >= 3, by_phase

  # The same checkpoints, state (bit for bit), losses and sample grid as the uninterrupted run.
  assert listing(ckpt_dir) == listing(reference / 'checkpoints')
  config = load_config('digits.py:tiny', data_dir)
  abstract = run_lib.Run.create(config).abstract_state()
  states = [train_state.restore_latest(w, abstract) for w in (reference, soak)]
  trees = [jax.device_get((s.step, s.params, s.ema_params, s.opt_state, s.rng)) for s in states]
  assert int(trees[0][0]) == NUM_STEPS
  chex.assert_trees_all_equal(*trees)

  expected = event_losses(reference)
  assert sorted(expected) == list(range(1, NUM_STEPS + 1))
  logged = event_losses(soak)
  assert logged and all(logged[s] == expected[s] for s in logged), (dict(logged), dict(expected))
  printed_expected = printed_losses(reference_out)
  printed = printed_losses(''.join(outputs))  # killed runs' too, flushed or not
  assert printed and all(printed[s] == printed_expected[s] for s in printed), printed
  grid = f'samples/step_{NUM_STEPS:08d}.png'
  assert (soak / grid).read_bytes() == (reference / grid).read_bytes()
  print(f'  equal to the uninterrupted run: state, losses at {len(printed)} steps, sample grid')
