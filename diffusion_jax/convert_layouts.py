"""Where released DDPM weights store each parameter of the U-Net, and the strict import of
stored tensors into Flax params trees: diffusers' UNet2DModel (torch layout) and the original
TF release (``hojonathanho/diffusion``, Flax layout already). ``convert`` re-exports the public
names (``ConversionError``, ``params_from_diffusers``, ``params_from_tf``, ...).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from diffusion_jax import torch_weights, train_state
from diffusion_jax.errors import SetupError

Path = tuple[str, ...]
Params = dict[str, Any]
Shape = tuple[int, ...]

EMA_SUFFIX = '/ExponentialMovingAverage'
TF_OPTIMIZER_VARIABLE = re.compile(
  r'(^|/)(beta1_power|beta2_power)$|/(Adam|Adam_1|RMSProp|RMSProp_1)$'
)

# Flax sub-layer -> diffusers names, preferred first (the second: attention keys of older files).
_DIFFUSERS_SUBLAYERS = {
  'temb_proj': ('time_emb_proj',),
  'nin_shortcut': ('conv_shortcut',),
  'norm': ('group_norm',),
  'q': ('to_q', 'query'),
  'k': ('to_k', 'key'),
  'v': ('to_v', 'value'),
  'proj_out': ('to_out.0', 'proj_attn'),
}
_DIFFUSERS_TOP = {
  'temb_dense0': 'time_embedding.linear_1',
  'temb_dense1': 'time_embedding.linear_2',
  'norm_out': 'conv_norm_out',
  'mid_block_1': 'mid_block.resnets.0',
  'mid_attn_1': 'mid_block.attentions.0',
  'mid_block_2': 'mid_block.resnets.1',
}
_DIFFUSERS_PARTS = {
  'block': 'resnets.{}',
  'attn': 'attentions.{}',
  'downsample': 'downsamplers.0',
  'upsample': 'upsamplers.0',
}


class ConversionError(SetupError):
  """Weights or files that do not fit the config's U-Net; the message lists every problem."""


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a source stores each Flax parameter, and how: names, stored shape, conversion to
  Flax."""

  keys: Callable[[Path], tuple[str, ...]]
  stored_shape: Callable[[Path, Shape], Shape]
  to_flax: Callable[[np.ndarray, int], np.ndarray]


# ----------------------------------------------------------------------------- the two layouts


def _diffusers_module(top: str, num_levels: int) -> str:
  """diffusers module name of a top-level Flax module; the up path is stored in reverse level
  order."""
  if top in _DIFFUSERS_TOP:
    return _DIFFUSERS_TOP[top]
  match = re.fullmatch(r'(down|up)_(\d+)_(block|attn|downsample|upsample)(?:_(\d+))?', top)
  if match is None:
    return top
  direction, level, part, index = match.groups()
  block = int(level) if direction == 'down' else num_levels - 1 - int(level)
  return f'{direction}_blocks.{block}.{_DIFFUSERS_PARTS[part].format(index)}'


def _diffusers_keys(path: Path, num_levels: int) -> tuple[str, ...]:
  """Candidate state-dict keys of a Flax parameter (``top/leaf`` or ``top/sub/leaf``),
  preferred first."""
  *modules, leaf = path
  prefix = f'{_diffusers_module(modules[0], num_levels)}.'
  suffix = 'weight' if leaf in ('kernel', 'scale') else 'bias'
  subs = _DIFFUSERS_SUBLAYERS.get(modules[1], (modules[1],)) if len(modules) == 2 else ('',)
  return tuple(prefix + (f'{sub}.' if sub else '') + suffix for sub in subs)


def diffusers_layout(num_levels: int) -> Layout:
  """The layout of a diffusers UNet2DModel state dict for a U-Net with ``num_levels``
  resolutions: torch layouts, shortcuts as 1x1 convs."""
  return Layout(
    keys=lambda path: _diffusers_keys(path, num_levels),
    stored_shape=lambda path, shape: torch_weights.torch_shape(
      shape, conv_1x1=path[-2] == 'nin_shortcut'
    ),
    to_flax=torch_weights.from_torch,
  )


def _tf_key(path: Path) -> str:
  """Original variable name: ``down_1_attn_0/q/kernel`` -> ``model/down_1/attn_0/q/W``."""
  *modules, leaf = path
  top = re.sub(r'^(down_\d+|up_\d+|mid|temb)_', r'\1/', modules[0])
  is_norm = modules[-1].startswith('norm')
  name = {'kernel': 'W', 'scale': 'gamma', 'bias': 'beta' if is_norm else 'b'}[leaf]
  return '/'.join(['model', top, *modules[1:], name])


def tf_layout(suffix: str = '') -> Layout:
  """The layout of the original TF checkpoint (HWIO convs, [in, out] dense/nin): ``suffix``
  picks a copy (``EMA_SUFFIX``: the EMA shadows)."""
  return Layout(
    keys=lambda path: (_tf_key(path) + suffix,),
    stored_shape=lambda _, shape: shape,
    to_flax=lambda array, _: array,
  )


# ----------------------------------------------------------------------------- the shared assembly


def abstract_params(config: ml_collections.ConfigDict) -> dict[Path, Shape]:
  """Shape of every parameter of the config's U-Net, by flattened path, without computing."""
  size, channels = config.dataset.image_size, config.dataset.num_channels
  model = train_state.create_model(config.model, channels)
  x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  tree = jax.eval_shape(model.init, jax.random.key(0), x, t)['params']
  return {path: tuple(leaf.shape) for path, leaf in flatten_dict(tree).items()}


