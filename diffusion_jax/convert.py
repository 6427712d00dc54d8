"""Imports released DDPM weights into a train-state checkpoint that ``--mode=sample`` restores.

  python -m diffusion_jax.convert --source=diffusers --checkpoint=ddpm-ema-cifar10-32 \\
      --config=configs/cifar10.py --workdir=DIR
  python -m diffusion_jax.convert --source=tf --checkpoint=CIFAR10_MODEL_DIR/model.ckpt-NNN \\
      --config=configs/cifar10.py --workdir=DIR

Sources:
  diffusers  A UNet2DModel of the Hugging Face google/ddpm-* repos: a folder (or its weights file) with
             ``diffusion_pytorch_model.safetensors`` (read with safetensors.numpy, no PyTorch) or the older
             ``diffusion_pytorch_model.bin`` (needs PyTorch), and the ``config.json`` beside it, which must
             describe the U-Net of --config (``attention_head_dim`` null, absent, or one head's width).
             Attention keys may be ``to_q/to_k/to_v/to_out.0`` or the older ``query/key/value/proj_attn``.
             A diffusers repo holds one set of weights: it goes into both ``params`` and ``ema_params``,
             unless --ema_checkpoint names a second one for ``ema_params`` (e.g. google/ddpm-cifar10-32
             with google/ddpm-ema-cifar10-32). Sampling uses ``ema_params``, so convert the ``ddpm-ema-*``
             repos to sample with EMA weights. The step is 0 (diffusers files do not record it).
  tf         A checkpoint of the original release (hojonathanho/diffusion), the prefix ``model.ckpt-NNN``
             or its folder (for the latest one): the ``model/...`` variables go into ``params``, their
             ``<name>/ExponentialMovingAverage`` copies into ``ema_params``, ``global_step`` (else the
             ``-NNN`` suffix, else 0) into the step. Optimizer variables are ignored: Adam and RMSProp slots
             (``<name>/Adam``, ``<name>/Adam_1``, ``<name>/RMSProp``, ``<name>/RMSProp_1``) and
             ``beta1_power``, ``beta2_power``.

Strict: every stored tensor but the ignored ones fills exactly one parameter, with the right shape;
otherwise ConversionError lists the missing, unexpected and mis-shaped names and nothing is written.
The checkpoint goes to ``<workdir>/checkpoints`` through ``train.checkpoint_manager`` (refused if that
folder already holds anything), with a fresh optimizer state and rng ``PRNGKey(config.seed)``.
"""

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import safetensors.numpy  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from etils import epath  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from diffusion_jax import models, train  # noqa: E402

Path = tuple[str, ...]
Params = dict[str, Any]
Shape = tuple[int, ...]

SOURCES = ('diffusers', 'tf')
DIFFUSERS_WEIGHTS = ('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin')
EMA_SUFFIX = '/ExponentialMovingAverage'
TF_OPTIMIZER_VARIABLE = re.compile(
  r'(^|/)(beta1_power|beta2_power)$|/(Adam|Adam_1|RMSProp|RMSProp_1)$'
)
MAX_LISTED = 25

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


