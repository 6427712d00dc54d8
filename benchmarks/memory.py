"""Question 4: does the train step fit a TPU v3 core (16 GiB HBM) at the paper's per-core batch?

  python -m benchmarks.memory [--configs=cifar10,lsun_bedroom]

For each config at the paper's batch per v3 core (CIFAR10: 128 / 8 cores = 16; 256x256: 64 / 8 =
8), with ``model.dtype`` float32 or bfloat16 and ``model.remat`` off or on, two views of one
core's train step (Adam, EMA, donated state; compiled on one CPU device with that batch):

- *activations*: the bytes of the residuals the backward pass keeps (``jax.vjp``'s saved values,
  as traced: bfloat16 where the compute is bfloat16). It does not depend on the platform.
- *XLA:CPU*: ``compiled.memory_analysis()`` of the step compiled here: arguments (the state and
  the batch), temporaries, and their sum less the donated (aliased) bytes. XLA:CPU computes
  bfloat16 in float32 (it upcasts), so its bfloat16 figures overstate a TPU's.

The TPU estimate is state + gradients + activations (+10 % for XLA's workspace); "fits" means
under 16 GiB. Compiling the 256x256 step takes minutes per setting.
"""

import itertools
import sys

from absl import app, flags

from benchmarks import common
from benchmarks.common import load_config

GIB = 2**30
V3_CORE_HBM = 16 * GIB
ITEMSIZE = {'f32': 4, 'bf16': 2, 'f16': 2, 'i32': 4, 'u32': 4, 'bool': 1, 'pred': 1, 'i8': 1}
ITEMSIZE.update(float32=4, bfloat16=2, float16=2, int32=4, uint32=4, int8=1)
PER_CORE_BATCH = {'cifar10': 16, 'lsun_bedroom': 8}  # the paper's batch / 8 v3 cores

_CONFIGS = flags.DEFINE_list('configs', list(PER_CORE_BATCH), 'Configs to analyse.')
_DTYPES = flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'model.dtype values.')
_REMAT = flags.DEFINE_list('remat', ['False', 'True'], 'model.remat values.')
_CPU = flags.DEFINE_bool('xla_cpu', True, 'Also compile on XLA:CPU for memory_analysis().')


def residual_bytes(fn, *args) -> int:
  """Bytes of the values ``jax.vjp(fn, *args)`` keeps for the backward pass, not counting the
  arguments themselves (``jax.ad_checkpoint.print_saved_residuals``, parsed)."""
  import contextlib
  import io
  import re

  import numpy as np
  from jax import ad_checkpoint

  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    ad_checkpoint.print_saved_residuals(fn, *args)
  total = 0
  for line in out.getvalue().splitlines():
    match = re.match(r'\s*(\w+)\[([\d,]*)\]\s+(.*)', line)
    if match and not match.group(3).startswith('from the argument'):
      dtype, dims = match.group(1), [int(d) for d in match.group(2).split(',') if d]
      total += int(np.prod(dims)) * ITEMSIZE[dtype]
  return total


def analyse(name: str, batch: int, dtype: str, remat: bool, compile_cpu: bool) -> dict:
  import jax
  import jax.numpy as jnp

  from diffusion_jax import models, train_step
  from diffusion_jax.run import Run

  config = load_config(name, [f'model.dtype={dtype!r}', f'model.remat={remat}'])
  run = Run.create(config, devices=jax.devices()[:1])
  state = run.abstract_state()
  images = run.abstract_batch(batch)

  def nbytes(tree):
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))

  def loss(params, x):
    model_fn = models.model_fn(run.model, params, dropout_rng=jax.random.key(0))
    t = jnp.zeros((x.shape[0],), jnp.int32)
    return jnp.mean(run.process.training_losses(model_fn, x, t, x))

  x = jax.ShapeDtypeStruct((batch, *run.image_shape), jnp.float32)
  saved = residual_bytes(loss, state.params, x)
  state_bytes, grad_bytes = nbytes(state), nbytes(state.params)
  result = dict(
    state=state_bytes / GIB,
    activations=saved / GIB,
    estimate=1.1 * (state_bytes + grad_bytes + saved) / GIB,
  )
  if compile_cpu:
    step = train_step.make_train_step(run)
    memory = step.lower(state, images).compile().memory_analysis()
    result.update(
      arguments=memory.argument_size_in_bytes / GIB,
      temporaries=memory.temp_size_in_bytes / GIB,
      cpu_total=(
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
      )
      / GIB,
    )
  return result


def main(argv):
  del argv
  print(f'Machine: {common.machine()}')
  rows, verdicts = [], {}
  for name, dtype, remat in itertools.product(_CONFIGS.value, _DTYPES.value, _REMAT.value):
    remat = remat == 'True'
    batch = PER_CORE_BATCH[name]
    print(f'{name} batch {batch} {dtype} remat={remat} ...', file=sys.stderr, flush=True)
    r = analyse(name, batch, dtype, remat, _CPU.value)
    fits = r['estimate'] * GIB < V3_CORE_HBM
    verdicts.setdefault(name, []).append((fits, r['estimate'], dtype, remat))
    cpu = (
      [f'{r[k]:.2f}' for k in ('arguments', 'temporaries', 'cpu_total')]
      if 'cpu_total' in r
      else ['-'] * 3
    )
    rows.append(
      (
        f'{name}.py',
        batch,
        dtype,
        remat,
        f'{r["state"]:.2f}',
        f'{r["activations"]:.2f}',
        f'{r["estimate"]:.2f}',
        'yes' if fits else 'no',
        *cpu,
      )
    )
  print(
    common.table(
      [
        'config',
        'batch / core',
        'model.dtype',
        'model.remat',
        'state GiB',
        'activations GiB',
        'TPU estimate GiB',
        'fits 16 GiB',
        'XLA:CPU arguments GiB',
        'XLA:CPU temporaries GiB',
        'XLA:CPU total GiB',
      ],
      rows,
    )
  )
  best = []
  for name, options in verdicts.items():
    fitting = [o for o in options if o[0]]
    if fitting:
      # The cheapest setting that fits: no remat first (it costs compute), float32 first.
      fits, estimate, dtype, remat = min(fitting, key=lambda o: (o[3], o[2] != 'float32'))
      best.append(f'{name}: dtype={dtype}, remat={remat} ({estimate:.1f} GiB)')
    else:
      best.append(f'{name}: nothing fits')
  print('Cheapest setting that fits a v3 core: ' + '; '.join(best))


if __name__ == '__main__':
  app.run(main)