def describe(config: ml_collections.ConfigDict) -> str:
  """The config fields that fix the U-Net's structure."""
  m = config.model
  return (
    f'ch={m.ch}, ch_mult={tuple(m.ch_mult)}, num_res_blocks={m.num_res_blocks}, '
    f'attn_resolutions={tuple(m.attn_resolutions)}, resamp_with_conv={m.resamp_with_conv}, '
    f'image_size={config.dataset.image_size}, num_channels={config.dataset.num_channels}'
  )


def import_params(
  tensors: Mapping[str, np.ndarray],
  config: ml_collections.ConfigDict,
  layouts: Sequence[Layout],
  *,
  source: str,
  ignore: Callable[[str], bool] = lambda name: False,
) -> list[Params]:
  """One float32 Flax params tree per layout, after checking that the tensors fill them
  exactly (``torch_weights.match``); a ConversionError lists every problem otherwise."""
  abstract = abstract_params(config)
  targets = [
    {
      path: torch_weights.Wanted(
        layout.keys(path), layout.stored_shape(path, shape), '/'.join(path)
      )
      for path, shape in abstract.items()
    }
    for layout in layouts
  ]
  shapes = {name: np.shape(value) for name, value in tensors.items()}
  match = torch_weights.match(targets, shapes, ignore=ignore)
  if not match.ok:
    raise ConversionError(
      match.report(f'{source} does not fit the U-Net of the config ({describe(config)}):')
    )

  def leaf(layout: Layout, path: Path, key: str) -> np.ndarray:
    """The stored tensor ``key`` as the float32 Flax parameter at ``path``."""
    array = layout.to_flax(np.asarray(tensors[key]), len(abstract[path]))
    return array.astype(np.float32, copy=False)

  return [
    unflatten_dict({path: leaf(layout, path, key) for path, key in keys.items()})
    for layout, keys in zip(layouts, match.found)
  ]


def params_from_diffusers(
  state_dict: Mapping[str, np.ndarray],
  config: ml_collections.ConfigDict,
  *,
  source: str = 'diffusers state dict',
) -> Params:
  """The Flax params of a diffusers UNet2DModel state dict (torch layout, numpy arrays)."""
  layout = diffusers_layout(len(config.model.ch_mult))
  return import_params(state_dict, config, [layout], source=source)[0]


def is_ignored_tf_variable(name: str) -> bool:
  """True for the optimizer variables and global_step a TF checkpoint holds besides the
  model."""
  return name == 'global_step' or TF_OPTIMIZER_VARIABLE.search(name) is not None


def params_from_tf(
  variables: Mapping[str, np.ndarray],
  config: ml_collections.ConfigDict,
  *,
  source: str = 'TF checkpoint',
) -> tuple[Params, Params]:
  """(params, ema_params) from the original release's variables (by name, numpy arrays)."""
  params, ema_params = import_params(
    variables,
    config,
    [tf_layout(), tf_layout(EMA_SUFFIX)],
    source=source,
    ignore=is_ignored_tf_variable,
  )
  return params, ema_params
