"""What a config needs on Cloud TPU slices, from XLA:TPU itself, on a host with no TPU.

  python -m benchmarks.tpu_compile --config=configs/cifar10.py --tpu=v3-8,v4-8,v5litepod-8 \\
      [--config.model.remat=True ...] [--fit]

For each TPU type: the devices and hosts, per device the memory of the train step (arguments +
outputs + temporaries - donated, and the generated code) and of the largest program the loop runs
(the sample grid, the in-loop evaluators) against the chip's HBM, whether everything fits, the
compile time, the train step's GFLOP per device and XLA's estimate of its time (a lower bound, not
a measurement) with the steps/s and MFU it implies. ``--fit``: where the train step does not fit,
the first setting that does (remat, bfloat16, a smaller batch), compiled to check. Needs the TPU
runtime (``WITH_TPU=1 bash launch/setup.sh``); ``launch/tpu.sh plan`` runs this.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# libtpu describes the host it runs on from this unless told; here it only compiles (the
# target is --tpu), so any type silences its warning.
os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'v4-8')

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import common  # noqa: E402
from diffusion_jax import config_compat, errors, hardware, tpu_plan  # noqa: E402

_TPU = flags.DEFINE_list('tpu', ['v3-8'], f'TPU types: {", ".join(hardware.TPU_SLICES)}.')
_FIT = flags.DEFINE_bool('fit', False, 'Where the train step does not fit: what would, compiled.')
config_flags.DEFINE_config_file('config', None, 'A config file of configs/ (file.py:variant).')
flags.mark_flags_as_required(['config'])

GIB = hardware.GiB
HEADER = (
  'TPU',
  'devices (hosts)',
  'train step GiB/device',
  'largest program',
  'HBM/device',
  'fits',
  'GFLOP/step/device',
  'XLA step time',
  'steps/s (XLA)',
  'MFU (XLA)',
  'compile',
)


def row(plan: tpu_plan.Plan) -> tuple[str, ...]:
  train, largest = plan.train, plan.largest
  seconds = plan.step_seconds
  return (
    plan.tpu,
    f'{plan.num_devices} ({plan.num_hosts})',
    f'{train.bytes_per_device / GIB:.2f}' + (' (refused)' if train.out_of_memory else ''),
    f'{largest.name} {largest.bytes_per_device / GIB:.2f}',
    f'{plan.hbm_bytes_per_device / GIB:.0f}',
    'yes' if plan.fits else 'NO',
    f'{train.flops_per_device * train.calls_per_step / 1e9:,.4g}',
    '?' if seconds is None else f'{seconds * 1e3:.1f} ms',
    '?' if seconds is None else f'{1 / seconds:.1f}',
    '?' if plan.mfu is None else f'{100 * plan.mfu:.0f}%',
    f'{sum(p.compile_seconds for p in plan.programs):.0f} s',
  )


def main(argv):
  del argv
  jax.config.update('jax_platforms', 'cpu')  # compile for the TPU; run nothing anywhere
  config = flags.FLAGS.config
  config_compat.translate(config)
  name = config_flags.get_config_filename(flags.FLAGS['config'])
  print(f'Machine: {common.machine()}; jax {jax.__version__}')
  print(
    f'{name}: batch {config.train.batch_size}, model.dtype={config.model.dtype}, '
    f'remat={config.model.remat}\n'
  )
  rows, misses = [], []
  try:
    for tpu in _TPU.value:
      result = tpu_plan.plan(config, tpu)
      rows.append(row(result))
      if not result.train.fits(result.hbm_bytes_per_device):
        misses.append(tpu)
    print(common.table(HEADER, rows))
    for tpu in misses if _FIT.value else ():
      found = tpu_plan.fitting_settings(config, tpu)
      if found is None:
        print(f'\n{tpu}: no setting tried makes the train step fit; use a larger slice.')
      else:
        flags_, fitted = found
        print(f'\n{tpu}: the train step fits with {flags_}:')
        print(common.table(HEADER, [row(fitted)]))
  except errors.SetupError as e:
    errors.exit_with(e)


if __name__ == '__main__':
  app.run(main)
