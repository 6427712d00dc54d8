"""Where one train step's device time goes: the step as ``main`` runs it, traced once with
``jax.profiler``, its XLA operations grouped by kind (the convolutions' forward pass, input gradient
and filter gradient, matmuls, layout copies, cross-device work, everything else).

  python -m benchmarks.step_profile [--config=cifar10 --batch=32 --devices=2]

The step is compiled ahead of time and that executable is traced, so the profile's operation
names are the compiled HLO's. Times are operation-seconds per device (all XLA threads' events
over the device count); the last line names the largest group and its share.
"""

import collections
import pathlib
import re
import tempfile
import time

from absl import app, flags

from benchmarks import common

_CONFIG = flags.DEFINE_string('config', 'cifar10', 'configs/<name>.py')
_BATCH = flags.DEFINE_integer('batch', 32, 'Global batch.')
_DEVICES = flags.DEFINE_integer('devices', None, 'CPU devices; default: config.num_cpu_devices.')

GROUPS = (
  'conv forward',
  'conv input gradient',
  'conv filter gradient',
  'matmul (attention, dense)',
  'layout copies (transposes)',
  'cross-device (all-reduce, waits)',
  'elementwise and reductions',
)
_INSTRUCTION = re.compile(r'\s*(?:ROOT )?%(\S+) = \S+ ([\w-]+)\((.*)$')


def _computations(hlo_text: str) -> dict[str, list[str]]:
  """The compiled module's computations: name -> instruction lines (ENTRY under 'ENTRY')."""
  computations, current = {}, None
  for line in hlo_text.splitlines():
    header = re.match(r'(ENTRY )?%(\S+) \(', line)
    if header:
      current = 'ENTRY' if header.group(1) else header.group(2)
      computations[current] = []
    elif current and line.startswith('  '):
      computations[current].append(line)
  return computations


def _conv_group(line: str) -> str:
  """A convolution's group. XLA writes the filter gradient as a convolution whose window is the
  image (size=32x32...): any window over 3 wide is one. Input gradients carry transpose(...)."""
  window = re.search(r'window=\{size=([\dx]+)', line)
  if window and max(int(s) for s in window.group(1).split('x')) > 3:
    return 'conv filter gradient'
  return 'conv input gradient' if 'transpose(' in line else 'conv forward'


def operation_groups(hlo_text: str) -> dict[str, str]:
  """Each top-level operation of a compiled module (the profile's event names) -> its group."""
  computations = _computations(hlo_text)
  groups = {}
  for line in computations.get('ENTRY', []):
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, opcode, rest = match.groups()
    called = re.search(r'calls=%(\S+?)[,\s]', rest)
    body = computations.get(called.group(1), []) if called else []
    convs = [b for b in body if ' convolution(' in b] or ([line] if opcode == 'convolution' else [])
    if convs:  # the window is on the convolution, the op_name (if any) on the fusion
      groups[name] = _conv_group(convs[0] + line)
    elif opcode == 'dot' or any(' dot(' in b for b in body):
      groups[name] = 'matmul (attention, dense)'
    elif opcode in ('all-reduce', 'all-gather', 'collective-permute', 'reduce-scatter'):
      groups[name] = 'cross-device (all-reduce, waits)'
    elif 'transpose' in name or opcode in ('transpose', 'copy'):
      groups[name] = 'layout copies (transposes)'
    else:
      groups[name] = 'elementwise and reductions'
  return groups


def device_time(profile, groups: dict[str, str], devices: int) -> tuple[dict[str, float], int]:
  """Seconds of operations per group and device (summed over the XLA threads that ran them), and
  the number of threads. Events the module does not name (rendezvous, waits) are cross-device."""
  totals, threads = collections.Counter(), 0
  for plane in profile.planes:
    for line in plane.lines:
      events = [e for e in line.events if not e.name.startswith('ThunkExecutor')]
      if not any(e.name in groups for e in events):
        continue
      threads += 1
      for event in events:
        group = groups.get(event.name, 'cross-device (all-reduce, waits)')
        totals[group] += event.duration_ns / 1e9
  return {g: totals[g] / devices for g in GROUPS}, threads


def main(argv):
  del argv
  import jax

  config = common.load_config(_CONFIG.value)
  jax.config.update('jax_num_cpu_devices', _DEVICES.value or config.num_cpu_devices or 1)
  import numpy as np

  from diffusion_jax import parallel, train_step
  from diffusion_jax.run import Run

  run = Run.create(config)
  step = train_step.make_train_step(run)
  images = np.random.default_rng(0).uniform(-1, 1, (1, _BATCH.value, *run.image_shape))
  batch = parallel.shard_steps(run.mesh, images.astype(np.float32))
  state = run.initial_state()
  compiled = step.lower(state, batch).compile()
  for _ in range(2):  # warm-up: first-call allocations, thread pools
    state, _ = compiled(state, batch)
  jax.block_until_ready(state)
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, profiler_options=options)
    start = time.perf_counter()
    state, _ = compiled(state, batch)
    jax.block_until_ready(state)
    wall = time.perf_counter() - start
    jax.profiler.stop_trace()
    (trace,) = pathlib.Path(trace_dir).rglob('*.xplane.pb')
    profile = jax.profiler.ProfileData.from_file(str(trace))
  seconds, threads = device_time(profile, operation_groups(compiled.as_text()), jax.device_count())
  busy = sum(seconds.values())
  print(f'Machine: {common.machine()}\n')
  print(
    f'{_CONFIG.value}.py train step, batch {_BATCH.value} on {jax.device_count()} CPU devices:'
    f' {wall:.3f} s wall (traced), {busy:.3f} s of operations per device ({threads} threads)\n'
  )
  rows = [(g, f'{s:.3f}', f'{100 * s / busy:.1f}%') for g, s in seconds.items()]
  print(common.table(('group', 's / device', 'share'), rows))
  top = max(seconds, key=seconds.get)
  print(f'\nLargest: {top}, {100 * seconds[top] / busy:.0f}% of the device time')


if __name__ == '__main__':
  app.run(main)
