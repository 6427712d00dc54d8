"""Reading released DDPM weights: diffusers UNet2DModel folders (weights and ``config.json``,
which must describe the config's U-Net) and checkpoints of the original TF release.
``convert`` re-exports the public names (``read_diffusers``, ``read_tf_checkpoint``,
``check_diffusers_config``, ``expected_diffusers_config``, ...).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import huggingface_hub  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import safetensors.numpy  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import logging  # noqa: E402
from etils import epath  # noqa: E402

from diffusion_jax import console, models, torch_weights  # noqa: E402
from diffusion_jax.convert_layouts import (  # noqa: E402
  ConversionError,
  Params,
  describe,
  is_ignored_tf_variable,
  params_from_diffusers,
)

DIFFUSERS_WEIGHTS = ('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin')
HUB_ID = re.compile(r'[A-Za-z0-9][\w.-]*/[\w.-]+')  # owner/name, as the Hub spells a repo
HUB_FILES = ['config.json', 'diffusion_pytorch_model.*', 'unet/config.json', 'unet/diffusion_*']

# UNet2DModel's defaults: what diffusers assumes for a key that config.json leaves out.
_DIFFUSERS_DEFAULTS = {
  '_class_name': None,
  'sample_size': None,
  'in_channels': 3,
  'out_channels': 3,
  'block_out_channels': [224, 448, 672, 896],
  'layers_per_block': 2,
  'down_block_types': ['DownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D'],
  'up_block_types': ['AttnUpBlock2D', 'AttnUpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'],
  'norm_num_groups': 32,
  'norm_eps': 1e-5,
  'act_fn': 'silu',
  'time_embedding_type': 'positional',
  'flip_sin_to_cos': True,
  'freq_shift': 0,
  'downsample_padding': 1,
  'center_input_sample': False,
  'mid_block_scale_factor': 1,
  'resnet_time_scale_shift': 'default',
  'add_attention': True,
  'attn_norm_num_groups': None,
  'class_embed_type': None,
  'num_class_embeds': None,
  'downsample_type': 'conv',
  'upsample_type': 'conv',
}
_CONFIG_FIELDS = {
  'sample_size': 'dataset.image_size',
  'in_channels': 'dataset.num_channels',
  'out_channels': 'dataset.num_channels',
  'block_out_channels': 'model.ch * model.ch_mult',
  'layers_per_block': 'model.num_res_blocks',
  'down_block_types': 'model.attn_resolutions',
  'up_block_types': 'model.attn_resolutions',
}


# ----------------------------------------------------------------------------- diffusers files


def expected_diffusers_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config.json entries of a UNet2DModel that computes the config's U-Net."""
  m, size, channels = config.model, config.dataset.image_size, config.dataset.num_channels
  attention = [size // 2**i in m.attn_resolutions for i in range(len(m.ch_mult))]
  return {
    '_class_name': 'UNet2DModel',
    'sample_size': size,
    'in_channels': channels,
    'out_channels': channels,
    'block_out_channels': [m.ch * k for k in m.ch_mult],
    'layers_per_block': m.num_res_blocks,
    'down_block_types': ['AttnDownBlock2D' if a else 'DownBlock2D' for a in attention],
    'up_block_types': ['AttnUpBlock2D' if a else 'UpBlock2D' for a in reversed(attention)],
    'norm_num_groups': models.NUM_GROUPS,
    'norm_eps': 1e-6,
    'act_fn': 'silu',
    'time_embedding_type': 'positional',
    'flip_sin_to_cos': False,
    'freq_shift': 1,
    'downsample_padding': 0,
    'center_input_sample': False,
    'mid_block_scale_factor': 1,
    'resnet_time_scale_shift': 'default',
    'add_attention': True,
    'attn_norm_num_groups': None,
    'class_embed_type': None,
    'num_class_embeds': None,
    'downsample_type': 'conv',
    'upsample_type': 'conv',
  }


def _attended_channels(config: ml_collections.ConfigDict) -> set[int]:
  """Channel counts of the attention blocks (the attended levels and the middle)."""
  m, size = config.model, config.dataset.image_size
  levels = {m.ch * k for i, k in enumerate(m.ch_mult) if size // 2**i in m.attn_resolutions}
  return levels | {m.ch * m.ch_mult[-1]}


def _normalized(key: str, value: Any) -> Any:
  """A config.json value in the form expected_diffusers_config uses."""
  if key == 'sample_size' and isinstance(value, (list, tuple)) and len(set(value)) == 1:
    return value[0]
  if key == 'act_fn' and value == 'swish':
    return 'silu'
  if key == 'attn_norm_num_groups' and value == models.NUM_GROUPS:
    return None
  return list(value) if isinstance(value, (list, tuple)) else value


def check_diffusers_config(
  model_config: Mapping[str, Any], config: ml_collections.ConfigDict, *, source: str = 'config.json'
) -> None:
  """Raises ConversionError naming every config.json entry that does not describe the config's
  U-Net."""
  problems = []
  for key, expected in expected_diffusers_config(config).items():
    value = _normalized(key, model_config.get(key, _DIFFUSERS_DEFAULTS[key]))
    if value != expected:
      given = (
        repr(model_config[key]) if key in model_config else f"absent (diffusers' default {value!r})"
      )
      field = f' (from --config {_CONFIG_FIELDS[key]})' if key in _CONFIG_FIELDS else ''
      problems.append(f'{key}: {given}, needs {expected!r}{field}')
  # The original's weights are one-head (absent: taken so).
  head_dim = model_config.get('attention_head_dim')
  if head_dim is not None and {head_dim} != _attended_channels(config):
    problems.append(f'attention_head_dim: {head_dim!r}, needs null (one head per attention block)')
  if not config.model.resamp_with_conv:
    problems.append(
      '--config model.resamp_with_conv=False, but UNet2DModel resamples with convolutions'
    )
  if problems:
    raise ConversionError(
      '\n'.join(
        [
          f'{source} does not describe the U-Net of the config ({describe(config)}):',
          *torch_weights.listing('mismatches', problems),
        ]
      )
    )


def download_from_hub(repo_id: str) -> epath.Path:
  """The local snapshot of a Hugging Face Hub repo (``google/ddpm-ema-cifar10-32``): its
  ``config.json`` and weights, downloaded once and cached by ``huggingface_hub``."""
  try:
    folder = huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES)
  except (
    huggingface_hub.errors.HfHubHTTPError,
    huggingface_hub.errors.LocalEntryNotFoundError,
    huggingface_hub.errors.OfflineModeIsEnabled,
    OSError,
    ValueError,
  ) as e:
    raise ConversionError(
      f'{repo_id} is not a local path and could not be downloaded from the Hugging Face Hub '
      f'({type(e).__name__}: {str(e).splitlines()[0][:200]}). Run the same command on a machine '
      f'with internet (the download is cached), or download config.json and '
      f'{DIFFUSERS_WEIGHTS[0]} of https://huggingface.co/{repo_id} into a folder and pass it.'
    ) from None
  console.say('%s: %s', repo_id, folder)
  return epath.Path(folder)


def find_diffusers_weights(path: epath.PathLike) -> epath.Path:
  """The weights file at ``path``, or in the folder ``path`` (or its ``unet/``), safetensors
  first."""
  if not epath.Path(path).exists() and HUB_ID.fullmatch(str(path)):
    path = download_from_hub(str(path))
  path = epath.Path(path)
  if not path.is_dir():
    if not path.exists():
      raise ConversionError(
        f'{path} does not exist; pass a google/ddpm-* folder, its weights file, or a Hugging '
        'Face Hub id such as google/ddpm-ema-cifar10-32.'
      )
    return path
  for candidate in (
    folder / name for folder in (path, path / 'unet') for name in DIFFUSERS_WEIGHTS
  ):
    if candidate.exists():
      return candidate
  raise ConversionError(f'No {" or ".join(DIFFUSERS_WEIGHTS)} in {path} (or {path / "unet"}).')


def read_diffusers(
  path: epath.PathLike,
) -> tuple[dict[str, np.ndarray], dict[str, Any], epath.Path]:
  """(state dict, config.json, weights file) of a diffusers UNet2DModel folder or weights file."""
  weights = find_diffusers_weights(path)
  config_path = weights.parent / 'config.json'
  if not config_path.exists():
    raise ConversionError(f'No config.json beside {weights}: download it from the same repo.')
  try:
    model_config = json.loads(config_path.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConversionError(
      f'{config_path} is not JSON ({e}); download it again from the same repo.'
    ) from None
  if not isinstance(model_config, dict):
    raise ConversionError(f'{config_path} is not a JSON object of UNet2DModel settings.')
  if weights.name.endswith('.safetensors'):
    try:
      state_dict = safetensors.numpy.load(weights.read_bytes())  # any epath, gs:// too
    except (safetensors.SafetensorError, ValueError) as e:
      raise ConversionError(
        f'{weights} is not a readable safetensors file ({e}); download it again from the same repo.'
      ) from None
  elif weights.name.endswith('.bin'):
    try:
      state_dict = torch_weights.read_state_dict(
        weights,
        hint='Install it (pip install torch), or use the '
        'diffusion_pytorch_model.safetensors of the same repo.',
      )
    except torch_weights.TorchMissingError as e:
      raise ConversionError(str(e)) from None
  else:
    raise ConversionError(f'{weights}: expected a .safetensors or .bin file.')
  return state_dict, model_config, weights


def diffusers_params(path: epath.PathLike, config: ml_collections.ConfigDict) -> Params:
  """Checked Flax params of the diffusers weights at ``path`` (file or folder)."""
  state_dict, model_config, weights = read_diffusers(path)
  check_diffusers_config(model_config, config, source=str(weights.parent / 'config.json'))
  params = params_from_diffusers(state_dict, config, source=str(weights))
  logging.info('Imported %d tensors from %s.', len(state_dict), weights)
  return params


# ----------------------------------------------------------------------------- TF checkpoints


def read_tf_checkpoint(path: epath.PathLike) -> tuple[dict[str, np.ndarray], int]:
  """(variables but the optimizer's, step) of a TF checkpoint prefix, or of the latest one in a
  folder. The step is ``global_step``, else the prefix's ``-NNN`` suffix, else 0."""
  prefix = os.fspath(path)
  if tf.io.gfile.isdir(prefix):
    prefix = tf.train.latest_checkpoint(prefix)
    if prefix is None:
      raise ConversionError(
        f'No TF checkpoint in {path}; pass a prefix such as {path}/model.ckpt-NNN.'
      )
  try:
    reader = tf.train.load_checkpoint(prefix)
  except (tf.errors.OpError, ValueError) as e:
    raise ConversionError(
      f'Cannot read the TF checkpoint {prefix} (pass the prefix, e.g. '
      f'.../model.ckpt-NNN, without .index): {e}'
    ) from None
  names = reader.get_variable_to_shape_map()
  variables = {name: reader.get_tensor(name) for name in names if not is_ignored_tf_variable(name)}
  suffix = re.search(r'-(\d+)$', prefix)
  step = int(suffix[1]) if suffix else 0
  if 'global_step' in names:
    step = int(reader.get_tensor('global_step'))
  logging.info(
    'Read %d variables of %s (step %d); ignored %d optimizer variables.',
    len(variables),
    prefix,
    step,
    len(names) - len(variables),
  )
  return variables, step
