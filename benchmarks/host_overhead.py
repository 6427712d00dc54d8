"""Question 5: host overhead per call of the train step, and whether ``train.steps_per_call`` > 1
pays on a TPU.

  python -m benchmarks.host_overhead [--calls=200]

On ``configs/digits.py:tiny`` (batch 16, one CPU device: a step of milliseconds, so the host's
share shows), for k = ``train.steps_per_call`` in 1, 4, 16, four loops of host calls:

- ``dispatch``: ``state, m = step(state, batch)`` back to back, one block at the end.
- ``device metrics``: ``state, running = step(state, batch, running)``, metrics merged in the step.
- ``host-side metrics (before)``: what the loop did per call besides the step until metrics
  moved into it: append the call's metrics, merge the health metric eagerly, ``int(state.step)``
  (a device-to-host sync: the save check read it every call), ``ReportProgress`` and the periodic
  callbacks for each of the k steps.
- ``train.py loop``: what ``train.py`` does now: device-side metrics (one ``running`` passed
  through the step), the step counted in Python (no sync unless saving), the same
  ``ReportProgress`` and callbacks.

Device time per optimizer step is the slope of the ``dispatch`` loop's time per call over k (a
least-squares line); host overhead per call = time per call - k x device time per step. Each loop
runs ``--calls`` calls after a warm-up; the table gives the median of ``--repeats`` runs. The last
line is the overhead as a fraction of a TPU v3-8 step at the paper's speed (CIFAR10 21 steps/s).
"""

import statistics
import sys
import time

from absl import app, flags

from benchmarks import common

_CALLS = flags.DEFINE_integer('calls', 200, 'Host calls per timed loop.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Runs of each loop (median).')
_KS = flags.DEFINE_list('steps_per_call', ['1', '4', '16'], 'Values of train.steps_per_call.')
PAPER_STEP_SECONDS = {
  'CIFAR10 (v3-8, 21 steps/s)': 1 / 21.0,
  '256x256 (v3-8, 2.2 steps/s)': 1 / 2.2,
}


def main(argv):
  del argv
  import jax

  jax.config.update('jax_num_cpu_devices', 1)
  import numpy as np
  from clu import periodic_actions

  from diffusion_jax import config_defaults, parallel, train_step
  from diffusion_jax.run import Run

  config = config_defaults.load(str(common.CONFIGS / 'digits.py') + ':tiny')
  run = Run.create(config)
  mesh = run.mesh
  step = train_step.make_train_step(run)
  rng = np.random.default_rng(0)
  print(f'Machine: {common.machine()}')

  def loops(k: int):
    shape = (k, config.train.batch_size, *run.image_shape)
    batch = parallel.shard_steps(mesh, rng.uniform(-1, 1, shape).astype(np.float32))

    def noop(step, t, state):
      return None

    def loop_hooks():
      """train.py's per-step callbacks, fresh (they insist on consecutive steps): progress,
      metrics, sample grid; periods longer than the loop, so only their checks run."""
      report = periodic_actions.ReportProgress(num_train_steps=10**9, every_steps=10**9)

      def callback():
        return periodic_actions.PeriodicCallback(every_steps=10**9, callback_fn=noop)

      return [report, callback(), callback()]

    def dispatch(state, n):
      for _ in range(n):
        state, _ = step(state, batch)
      return state

    def device_metrics(state, n):
      running = train_step.empty_metrics(mesh)
      for _ in range(n):
        state, running = step(state, batch, running)
      return state

    def before(state, n):
      collected, health, count = [], train_step.FirstNonFinite.empty(), int(state.step)
      report, *hooks = loop_hooks()
      for _ in range(n):
        state, metrics = step(state, batch)
        collected.append(metrics)
        health = health.merge(metrics.first_nonfinite_step)
        count += k
        int(state.step)  # train_state.save(manager, state) reads the step every call
        for hook_step in range(count - k + 1, count + 1):
          report(hook_step)
          for hook in hooks:
            hook(hook_step, state=state)
      return state

    def loop(state, n):
      running, count = train_step.empty_metrics(mesh), int(state.step)
      report, *hooks = loop_hooks()
      for _ in range(n):
        state, running = step(state, batch, running)
        count += k
        for hook_step in range(count - k + 1, count + 1):
          report(hook_step)
          for hook in hooks:
            hook(hook_step, state=state)
      return state

    return {
      'dispatch': dispatch,
      'device metrics': device_metrics,
      'host-side metrics (before)': before,
      'train.py loop': loop,
    }

  per_call = {}
  for k in map(int, _KS.value):
    state = run.initial_state()
    for name, loop in loops(k).items():
      state = jax.block_until_ready(loop(state, 3))  # compile and warm up
      times = []
      for _ in range(_REPEATS.value):
        start = time.perf_counter()
        state = jax.block_until_ready(loop(state, _CALLS.value))
        times.append((time.perf_counter() - start) / _CALLS.value)
      per_call[name, k] = statistics.median(times)
      print(f'  k={k} {name}: {per_call[name, k] * 1e3:.3f} ms / call', file=sys.stderr)
  ks = [int(k) for k in _KS.value]
  slope, intercept = np.polyfit(ks, [per_call['dispatch', k] for k in ks], 1)
  rows = []
  for name in ('dispatch', 'device metrics', 'host-side metrics (before)', 'train.py loop'):
    for k in ks:
      overhead = per_call[name, k] - k * slope
      rows.append(
        (
          name,
          k,
          f'{per_call[name, k] * 1e3:.3f}',
          f'{per_call[name, k] / k * 1e3:.3f}',
          f'{overhead * 1e3:.3f}',
        )
      )
  print(f'Device time per optimizer step (slope over k): {slope * 1e3:.3f} ms')
  print(
    common.table(
      ['loop', 'steps_per_call k', 'ms / call', 'ms / optimizer step', 'host overhead ms / call'],
      rows,
    )
  )
  before = per_call['host-side metrics (before)', 1] - slope
  now = per_call['train.py loop', 1] - slope
  print(
    f'Host overhead per call at k=1: host-side metrics (before) {before * 1e3:.2f} ms, train.py '
    f'loop {now * 1e3:.2f} ms; as a share of a paper-speed step: '
    + '; '.join(
      f'{name} {before / s:.1%} before, {now / s:.1%} now' for name, s in PAPER_STEP_SECONDS.items()
    )
  )


if __name__ == '__main__':
  app.run(main)