class ConversionError(ValueError):
  """Weights or files that do not fit the config's U-Net; the message lists every problem."""


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a source stores each Flax parameter, and how: names, stored shape, conversion to Flax."""

  keys: Callable[[Path], tuple[str, ...]]
  stored_shape: Callable[[Path, Shape], Shape]
  to_flax: Callable[[np.ndarray, int], np.ndarray]


# ----------------------------------------------------------------------------- the two layouts


def _diffusers_module(top: str, num_levels: int) -> str:
  """diffusers module name of a top-level Flax module; the up path is stored in reverse level order."""
  if top in _DIFFUSERS_TOP:
    return _DIFFUSERS_TOP[top]
  match = re.fullmatch(r'(down|up)_(\d+)_(block|attn|downsample|upsample)(?:_(\d+))?', top)
  if match is None:
    return top
  direction, level, part, index = match.groups()
  block = int(level) if direction == 'down' else num_levels - 1 - int(level)
  return f'{direction}_blocks.{block}.{_DIFFUSERS_PARTS[part].format(index)}'


def _diffusers_keys(path: Path, num_levels: int) -> tuple[str, ...]:
  """Candidate state-dict keys of a Flax parameter (`top/leaf` or `top/sub/leaf`), preferred first."""
  *modules, leaf = path
  prefix = f'{_diffusers_module(modules[0], num_levels)}.'
  suffix = 'weight' if leaf in ('kernel', 'scale') else 'bias'
  subs = _DIFFUSERS_SUBLAYERS.get(modules[1], (modules[1],)) if len(modules) == 2 else ('',)
  return tuple(prefix + (f'{sub}.' if sub else '') + suffix for sub in subs)


def _torch_shape(path: Path, shape: Shape) -> Shape:
  """Torch layout of a Flax shape: HWIO -> OIHW, [in, out] -> (out, in) or, for shortcuts, (out, in, 1, 1)."""
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if len(shape) == 2:
    return (shape[1], shape[0], 1, 1) if path[-2] == 'nin_shortcut' else (shape[1], shape[0])
  return shape


def _torch_to_flax(array: np.ndarray, flax_ndim: int) -> np.ndarray:
  """A torch-layout array in Flax layout (a view where numpy allows)."""
  if array.ndim == 4:
    return array.transpose(2, 3, 1, 0) if flax_ndim == 4 else array[:, :, 0, 0].T
  return array.T if array.ndim == 2 else array


def diffusers_layout(num_levels: int) -> Layout:
  """The layout of a diffusers UNet2DModel state dict for a U-Net with `num_levels` resolutions."""
  return Layout(
    keys=lambda path: _diffusers_keys(path, num_levels),
    stored_shape=_torch_shape,
    to_flax=_torch_to_flax,
  )


def _tf_key(path: Path) -> str:
  """Original variable name: `down_1_attn_0/q/kernel` -> `model/down_1/attn_0/q/W`."""
  *modules, leaf = path
  top = re.sub(r'^(down_\d+|up_\d+|mid|temb)_', r'\1/', modules[0])
  is_norm = modules[-1].startswith('norm')
  name = {'kernel': 'W', 'scale': 'gamma', 'bias': 'beta' if is_norm else 'b'}[leaf]
  return '/'.join(['model', top, *modules[1:], name])


def tf_layout(suffix: str = '') -> Layout:
  """The layout of the original TF checkpoint (HWIO convs, [in, out] dense/nin): `suffix` picks a copy."""
  return Layout(
    keys=lambda path: (_tf_key(path) + suffix,),
    stored_shape=lambda _, shape: shape,
    to_flax=lambda array, _: array,
  )


# ----------------------------------------------------------------------------- the shared assembly


def abstract_params(config: ml_collections.ConfigDict) -> dict[Path, Shape]:
  """Shape of every parameter of the config's U-Net, by flattened path, without computing."""
  model = train.create_model(config)
  x = jax.ShapeDtypeStruct((1, *train.image_shape(config)), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  tree = jax.eval_shape(model.init, jax.random.key(0), x, t)['params']
  return {
    tuple(k.key for k in path): leaf.shape
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def _unflatten(flat: Mapping[Path, np.ndarray]) -> Params:
  """Nested dicts from {path: leaf}."""
  tree: Params = {}
  for path, leaf in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf
  return tree


def _listing(title: str, items: Sequence[str]) -> list[str]:
  """`title (n):` and up to MAX_LISTED indented items."""
  if not items:
    return []
  more = [f'    ... and {len(items) - MAX_LISTED} more'] if len(items) > MAX_LISTED else []
  return [f'  {title} ({len(items)}):', *(f'    {item}' for item in items[:MAX_LISTED]), *more]


def _describe(config: ml_collections.ConfigDict) -> str:
  """The config fields that fix the U-Net's structure."""
  m = config.model
  return (
    f'ch={m.ch}, ch_mult={tuple(m.ch_mult)}, num_res_blocks={m.num_res_blocks}, '
    f'attn_resolutions={tuple(m.attn_resolutions)}, resamp_with_conv={m.resamp_with_conv}, '
    f'image_size={config.dataset.image_size}, num_channels={config.dataset.num_channels}'
  )


def _match(
  abstract: Mapping[Path, Shape], layout: Layout, shapes: Mapping[str, Shape]
) -> tuple[dict[Path, str], list[str], list[str]]:
  """The stored name of each parameter found, and the missing and mis-shaped ones, as messages."""
  keys, missing, misshaped = {}, [], []
  for path, shape in abstract.items():
    candidates, expected = layout.keys(path), layout.stored_shape(path, shape)
    key = next((k for k in candidates if k in shapes), None)
    if key is None:
      missing.append(f'{" or ".join(candidates)} {list(expected)}')
      continue
    if shapes[key] != expected:
      misshaped.append(
        f'{key}: stored {list(shapes[key])}, needs {list(expected)} for {"/".join(path)}'
      )
    keys[path] = key
  return keys, missing, misshaped


def import_params(
  tensors: Mapping[str, np.ndarray],
  config: ml_collections.ConfigDict,
  layouts: Sequence[Layout],
  *,
  source: str,
  ignore: Callable[[str], bool] = lambda name: False,
) -> list[Params]:
  """One float32 Flax params tree per layout, after checking that the tensors fill them exactly."""
  abstract = abstract_params(config)
  shapes = {name: tuple(np.shape(value)) for name, value in tensors.items()}
  matches = [_match(abstract, layout, shapes) for layout in layouts]
  used = {key for keys, _, _ in matches for key in keys.values()}
  missing = [item for _, items, _ in matches for item in items]
  misshaped = [item for _, _, items in matches for item in items]
  unexpected = [
    f'{name} {list(shapes[name])}'
    for name in sorted(shapes)
    if name not in used and not ignore(name)
  ]
  if missing or unexpected or misshaped:
    raise ConversionError(
      '\n'.join(
        [
          f'{source} does not fit the U-Net of the config ({_describe(config)}):',
          *_listing('missing', missing),
          *_listing('unexpected', unexpected),
          *_listing('mis-shaped', misshaped),
        ]
      )
    )

  def leaf(layout: Layout, path: Path, key: str) -> np.ndarray:
    """The stored tensor `key` as the float32 Flax parameter at `path`."""
    return layout.to_flax(np.asarray(tensors[key]), len(abstract[path])).astype(
      np.float32, copy=False
    )

  return [
    _unflatten({path: leaf(layout, path, key) for path, key in keys.items()})
    for layout, (keys, _, _) in zip(layouts, matches)
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
  """True for the optimizer variables and global_step a TF checkpoint holds besides the model."""
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
  """Raises ConversionError naming every config.json entry that does not describe the config's U-Net."""
  problems = []
  for key, expected in expected_diffusers_config(config).items():
    value = _normalized(key, model_config.get(key, _DIFFUSERS_DEFAULTS[key]))
    if value != expected:
      given = (
        repr(model_config[key]) if key in model_config else f"absent (diffusers' default {value!r})"
      )
      field = f' (from --config {_CONFIG_FIELDS[key]})' if key in _CONFIG_FIELDS else ''
      problems.append(f'{key}: {given}, needs {expected!r}{field}')
  head_dim = model_config.get(
    'attention_head_dim'
  )  # the original's weights are one-head (absent: taken so)
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
          f'{source} does not describe the U-Net of the config ({_describe(config)}):',
          *_listing('mismatches', problems),
        ]
      )
    )


