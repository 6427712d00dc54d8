"""Imports released DDPM weights into a train-state checkpoint that ``--mode=sample`` restores.

  python -m diffusion_jax.convert --source=diffusers --checkpoint=ddpm-ema-cifar10-32 \\
      --config=configs/cifar10.py --workdir=DIR
  python -m diffusion_jax.convert --source=tf --checkpoint=CIFAR10_MODEL_DIR/model.ckpt-NNN \\
      --config=configs/cifar10.py --workdir=DIR

Sources:
  diffusers  A UNet2DModel of the Hugging Face google/ddpm-* repos: a folder (or its weights
             file) with ``diffusion_pytorch_model.safetensors`` (read with safetensors.numpy, no
             PyTorch) or the older ``diffusion_pytorch_model.bin`` (needs PyTorch), and the
             ``config.json`` beside it, which must describe the U-Net of --config
             (``attention_head_dim`` null, absent, or one head's width). Attention keys may be
             ``to_q/to_k/to_v/to_out.0`` or the older ``query/key/value/proj_attn``.
             A diffusers repo holds one set of weights: it goes into both ``params`` and
             ``ema_params``, unless --ema_checkpoint names a second one for ``ema_params`` (e.g.
             google/ddpm-cifar10-32 with google/ddpm-ema-cifar10-32). Sampling uses
             ``ema_params``, so convert the ``ddpm-ema-*`` repos to sample with EMA weights. The
             step is 0 (diffusers files do not record it).
  tf         A checkpoint of the original release (hojonathanho/diffusion), the prefix
             ``model.ckpt-NNN`` or its folder (for the latest one): the ``model/...`` variables
             go into ``params``, their ``<name>/ExponentialMovingAverage`` copies into
             ``ema_params``, ``global_step`` (else the ``-NNN`` suffix, else 0) into the step.
             Optimizer variables are ignored: Adam and RMSProp slots (``<name>/Adam``,
             ``<name>/Adam_1``, ``<name>/RMSProp``, ``<name>/RMSProp_1``) and ``beta1_power``,
             ``beta2_power``.

Strict: every stored tensor but the ignored ones fills exactly one parameter, with the right
shape; otherwise ConversionError lists the missing, unexpected and mis-shaped names and nothing is
written. The checkpoint goes to ``<workdir>/checkpoints`` through ``train_state`` (refused if that
folder already holds anything): the train state a run would save at that step, with a fresh
optimizer state and the ``train`` random stream of ``config.seed``.

This module holds the command line and ``convert``. ``convert_layouts`` knows where each source
stores each parameter and imports strictly (``convert.params_from_diffusers`` and
``convert.params_from_tf``, the documented API, come from there); ``convert_sources`` reads the
files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from etils import epath  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from diffusion_jax import (  # noqa: E402
  config_compat,
  errors,
  flag_errors,
  train_state,
  validation,
  workdir_config,
)
from diffusion_jax import run as run_lib  # noqa: E402
from diffusion_jax.convert_layouts import (  # noqa: E402, F401  (the documented API)
  ConversionError,
  Params,
  params_from_diffusers,
  params_from_tf,
)
from diffusion_jax.convert_sources import diffusers_params, read_tf_checkpoint  # noqa: E402

SOURCES = ('diffusers', 'tf')


def _check_empty(workdir: epath.PathLike) -> epath.Path:
  """``<workdir>/checkpoints``, after making sure it holds nothing yet."""
  directory = train_state.resolve_workdir(workdir) / 'checkpoints'
  if directory.exists() and any(directory.iterdir()):
    raise ConversionError(
      f'{directory} already holds checkpoints; refusing to mix converted weights into '
      'a run. Choose a new --workdir (or delete that folder).'
    )
  return directory


def write_checkpoint(
  workdir: epath.PathLike,
  config: ml_collections.ConfigDict,
  params: Params,
  ema_params: Params,
  step: int,
) -> epath.Path:
  """Saves the train state of ``config`` at ``step`` with these params and EMA params, a fresh
  optimizer state and the seed's ``train`` key, as training does; returns its folder."""
  directory = _check_empty(workdir)
  run = run_lib.Run.create(config, workdir)
  state = train_state.TrainState.create(
    params=jax.tree.map(jnp.asarray, params),
    tx=run.state_factory.tx,
    ema_decay=run.state_factory.ema_decay,
    rng=run.key('train'),
  ).replace(step=jnp.asarray(step, jnp.int32), ema_params=jax.tree.map(jnp.asarray, ema_params))
  manager = train_state.checkpoint_manager(workdir)
  try:
    train_state.save(manager, state, force=True)
    manager.wait_until_finished()
  finally:
    manager.close()
  workdir_config.write(config, directory.parent)  # what --mode=sample and eval compare with
  return directory


