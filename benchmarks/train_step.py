"""Question 1: the project's train step against the PyTorch peer on this CPU.

  python -m benchmarks.train_step [--repeats=3] [--peer_python=PATH]

Ours: ``train_step.make_train_step`` as main runs it (the config's U-Net, optimizer and
diffusion, on a mesh of ``config.num_cpu_devices`` CPU devices, XLA flags as shipped), one
optimizer step per call. The peer: diffusers' ``UNet2DModel`` configured as the same U-Net
(``benchmarks/peer.py``) with ``torch.optim.Adam``, clipping and EMA, same batch, float32, same
dropout. Each measurement is a process of its own; the processes alternate (ours, the peer,
ours, ...) and each reports the median of its timed steps after a warm-up step; the table gives
the medians over processes. The CIFAR10 model runs at batch 32, the digits model at its
config's batch (64). Rows marked ``--devices=N`` time our step on another CPU device count, for
comparison. The peer runs with its defaults and with ``OMP_WAIT_POLICY=PASSIVE`` (its OpenMP
threads otherwise spin, which costs it dearly on a loaded machine); the faster of the two is the
reference. The last line ends with the CIFAR10 ratio ``speedup N.NNx`` (the peer's seconds over
ours: above 1 means ours is faster).
"""

import sys

from absl import app, flags

from benchmarks import common
from benchmarks.common import load_config

_PEER = flags.DEFINE_string('peer_python', None, f'The peer venv python (or ${common.PEER_ENV}).')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Alternating processes per setting.')
_CIFAR_BATCH = flags.DEFINE_integer('cifar10_batch', 32, 'Global batch of the CIFAR10 model.')
_CIFAR_STEPS = flags.DEFINE_integer('cifar10_steps', 3, 'Timed CIFAR10 steps per process.')
_DIGITS_STEPS = flags.DEFINE_integer('digits_steps', 30, 'Timed digits steps per process.')
_EXTRA_DEVICES = flags.DEFINE_list(
  'extra_devices', ['1', '2'], 'Also time our step on these CPU device counts (if different).'
)
_CONFIGS = flags.DEFINE_list('configs', ['cifar10', 'digits'], 'Which models.')
_PASSIVE = flags.DEFINE_bool(
  'peer_passive', True, 'Also time the peer with OMP_WAIT_POLICY=PASSIVE (faster under load).'
)
PEER = 'peer (diffusers + torch.optim.Adam)'
PEER_PASSIVE = 'peer, OMP_WAIT_POLICY=PASSIVE'


def settings(name: str, batch: int, steps: int, peer: str | None):
  """The alternating commands for one model: ours as shipped, ours on other device counts,
  the peer."""
  config = load_config(name)
  shipped = config.num_cpu_devices or 1
  args = [f'--config={name}', f'--batch={batch}', f'--steps={steps}']
  env = common.child_env()
  commands = {
    f'ours ({shipped} device{"s" * (shipped > 1)}, as shipped)': (
      common.module_command('jax_child', '--what=train', *args, f'--devices={shipped}'),
      env,
    )
  }
  for n in sorted({int(d) for d in _EXTRA_DEVICES.value} - {shipped}):
    commands[f'ours --devices={n}'] = (
      common.module_command('jax_child', '--what=train', *args, f'--devices={n}'),
      env,
    )
  if peer:
    command = [peer, 'benchmarks/peer.py', f'--model={name}', '--mode=train', *args[1:]]
    commands[PEER] = (command, None)
    if _PASSIVE.value:
      commands[PEER_PASSIVE] = (command, common.peer_env(OMP_WAIT_POLICY='PASSIVE'))
  return commands


def main(argv):
  del argv
  peer = common.peer_python(_PEER.value)
  if peer is None:
    print(
      'No peer python (set --peer_python or $DDPM_PEER_PYTHON, or install '
      'benchmarks/requirements.txt into benchmarks/.venv-peer): timing ours only.',
      file=sys.stderr,
    )
  print(f'Machine: {common.machine()}')
  rows, speedups = [], {}
  for name in _CONFIGS.value:
    config = load_config(name)
    batch = _CIFAR_BATCH.value if name == 'cifar10' else config.train.batch_size
    steps = _CIFAR_STEPS.value if name == 'cifar10' else _DIGITS_STEPS.value
    print(f'{name}: batch {batch}, dropout {config.model.dropout}', file=sys.stderr)
    results = common.alternate(settings(name, batch, steps, peer), _REPEATS.value)
    ours = common.median(next(iter(results.values())))
    # The peer's faster setting is the reference.
    peer_s = min(
      (common.median(results[n]) for n in (PEER, PEER_PASSIVE) if n in results), default=None
    )
    for label, rs in results.items():
      s = common.median(rs)
      ratio = f'{peer_s / s:.2f}x' if peer_s else '-'
      loads = common.runs(rs, 'load', '{:.1f}')
      rows.append(
        (name, batch, label, f'{s:.3f}', f'{batch / s:.1f}', ratio, common.runs(rs), loads)
      )
    speedups[name] = peer_s / ours if peer_s else None
  print(
    common.table(
      [
        'model',
        'batch',
        'setting',
        'median s / step',
        'examples / s',
        'peer s / this s',
        'runs (s)',
        'load avg at runs',
      ],
      rows,
    )
  )
  parts = [f'{n} {s:.2f}x' for n, s in speedups.items() if s and n != 'cifar10']
  if speedups.get('cifar10'):
    parts.append(f'CIFAR10 batch {_CIFAR_BATCH.value}: speedup {speedups["cifar10"]:.2f}x')
  print('Ours vs the peer (peer seconds / ours), ' + ('; '.join(parts) or 'no peer'))


if __name__ == '__main__':
  app.run(main)
