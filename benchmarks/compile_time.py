"""Question 7: compile time of the train step and the sampler, cold and from JAX's persistent
compilation cache (``--jax_compilation_cache_dir``, as ``launch/tpu.sh`` passes it).

  python -m benchmarks.compile_time [--repeats=2] [--configs=cifar10,digits]

Per config and repeat, three fresh processes: *cold* (no cache), *fill* (an empty cache dir:
compiles and writes it), *cached* (the same dir again: reads it); the cache is set through
``JAX_COMPILATION_CACHE_DIR``, the same setting as the flag. Each process traces and lowers
then compiles the train step (as main builds it: ``make_train_step`` on the config's CPU devices
and batch) and the sampler (``sampling.make_sample_fn``, 64 samples, the config's T), and reports
both phases; tracing and lowering are not cached. Medians over repeats.
"""

import json
import statistics
import sys
import tempfile
import time

from absl import app, flags

from benchmarks import common
from benchmarks.common import load_config

_REPEATS = flags.DEFINE_integer('repeats', 2, 'Repeats of cold / fill / cached per config.')
_CONFIGS = flags.DEFINE_list('configs', ['cifar10', 'digits'], 'Which configs.')
_CHILD = flags.DEFINE_string('child', None, 'Internal: compile this config and print JSON.')


def child(name: str) -> dict:
  import jax

  config = load_config(name)
  jax.config.update('jax_num_cpu_devices', config.num_cpu_devices or 1)
  import jax.numpy as jnp

  from diffusion_jax import runtime, train_step
  from diffusion_jax.run import Run

  run = Run.create(config)
  state = run.abstract_state()
  images = run.abstract_batch(config.train.batch_size, runtime.steps_per_call(config.train))
  step = train_step.make_train_step(run)
  sample = run.sample_fn(64)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  result = {}
  train_args = (state, images, train_step.empty_metrics(run.mesh))  # as the loop lowers it
  for what, fn, args in (('train', step, train_args), ('sample', sample, (state.params, key))):
    start = time.perf_counter()
    lowered = fn.lower(*args)
    traced = time.perf_counter()
    lowered.compile()
    result[f'{what}_lower'] = traced - start
    result[f'{what}_compile'] = time.perf_counter() - traced
  result['seconds'] = result['train_compile'] + result['sample_compile']
  return result


def main(argv):
  del argv
  if _CHILD.value:
    common.emit(child(_CHILD.value))
    return
  print(f'Machine: {common.machine()}')
  rows = []
  summary = []
  for name in _CONFIGS.value:
    runs = {'cold': [], 'fill': [], 'cached': []}
    for repeat in range(_REPEATS.value):
      with tempfile.TemporaryDirectory(prefix='jax_cache_bench_') as cache:
        cache_env = dict(
          JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0'
        )
        for phase, extra in (('cold', {}), ('fill', cache_env), ('cached', cache_env)):
          command = common.module_command('compile_time', f'--child={name}')
          result = common.run_json(command, common.child_env(extra=extra))
          runs[phase].append(result)
          print(
            f'  [{repeat + 1}] {name} {phase}: '
            + json.dumps({k: round(v, 2) for k, v in result.items()}),
            file=sys.stderr,
          )
    med = {
      phase: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for phase, rs in runs.items()
    }
    for phase in ('cold', 'cached'):
      m = med[phase]
      rows.append(
        (
          f'{name}.py',
          phase,
          f'{m["train_lower"]:.1f}',
          f'{m["train_compile"]:.1f}',
          f'{m["sample_lower"]:.1f}',
          f'{m["sample_compile"]:.1f}',
          f'{m["train_lower"] + m["train_compile"] + m["sample_lower"] + m["sample_compile"]:.1f}',
        )
      )
    cold, cached = med['cold'], med['cached']
    summary.append(
      f'{name} train step {cold["train_compile"]:.1f} s cold -> {cached["train_compile"]:.1f} s '
      f'cached, sampler {cold["sample_compile"]:.1f} -> {cached["sample_compile"]:.1f} s'
    )
  print(
    common.table(
      [
        'config',
        'cache',
        'train step: trace + lower s',
        'train step: compile s',
        'sampler: trace + lower s',
        'sampler: compile s',
        'total s',
      ],
      rows,
    )
  )
  print('Compile time (median): ' + '; '.join(summary))


if __name__ == '__main__':
  app.run(main)