def convert(
  config: ml_collections.ConfigDict,
  *,
  source: str,
  checkpoint: str,
  workdir: str,
  ema_checkpoint: str | None = None,
) -> int:
  """Converts ``checkpoint`` (and ``ema_checkpoint``) into ``<workdir>/checkpoints``; returns the
  step written."""
  workdir_config.check_writable(workdir, create=False)
  _check_empty(workdir)
  if source == 'diffusers':
    params = diffusers_params(checkpoint, config)
    ema_params = params if ema_checkpoint is None else diffusers_params(ema_checkpoint, config)
    step = 0
  elif source == 'tf':
    if ema_checkpoint is not None:
      raise ConversionError(
        '--ema_checkpoint is for --source=diffusers; TF checkpoints hold EMA copies.'
      )
    variables, step = read_tf_checkpoint(checkpoint)
    params, ema_params = params_from_tf(variables, config, source=f'TF checkpoint {checkpoint}')
  else:
    raise ConversionError(f'Unknown source {source!r}; choose one of {SOURCES}.')
  directory = write_checkpoint(workdir, config, params, ema_params, step)
  logging.info(
    'Wrote step %d to %s. Sample with: python -m diffusion_jax.main --mode=sample --config=... '
    '--workdir=%s (sampling variance: --config.diffusion.model_var_type, now %s).',
    step,
    directory,
    workdir,
    config.diffusion.model_var_type,
  )
  return step


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so importing never clashes)."""
  flags.DEFINE_enum(
    'source',
    None,
    list(SOURCES),
    'diffusers: a google/ddpm-* UNet2DModel folder or '
    'weights file; tf: a checkpoint of the original release (model.ckpt-NNN, or its folder).',
  )
  flags.DEFINE_string('checkpoint', None, 'The weights to import.')
  flags.DEFINE_string(
    'ema_checkpoint',
    None,
    'With --source=diffusers: a second folder/file for ema_params '
    '(default: --checkpoint goes into both params and ema_params).',
  )
  flags.DEFINE_string(
    'workdir', None, 'The run folder to create checkpoints/ in (must not hold any yet).'
  )
  config_flags.DEFINE_config_file(
    'config', None, 'A config file in configs/ describing the U-Net.', lock_config=True
  )
  errors.define_debug_flag()
  flags.mark_flags_as_required(['source', 'checkpoint', 'workdir', 'config'])


def main(argv: Sequence[str]) -> None:
  try:
    if len(argv) > 1:
      raise ConversionError(f'unexpected arguments {argv[1:]}: settings are --flag=value.')
    config_compat.translate(FLAGS.config)
    validation.validate(FLAGS.config, mode='sample')  # the config the checkpoint is sampled with
    convert(
      FLAGS.config,
      source=FLAGS.source,
      checkpoint=FLAGS.checkpoint,
      workdir=FLAGS.workdir,
      ema_checkpoint=FLAGS.ema_checkpoint,
    )
  except errors.SetupError as e:
    errors.exit_with(e)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=flag_errors.parse_flags)
