"""The train loop against its own step: how close ``bash launch/digits.sh``'s loop runs to the
speed of the isolated train step, and where the rest of the time goes.

  python -m benchmarks.loop_speed [--repeats=3] [--steps=1200] [--profile]

Two kinds of process, alternating (loop, step, loop, step, ...):

- the loop: ``train.train_and_evaluate`` on ``configs/digits.py`` as shipped (the input pipeline,
  the checks, the metric logs, CLU's progress), ``--steps`` steps, no evaluation; its rate is the
  median of CLU's ``steps_per_sec`` over the log intervals after the first;
- the step: ``benchmarks.jax_child --what=train``, the same step on a fixed batch, timed call by
  call (blocking on each).

The table gives each process's steps/s and the ratio loop / step. ``--profile`` runs one more loop
under py-spy (a sampling profiler: ``pip install py-spy``) and splits the main thread's time into
the train step's call (dispatch and waiting for the device), the next input batch (tf.data), its
move to the devices, CLU's progress actions, the metric log, checkpoints and the rest.
"""

import collections
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile

from absl import app, flags

from benchmarks import common

_REPEATS = flags.DEFINE_integer('repeats', 3, 'Alternating processes of each kind.')
_STEPS = flags.DEFINE_integer('steps', 1200, 'Optimizer steps of each loop.')
_PROFILE = flags.DEFINE_bool('profile', False, 'Also profile one loop with py-spy.')
# Where the loop's main thread spends its time: the first frame (innermost last) that matches.
CATEGORIES = (
  ('train step call (dispatch, waiting for the device)', ('step_fn(',)),
  ('next input batch (tf.data)', ('next(train_iter)',)),
  ('batch to the devices', ('shard_steps',)),
  ('progress actions (CLU)', ('action(each_step)',)),
  ('metric log', ('metric_log(', 'running.compute()', '_check_finite')),
  ('checkpoints', ('train_state.save', 'should_save')),
  ('preemption check', ('stop_requested',)),
)


def loop_command(steps: int) -> list[str]:
  return common.module_command('jax_child', '--what=loop', '--config=digits', f'--steps={steps}')


def step_command() -> list[str]:
  return common.module_command('jax_child', '--what=train', '--config=digits', '--steps=200')


def profile(steps: int) -> dict[str, float]:
  """Shares of the loop's main-thread samples by category (py-spy, idle included)."""
  py_spy = shutil.which('py-spy') or str(pathlib.Path(sys.executable).with_name('py-spy'))
  with tempfile.TemporaryDirectory() as folder:
    out = pathlib.Path(folder) / 'stacks.txt'
    command = [py_spy, 'record', '--idle', '--threads', '--format', 'raw', '--rate', '200']
    command += ['-o', str(out), '--', *loop_command(steps)]
    subprocess.run(
      command, cwd=common.REPO, env=common.child_env(), check=True, capture_output=True
    )
    counts = collections.Counter()
    for line in out.read_text().splitlines():
      stack, _, count = line.rpartition(' ')
      if 'MainThread' not in stack.split(';')[0] or '_train (' not in stack:
        continue  # the steady loop only: not start-up, not the other threads
      frames = stack.split(';')
      counts[category(frames)] += int(count)
  total = sum(counts.values())
  return {name: counts[name] / total for name, _ in [*CATEGORIES, ('other', ())]}


def category(frames: list[str]) -> str:
  """The category of a stack: the first of ``CATEGORIES`` one of whose marks a frame holds."""
  for name, marks in CATEGORIES:
    if any(mark in frame for frame in frames for mark in marks):
      return name
  return 'other'


def main(argv):
  del argv
  print(f'Machine: {common.machine()}\n')
  results = common.alternate(
    {
      'loop': (loop_command(_STEPS.value), common.child_env()),
      'step': (step_command(), common.child_env()),
    },
    _REPEATS.value,
  )
  loop_rates = [1 / r['seconds'] for r in results['loop']]
  step_rates = [1 / r['seconds'] for r in results['step']]
  loop, step = statistics.median(loop_rates), statistics.median(step_rates)
  rows = [
    ('the loop (train.train_and_evaluate, digits)', ', '.join(f'{x:.1f}' for x in loop_rates)),
    ('the isolated step (jax_child --what=train)', ', '.join(f'{x:.1f}' for x in step_rates)),
  ]
  print(common.table(('process', 'steps/s'), rows))
  print(f'\nloop / step: {loop:.1f} / {step:.1f} steps/s = {loop / step:.2f}')
  if _PROFILE.value:
    shares = profile(_STEPS.value)
    print('\nWhere the loop spends its time (main thread, py-spy samples):\n')
    print(common.table(('part', 'share'), [(k, f'{100 * v:.1f}%') for k, v in shares.items()]))


if __name__ == '__main__':
  app.run(main)
