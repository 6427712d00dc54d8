"""Question 2: seconds per reverse (sampling) step against the PyTorch peer, and our scan's
per-step overhead over one bare forward pass.

  python -m benchmarks.sampling [--repeats=3] [--peer_python=PATH]

Ours: ``sampling.make_sample_fn`` (the compiled ``p_sample_loop`` scan, sharded over the config's
``num_cpu_devices``, or ``--devices``) timed over the whole loop and divided by its number of
steps T. The CIFAR10 chain is shortened to ``--cifar10_timesteps`` steps (default 10; 1000
would take most of an hour here): every step runs the same program, so the time per step does
not depend on T. The digits chain runs its full T = 200. The bare forward pass is one jitted
eval-mode U-Net call on the same batch and devices; the overhead is (scan step - forward) /
forward. The peer: diffusers' ``UNet2DModel`` forward (no grad) + ``DDPMScheduler.step``, per
step. Batch 64 for both models. Processes alternate; medians over processes.
"""

import sys

from absl import app, flags

from benchmarks import common
from benchmarks.common import load_config

_PEER = flags.DEFINE_string('peer_python', None, f'The peer venv python (or ${common.PEER_ENV}).')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Alternating processes per setting.')
_BATCH = flags.DEFINE_integer('batch', 64, 'Images per sampling call.')
_CIFAR_T = flags.DEFINE_integer('cifar10_timesteps', 10, 'Steps of the timed CIFAR10 chain.')
_DEVICES = flags.DEFINE_integer('devices', None, 'CPU devices; default config.num_cpu_devices.')
_CONFIGS = flags.DEFINE_list('configs', ['cifar10', 'digits'], 'Which models.')


def main(argv):
  del argv
  peer = common.peer_python(_PEER.value)
  print(f'Machine: {common.machine()}')
  rows, last = [], {}
  for name in _CONFIGS.value:
    config = load_config(name)
    devices = _DEVICES.value or config.num_cpu_devices or 1
    timesteps = _CIFAR_T.value if name == 'cifar10' else config.diffusion.num_diffusion_timesteps
    args = [f'--config={name}', f'--batch={_BATCH.value}', f'--devices={devices}']
    env = common.child_env()
    cifar = name == 'cifar10'
    commands = {
      'scan': (
        common.module_command(
          'jax_child', '--what=sample', *args, f'--timesteps={timesteps}', '--steps=2'
        ),
        env,
      ),
      'forward': (
        common.module_command(
          'jax_child', '--what=forward', *args, f'--steps={3 if cifar else 20}'
        ),
        env,
      ),
    }
    if peer:
      steps = 3 if cifar else 30
      command = [peer, 'benchmarks/peer.py', f'--model={name}', '--mode=sample']
      commands['peer'] = ([*command, f'--batch={_BATCH.value}', f'--steps={steps}'], None)
    print(f'{name}: batch {_BATCH.value}, {devices} device(s), T={timesteps}', file=sys.stderr)
    results = common.alternate(commands, _REPEATS.value)
    scan, forward = common.median(results['scan']), common.median(results['forward'])
    peer_s = common.median(results['peer']) if peer else None
    overhead = (scan - forward) / forward
    ratio = peer_s / scan if peer_s else None
    last[name] = (scan, ratio, overhead)
    rows.append(
      (
        name,
        _BATCH.value,
        devices,
        timesteps,
        f'{scan:.4f}',
        f'{forward:.4f}',
        f'{overhead:+.0%}',
        f'{peer_s:.4f}' if peer_s else '-',
        f'{ratio:.2f}x' if ratio else '-',
        common.runs(results['scan'], 'load', '{:.1f}'),
      )
    )
  print(
    common.table(
      [
        'model',
        'batch',
        'devices',
        'T timed',
        'ours s / step (scan)',
        'ours bare forward s',
        'scan overhead',
        'peer s / step',
        'peer / ours',
        'load avg at runs',
      ],
      rows,
    )
  )
  print(
    'Sampling, ours vs the peer (peer seconds / ours): '
    + '; '.join(
      f'{n} {r:.2f}x (scan overhead {o:+.0%})' if r else f'{n}: no peer (overhead {o:+.0%})'
      for n, (_, r, o) in last.items()
    )
  )


if __name__ == '__main__':
  app.run(main)
