"""The XLA:CPU options tried on the train step: each in its own process, alternating, medians.

  python -m benchmarks.cpu_options [--config=cifar10] [--batch=32] [--repeats=3]
      [--variants=1 device,2 devices,...]

Every variant times ``train_step.make_train_step``'s step on this machine (one warm-up step,
then ``--steps`` timed steps; the process reports their median) with a CPU device count, XLA
flags and step options of its own; the table gives the median over the alternating processes and
the speedup over the first variant. ``python -m benchmarks.cpu_options --list`` names them all.
"""

import sys

from absl import app, flags

from benchmarks import common

# name -> (CPU devices, XLA_FLAGS, extra jax_child flags)
VARIANTS = {
  '1 device': (1, '', []),
  '2 devices': (2, '', []),
  '4 devices': (4, '', []),
  '2 devices + onednn': (2, '--xla_cpu_use_onednn=true', []),
  '2 devices + no xnnpack': (2, '--xla_cpu_use_xnnpack=false', []),
  '2 devices + vector width 512': (2, '--xla_cpu_prefer_vector_width=512', []),
  '2 devices + xnn graph fusion': (
    2,
    '--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY',
    [],
  ),
  '2 devices + ynn dot+eltwise+reduce': (
    2,
    '--xla_cpu_experimental_ynn_fusion_type=+dot,+eltwise,+reduce',
    [],
  ),
  '2 devices + single-threaded Eigen': (2, '--xla_cpu_multi_thread_eigen=false', []),
  '2 devices + no dropout': (2, '', ['--set=model.dropout=0.0']),
}

_CONFIG = flags.DEFINE_string('config', 'cifar10', 'configs/<name>.py')
_BATCH = flags.DEFINE_integer('batch', 32, 'Global batch.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed steps per process.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Alternating processes per variant.')
_VARIANTS = flags.DEFINE_list('variants', ['1 device', '2 devices'], 'Variants to compare.')
_LIST = flags.DEFINE_bool('list', False, 'List the variants and exit.')


def main(argv):
  del argv
  if _LIST.value:
    for name, (devices, xla_flags, extra) in VARIANTS.items():
      print(f'{name}: --devices={devices} XLA_FLAGS={xla_flags!r} {" ".join(extra)}')
    return
  print(f'Machine: {common.machine()}')
  commands = {}
  for name in _VARIANTS.value:
    devices, xla_flags, extra = VARIANTS[name]
    command = common.module_command(
      'jax_child',
      f'--config={_CONFIG.value}',
      f'--batch={_BATCH.value}',
      f'--devices={devices}',
      f'--steps={_STEPS.value}',
      *extra,
    )
    commands[name] = (command, common.child_env(xla_flags))
  print(f'{_CONFIG.value} train step, batch {_BATCH.value}', file=sys.stderr)
  results = common.alternate(commands, _REPEATS.value)
  base = common.median(results[_VARIANTS.value[0]])
  rows = []
  for name, rs in results.items():
    s = common.median(rs)
    rows.append(
      (name, f'{s:.3f}', f'{base / s:.2f}x', common.runs(rs), common.runs(rs, 'load', '{:.1f}'))
    )
  print(
    common.table(
      ['variant', 'median s / step', f'speedup vs {_VARIANTS.value[0]}', 'runs (s)', 'load'],
      rows,
    )
  )
  best = min(results, key=lambda n: common.median(results[n]))
  print(f'Fastest: {best}, {base / common.median(results[best]):.2f}x the {_VARIANTS.value[0]}')


if __name__ == '__main__':
  app.run(main)