def find_diffusers_weights(path: epath.PathLike) -> epath.Path:
  """The weights file at `path`, or in the folder `path` (or its `unet/`), safetensors first."""
  path = epath.Path(path)
  if not path.is_dir():
    if not path.exists():
      raise ConversionError(
        f'{path} does not exist; pass a google/ddpm-* folder or its weights file.'
      )
    return path
  for candidate in (
    folder / name for folder in (path, path / 'unet') for name in DIFFUSERS_WEIGHTS
  ):
    if candidate.exists():
      return candidate
  raise ConversionError(f'No {" or ".join(DIFFUSERS_WEIGHTS)} in {path} (or {path / "unet"}).')


def _load_torch_file(path: epath.Path) -> dict[str, np.ndarray]:
  """A torch .bin state dict as float32 numpy arrays (imports PyTorch only here)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ConversionError(
      f'{path} is a PyTorch file and PyTorch is not installed: pip install torch, or use '
      'the diffusion_pytorch_model.safetensors of the same repo.'
    ) from None
  state_dict = torch.load(os.fspath(path), map_location='cpu', weights_only=True)
  return {name: tensor.float().numpy() for name, tensor in state_dict.items()}


def read_diffusers(
  path: epath.PathLike,
) -> tuple[dict[str, np.ndarray], dict[str, Any], epath.Path]:
  """(state dict, config.json, weights file) of a diffusers UNet2DModel folder or weights file."""
  weights = find_diffusers_weights(path)
  config_path = weights.parent / 'config.json'
  if not config_path.exists():
    raise ConversionError(f'No config.json beside {weights}: download it from the same repo.')
  model_config = json.loads(config_path.read_text())
  if weights.name.endswith('.safetensors'):
    state_dict = safetensors.numpy.load_file(os.fspath(weights))
  elif weights.name.endswith('.bin'):
    state_dict = _load_torch_file(weights)
  else:
    raise ConversionError(f'{weights}: expected a .safetensors or .bin file.')
  return state_dict, model_config, weights


def diffusers_params(path: epath.PathLike, config: ml_collections.ConfigDict) -> Params:
  """Checked Flax params of the diffusers weights at `path` (file or folder)."""
  state_dict, model_config, weights = read_diffusers(path)
  check_diffusers_config(model_config, config, source=str(weights.parent / 'config.json'))
  params = params_from_diffusers(state_dict, config, source=str(weights))
  logging.info('Imported %d tensors from %s.', len(state_dict), weights)
  return params


# ----------------------------------------------------------------------------- TF checkpoints


def read_tf_checkpoint(path: epath.PathLike) -> tuple[dict[str, np.ndarray], int]:
  """(variables but the optimizer's, step) of a TF checkpoint prefix, or of the latest one in a folder."""
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
  step = (
    int(reader.get_tensor('global_step'))
    if 'global_step' in names
    else int(suffix[1])
    if suffix
    else 0
  )
  logging.info(
    'Read %d variables of %s (step %d); ignored %d optimizer variables.',
    len(variables),
    prefix,
    step,
    len(names) - len(variables),
  )
  return variables, step


# ----------------------------------------------------------------------------- the checkpoint


def _check_empty(workdir: epath.PathLike) -> epath.Path:
  """`<workdir>/checkpoints`, after making sure it holds nothing yet."""
  directory = epath.Path(workdir) / 'checkpoints'
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
  """Saves TrainState(step, params, ema_params, fresh optimizer state, PRNGKey(seed)); returns its folder."""
  directory = _check_empty(workdir)
  params, ema_params = (jax.tree.map(jnp.asarray, tree) for tree in (params, ema_params))
  state = train.TrainState(
    step=jnp.asarray(step, jnp.int32),
    params=params,
    ema_params=ema_params,
    opt_state=train.create_optimizer(config).init(params),
    rng=jax.random.PRNGKey(config.seed),
  )
  manager = train.checkpoint_manager(workdir, config)
  try:
    manager.save(step, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
  finally:
    manager.close()
  return directory


def convert(
  config: ml_collections.ConfigDict,
  *,
  source: str,
  checkpoint: str,
  workdir: str,
  ema_checkpoint: str | None = None,
) -> int:
  """Converts `checkpoint` (and `ema_checkpoint`) into `<workdir>/checkpoints`; returns the step written."""
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
  """The command-line flags (defined only when run as a program, so that importing never clashes)."""
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
  flags.mark_flags_as_required(['source', 'checkpoint', 'workdir', 'config'])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    convert(
      FLAGS.config,
      source=FLAGS.source,
      checkpoint=FLAGS.checkpoint,
      workdir=FLAGS.workdir,
      ema_checkpoint=FLAGS.ema_checkpoint,
    )
  except ConversionError as e:
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  define_flags()
  app.run(main)
