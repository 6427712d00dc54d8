"""Tests of the weight importer: diffusers and original-TF files written here load strictly into
the U-Net, and the checkpoint written is one that training, sampling and evaluation restore.

The source files are built from names written out independently of convert.py: diffusers'
UNet2DModel (down_blocks/resnets/attentions, up_blocks in reverse level order) and the variable
scopes of the original diffusion_tf/models/unet.py. The TF checkpoint is written by TF itself from
compat.v1 variables, with real ExponentialMovingAverage shadows, global_step and (for a few
variables) Adam slots.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import tensorflow as tf
from flax.traverse_util import flatten_dict
from tensorflow.core.protobuf import rewriter_config_pb2

from diffusion_jax import (
  convert,
  convert_layouts,
  convert_sources,
  draw,
  models,
  npz,
  rngs,
)
from diffusion_jax.run import Run

from conftest import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
TF_STEP = 12345
# google/ddpm-cifar10-32's config.json (diffusers 0.0.4), shared by google/ddpm-ema-cifar10-32.
CIFAR10_CONFIG_JSON = {
  '_class_name': 'UNet2DModel',
  '_diffusers_version': '0.0.4',
  'act_fn': 'silu',
  'block_out_channels': [128, 256, 256, 256],
  'center_input_sample': False,
  'down_block_types': ['DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'],
  'downsample_padding': 0,
  'flip_sin_to_cos': False,
  'freq_shift': 1,
  'in_channels': 3,
  'layers_per_block': 2,
  'mid_block_scale_factor': 1,
  'norm_eps': 1e-06,
  'norm_num_groups': 32,
  'out_channels': 3,
  'sample_size': 32,
  'time_embedding_type': 'positional',
  'up_block_types': ['UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'],
}
# The 256x256 repos (celebahq, church, bedroom, cat): six levels, attention at 16x16 (level 4).
CONFIG_JSON_256 = {
  **CIFAR10_CONFIG_JSON,
  'sample_size': 256,
  'block_out_channels': [128, 128, 256, 256, 512, 512],
  'down_block_types': ['DownBlock2D'] * 4 + ['AttnDownBlock2D', 'DownBlock2D'],
  'up_block_types': ['UpBlock2D', 'AttnUpBlock2D'] + ['UpBlock2D'] * 4,
}


def small_config():
  """ch 32, ch_mult (1, 2), one block, attention at 8x8, 16x16x3 images, 10 diffusion steps."""
  config = load_config('cifar10.py')
  config.dataset.image_size = 16
  config.model.update(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)
  config.diffusion.num_diffusion_timesteps = 10
  return config


def small_config_json():
  """The config.json a UNet2DModel of small_config() would have."""
  return {
    **CIFAR10_CONFIG_JSON,
    'sample_size': 16,
    'block_out_channels': [32, 64],
    'layers_per_block': 1,
    'down_block_types': ['DownBlock2D', 'AttnDownBlock2D'],
    'up_block_types': ['AttnUpBlock2D', 'UpBlock2D'],
    'attention_head_dim': None,
  }


def source_weights(
  config, seed: int | None, *, legacy_attention: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """(diffusers state dict, original TF variables) holding the same weights, random or (seed
  None) zeros.

  Zeros are zero-stride views, so even the 256x256 models cost no memory.
  """
  rng = None if seed is None else np.random.default_rng(seed)
  ch, levels = config.model.ch, len(config.model.ch_mult)
  diffusers, original = {}, {}

  def value(shape, std, mean=0.0):
    if rng is None:
      return np.broadcast_to(np.float32(mean), shape)
    return (mean + std * rng.normal(size=shape)).astype(np.float32)

  def dense(d, t, cin, cout):  # nn.Linear (out, in) | dense / nin W [in, out]
    w, b = value((cin, cout), cin**-0.5), value((cout,), 0.1)
    diffusers.update({f'{d}.weight': w.T, f'{d}.bias': b})
    original.update({f'{t}/W': w, f'{t}/b': b})

  def conv(d, t, cin, cout):  # nn.Conv2d (out, in, 3, 3) | conv2d W [3, 3, in, out]
    w, b = value((3, 3, cin, cout), (9 * cin) ** -0.5), value((cout,), 0.1)
    diffusers.update({f'{d}.weight': w.transpose(3, 2, 0, 1), f'{d}.bias': b})
    original.update({f'{t}/W': w, f'{t}/b': b})

  def shortcut(d, t, cin, cout):  # 1x1 nn.Conv2d (out, in, 1, 1) | nin W [in, out]
    w, b = value((cin, cout), cin**-0.5), value((cout,), 0.1)
    diffusers.update({f'{d}.weight': w.T[:, :, None, None], f'{d}.bias': b})
    original.update({f'{t}/W': w, f'{t}/b': b})

  def norm(d, t, c):  # nn.GroupNorm weight, bias | contrib group_norm gamma, beta
    scale, bias = value((c,), 0.1, mean=1.0), value((c,), 0.1)
    diffusers.update({f'{d}.weight': scale, f'{d}.bias': bias})
    original.update({f'{t}/gamma': scale, f'{t}/beta': bias})

  def resnet(d, t, cin, cout):
    norm(f'{d}.norm1', f'{t}/norm1', cin)
    conv(f'{d}.conv1', f'{t}/conv1', cin, cout)
    dense(f'{d}.time_emb_proj', f'{t}/temb_proj', 4 * ch, cout)
    norm(f'{d}.norm2', f'{t}/norm2', cout)
    conv(f'{d}.conv2', f'{t}/conv2', cout, cout)
    if cin != cout:
      shortcut(f'{d}.conv_shortcut', f'{t}/nin_shortcut', cin, cout)

  def attention(d, t, c):
    norm(f'{d}.group_norm', f'{t}/norm', c)
    names = (
      ('query', 'key', 'value', 'proj_attn')
      if legacy_attention
      else ('to_q', 'to_k', 'to_v', 'to_out.0')
    )
    for name, tf_name in zip(names, ('q', 'k', 'v', 'proj_out')):
      dense(f'{d}.{name}', f'{t}/{tf_name}', c, c)

  dense('time_embedding.linear_1', 'model/temb/dense0', ch, 4 * ch)
  dense('time_embedding.linear_2', 'model/temb/dense1', 4 * ch, 4 * ch)
  conv('conv_in', 'model/conv_in', config.dataset.num_channels, ch)
  skips, c = [ch], ch
  for i, mult in enumerate(config.model.ch_mult):
    attend = config.dataset.image_size // 2**i in config.model.attn_resolutions
    for j in range(config.model.num_res_blocks):
      resnet(f'down_blocks.{i}.resnets.{j}', f'model/down_{i}/block_{j}', c, ch * mult)
      c = ch * mult
      if attend:
        attention(f'down_blocks.{i}.attentions.{j}', f'model/down_{i}/attn_{j}', c)
      skips.append(c)
    if i != levels - 1:
      conv(f'down_blocks.{i}.downsamplers.0.conv', f'model/down_{i}/downsample/conv', c, c)
      skips.append(c)
  resnet('mid_block.resnets.0', 'model/mid/block_1', c, c)
  attention('mid_block.attentions.0', 'model/mid/attn_1', c)
  resnet('mid_block.resnets.1', 'model/mid/block_2', c, c)
  for k in range(levels):
    i = levels - 1 - k
    attend = config.dataset.image_size // 2**i in config.model.attn_resolutions
    for j in range(config.model.num_res_blocks + 1):
      cout = ch * config.model.ch_mult[i]
      resnet(f'up_blocks.{k}.resnets.{j}', f'model/up_{i}/block_{j}', c + skips.pop(), cout)
      c = cout
      if attend:
        attention(f'up_blocks.{k}.attentions.{j}', f'model/up_{i}/attn_{j}', c)
    if i != 0:
      conv(f'up_blocks.{k}.upsamplers.0.conv', f'model/up_{i}/upsample/conv', c, c)
  norm('conv_norm_out', 'model/norm_out', ch)
  conv('conv_out', 'model/conv_out', ch, config.dataset.num_channels)
  return diffusers, original


def write_diffusers(folder: pathlib.Path, state_dict, config_json) -> pathlib.Path:
  """A google/ddpm-*-style folder: diffusion_pytorch_model.safetensors and config.json."""
  folder.mkdir(parents=True, exist_ok=True)
  safetensors.numpy.save_file(
    {k: np.ascontiguousarray(v) for k, v in state_dict.items()},
    str(folder / 'diffusion_pytorch_model.safetensors'),
  )
  (folder / 'config.json').write_text(json.dumps(config_json))
  return folder


def write_tf_checkpoint(folder: pathlib.Path, raw, ema, step: int) -> str:
  """A TF1 checkpoint as the original training wrote it: variables, EMA shadows, global_step, and
  (only for a few variables, to save time) Adam slots."""
  v1 = tf.compat.v1
  with tf.Graph().as_default():
    variables = {}
    for name, value in raw.items():
      scope, leaf = name.rsplit('/', 1)
      with v1.variable_scope(scope):
        variables[name] = v1.get_variable(leaf, initializer=tf.constant(value))
    global_step = v1.train.get_or_create_global_step()
    averages = v1.train.ExponentialMovingAverage(decay=0.9999)
    averages.apply(list(variables.values()))
    some = [
      v for name, v in variables.items() if name.startswith(('model/conv_in/', 'model/mid/attn_1/'))
    ]
    v1.train.AdamOptimizer(2e-4).apply_gradients(
      [(tf.zeros_like(v), v) for v in some], global_step=global_step
    )
    set_values = [averages.average(var).assign(ema[name]) for name, var in variables.items()]
    no_grappler = rewriter_config_pb2.RewriterConfig(disable_meta_optimizer=True)
    with v1.Session(
      config=v1.ConfigProto(graph_options=v1.GraphOptions(rewrite_options=no_grappler))
    ) as sess:
      sess.run(v1.global_variables_initializer())
      sess.run(set_values + [global_step.assign(step)])
      return v1.train.Saver().save(sess, str(folder / 'model.ckpt'), global_step=step)


@pytest.fixture(scope='module')
def small(tmp_path_factory):
  """Two random weight sets A and B of the small config, as a diffusers folder each and one TF
  checkpoint holding A with B as its EMA copies."""
  config = small_config()
  model = Run.create(config).model
  folder = tmp_path_factory.mktemp('sources')
  diffusers_a, tf_a = source_weights(config, seed=0)
  diffusers_b, tf_b = source_weights(config, seed=1, legacy_attention=True)
  return dict(
    config=config,
    diffusers_a=diffusers_a,
    diffusers_b=diffusers_b,
    tf_a=tf_a,
    tf_b=tf_b,
    folder_a=write_diffusers(folder / 'ddpm-a', diffusers_a, small_config_json()),
    folder_b=write_diffusers(folder / 'ddpm-b', diffusers_b, small_config_json()),
    tf_checkpoint=write_tf_checkpoint(folder, tf_a, tf_b, TF_STEP),
    forward=jax.jit(lambda params, x, t: model.apply({'params': params}, x, t)),
  )


# ----------------------------------------------------------------------------- loading


def test_diffusers_file_loads_into_the_flax_tree_with_both_attention_key_styles(small):
  abstract = convert_layouts.abstract_params(small['config'])
  for folder in (small['folder_a'], small['folder_b']):  # B uses query/key/value/proj_attn
    state_dict = safetensors.numpy.load_file(str(folder / 'diffusion_pytorch_model.safetensors'))
    params = convert.params_from_diffusers(state_dict, small['config'])
    flat = flatten_dict(params)
    assert {p: v.shape for p, v in flat.items()} == abstract
    assert {v.dtype for v in flat.values()} == {np.dtype(np.float32)}
  sd = small['diffusers_b']
  np.testing.assert_array_equal(
    params['down_1_attn_0']['q']['kernel'], sd['down_blocks.1.attentions.0.query.weight'].T
  )
  np.testing.assert_array_equal(
    params['up_1_attn_1']['proj_out']['bias'], sd['up_blocks.0.attentions.1.proj_attn.bias']
  )
  np.testing.assert_array_equal(
    params['up_0_block_1']['conv1']['kernel'],
    sd['up_blocks.1.resnets.1.conv1.weight'].transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(
    params['down_1_block_0']['nin_shortcut']['kernel'],
    sd['down_blocks.1.resnets.0.conv_shortcut.weight'][:, :, 0, 0].T,
  )
  np.testing.assert_array_equal(params['norm_out']['scale'], sd['conv_norm_out.weight'])


def test_tf_checkpoint_loads_raw_and_ema_and_ignores_adam(small):
  reader = tf.train.load_checkpoint(small['tf_checkpoint'])
  names = set(reader.get_variable_to_shape_map())
  assert 'model/down_1/attn_0/q/W/ExponentialMovingAverage' in names  # named by TF itself
  assert {'model/conv_in/W/Adam', 'model/conv_in/W/Adam_1', 'beta1_power', 'global_step'} <= names

  variables, step = convert_sources.read_tf_checkpoint(small['tf_checkpoint'])
  assert step == TF_STEP
  params, ema_params = convert.params_from_tf(variables, small['config'])
  chex.assert_trees_all_equal(
    params, convert.params_from_diffusers(small['diffusers_a'], small['config'])
  )
  chex.assert_trees_all_equal(
    ema_params, convert.params_from_diffusers(small['diffusers_b'], small['config'])
  )
  np.testing.assert_array_equal(
    params['mid_block_1']['temb_proj']['kernel'], small['tf_a']['model/mid/block_1/temb_proj/W']
  )
  np.testing.assert_array_equal(
    ema_params['up_1_upsample']['conv']['kernel'], small['tf_b']['model/up_1/upsample/conv/W']
  )
  # A folder: its latest checkpoint.
  assert convert_sources.read_tf_checkpoint(os.path.dirname(small['tf_checkpoint']))[1] == TF_STEP


def test_same_weights_give_identical_outputs_from_either_file(small):
  config = small['config']
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1.0, maxval=1.0)
  t = jnp.array([0, 9], jnp.int32)
  from_diffusers = small['forward'](
    convert_sources.diffusers_params(small['folder_a'], config), x, t
  )
  raw, ema = convert.params_from_tf(
    convert_sources.read_tf_checkpoint(small['tf_checkpoint'])[0], config
  )
  np.testing.assert_array_equal(np.asarray(from_diffusers), np.asarray(small['forward'](raw, x, t)))
  assert np.abs(np.asarray(from_diffusers)).mean() > 1e-2
  from_ema_file = small['forward'](
    convert_sources.diffusers_params(small['folder_b'], config), x, t
  )
  np.testing.assert_array_equal(np.asarray(from_ema_file), np.asarray(small['forward'](ema, x, t)))


@pytest.mark.parametrize('name', ['lsun_bedroom.py', 'lsun_cat.py', 'lsun_church.py'])
def test_lsun_configs_take_the_celebahq_weights(name):
  """One 256x256 structure: the LSUN configs accept the released 256x256 U-Net, as celebahq."""
  config = load_config(name)
  convert_sources.check_diffusers_config(CONFIG_JSON_256, config)
  assert convert_layouts.abstract_params(config) == convert_layouts.abstract_params(
    load_config('celebahq.py')
  )


@pytest.mark.parametrize('name', ['cifar10.py', 'celebahq.py'], ids=['cifar10', '256x256'])
def test_released_structures_fit_exactly(name):
  config = load_config(name)
  config_json = CIFAR10_CONFIG_JSON if name == 'cifar10.py' else CONFIG_JSON_256
  convert_sources.check_diffusers_config(config_json, config)
  diffusers, original = source_weights(config, seed=None)
  params = convert.params_from_diffusers(diffusers, config)
  assert len(diffusers) == len(original) == len(jax.tree.leaves(params))
  with_ema_and_adam = (
    original
    | {f'{k}/ExponentialMovingAverage': v for k, v in original.items()}
    | {f'{k}/Adam': v for k, v in original.items()}
    | {'global_step': np.int64(1)}
  )
  raw, ema = convert.params_from_tf(with_ema_and_adam, config)
  sizes = [
    sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree)) for tree in (params, raw, ema)
  ]
  assert sizes == [35_746_307 if name == 'cifar10.py' else 113_673_219] * 3


# ----------------------------------------------------------------------------- source math parity


def _conv_nchw(x, w, b, padding):
  out = jax.lax.conv_general_dilated(
    x,
    w,
    (1, 1),
    [(padding, padding)] * 2,
    dimension_numbers=('NCHW', 'OIHW', 'NCHW'),
    precision=jax.lax.Precision.HIGHEST,
  )
  return out + b[None, :, None, None]


def _group_norm_nchw(x, weight, bias, groups=32, eps=1e-6):
  b, c, h, w = x.shape
  g = x.reshape(b, groups, c // groups, h, w)
  mean = g.mean(axis=(2, 3, 4), keepdims=True)
  var = ((g - mean) ** 2).mean(axis=(2, 3, 4), keepdims=True)
  normalized = ((g - mean) / jnp.sqrt(var + eps)).reshape(b, c, h, w)
  return normalized * weight[None, :, None, None] + bias[None, :, None, None]


def _linear(x, sd, name):
  return jnp.matmul(x, sd[f'{name}.weight'].T, precision='highest') + sd[f'{name}.bias']


def _diffusers_resnet(sd, prefix, x, temb):
  """diffusers ResnetBlock2D on NCHW input, from its torch-layout tensors."""

  def get(name):
    return jnp.asarray(sd[f'{prefix}.{name}'])

  h = jax.nn.silu(_group_norm_nchw(x, get('norm1.weight'), get('norm1.bias')))
  h = _conv_nchw(h, get('conv1.weight'), get('conv1.bias'), 1)
  h = h + _linear(jax.nn.silu(temb), sd, f'{prefix}.time_emb_proj')[:, :, None, None]
  h = jax.nn.silu(_group_norm_nchw(h, get('norm2.weight'), get('norm2.bias')))
  h = _conv_nchw(h, get('conv2.weight'), get('conv2.bias'), 1)
  if f'{prefix}.conv_shortcut.weight' in sd:
    x = _conv_nchw(x, get('conv_shortcut.weight'), get('conv_shortcut.bias'), 0)
  return x + h


def _diffusers_attention(sd, prefix, x, names=('to_q', 'to_k', 'to_v', 'to_out.0')):
  """diffusers' single-head Attention (group_norm, residual, rescale 1) on NCHW input."""
  b, c, height, width = x.shape
  h = _group_norm_nchw(x, sd[f'{prefix}.group_norm.weight'], sd[f'{prefix}.group_norm.bias'])
  h = h.reshape(b, c, height * width).transpose(0, 2, 1)
  q, k, v = (_linear(h, sd, f'{prefix}.{name}') for name in names[:3])
  probs = jax.nn.softmax(
    jnp.matmul(q, k.transpose(0, 2, 1), precision='highest') * c**-0.5, axis=-1
  )
  out = _linear(jnp.matmul(probs, v, precision='highest'), sd, f'{prefix}.{names[3]}')
  return x + out.transpose(0, 2, 1).reshape(b, c, height, width)


def test_resnet_and_attention_blocks_match_the_torch_layout_math(small):
  config = small['config']
  rng = np.random.default_rng(5)
  x_nchw = jnp.asarray(rng.normal(size=(2, 32, 8, 8)), jnp.float32)
  temb = jnp.asarray(rng.normal(size=(2, 128)), jnp.float32)

  def to_nhwc(a):
    return np.asarray(a).transpose(0, 2, 3, 1)

  for sd, names in (
    (small['diffusers_a'], ('to_q', 'to_k', 'to_v', 'to_out.0')),
    (small['diffusers_b'], ('query', 'key', 'value', 'proj_attn')),
  ):
    params = convert.params_from_diffusers(sd, config)
    ours = models.ResnetBlock(64).apply(
      {'params': params['down_1_block_0']}, x_nchw.transpose(0, 2, 3, 1), temb, train=False
    )
    reference = _diffusers_resnet(sd, 'down_blocks.1.resnets.0', x_nchw, temb)
    assert 'nin_shortcut' in params['down_1_block_0']
    np.testing.assert_allclose(np.asarray(ours), to_nhwc(reference), rtol=1e-4, atol=1e-4)

    h_nchw = reference
    ours = models.AttnBlock().apply(
      {'params': params['down_1_attn_0']}, h_nchw.transpose(0, 2, 3, 1)
    )
    reference = _diffusers_attention(sd, 'down_blocks.1.attentions.0', h_nchw, names)
    np.testing.assert_allclose(np.asarray(ours), to_nhwc(reference), rtol=1e-4, atol=1e-4)


def test_matches_diffusers_unet2dmodel(small):
  torch = pytest.importorskip('torch', reason='optional: parity with diffusers needs torch')
  diffusers = pytest.importorskip(
    'diffusers', reason='optional: parity with diffusers needs diffusers'
  )
  config = small['config']
  model = diffusers.UNet2DModel.from_config(small_config_json()).eval()
  model.load_state_dict(
    {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in small['diffusers_a'].items()}
  )
  x = np.random.default_rng(3).uniform(-1, 1, size=(2, 3, 16, 16)).astype(np.float32)
  t = np.array([0, 9])
  with torch.no_grad():
    expected = model(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
  ours = small['forward'](
    convert.params_from_diffusers(small['diffusers_a'], config),
    jnp.asarray(x.transpose(0, 2, 3, 1)),
    jnp.asarray(t, jnp.int32),
  )
  np.testing.assert_allclose(np.asarray(ours), expected.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- strictness


def _rewrite(
  small,
  tmp_path,
  edit: Callable[[dict], None] = lambda sd: None,
  config_edit: Callable[[dict], None] = lambda c: None,
) -> pathlib.Path:
  """A copy of source A's diffusers folder with its state dict and config.json edited."""
  state_dict, config_json = dict(small['diffusers_a']), small_config_json()
  edit(state_dict)
  config_edit(config_json)
  return write_diffusers(tmp_path / 'edited', state_dict, config_json)


@pytest.mark.parametrize(
  'edit, messages',
  [
    (
      lambda sd: sd.pop('down_blocks.1.attentions.0.to_k.bias'),
      [
        'missing (1)',
        'down_blocks.1.attentions.0.to_k.bias or down_blocks.1.attentions.0.key.bias [64]',
      ],
    ),
    (
      lambda sd: sd.update({'down_blocks.1.attentions.0.extra.weight': np.zeros((3,), np.float32)}),
      ['unexpected (1)', 'down_blocks.1.attentions.0.extra.weight [3]'],
    ),
    (
      lambda sd: sd.update(
        {'down_blocks.1.resnets.0.conv1.weight': np.zeros((32, 64, 3, 3), np.float32)}
      ),
      [
        'mis-shaped (1)',
        'down_blocks.1.resnets.0.conv1.weight: stored [32, 64, 3, 3], needs [64, 32, 3, 3] '
        'for down_1_block_0/conv1/kernel',
      ],
    ),
  ],
  ids=['missing', 'unexpected', 'mis-shaped'],
)
def test_bad_state_dict_raises_and_writes_nothing(small, tmp_path, edit, messages):
  folder = _rewrite(small, tmp_path, edit)
  with pytest.raises(convert.ConversionError) as error:
    convert.convert(
      small['config'], source='diffusers', checkpoint=str(folder), workdir=str(tmp_path / 'run')
    )
  for message in messages:
    assert message in str(error.value)
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_config_json_mismatch_names_each_entry(small, tmp_path):
  folder = _rewrite(
    small,
    tmp_path,
    config_edit=lambda c: (c.update(layers_per_block=2, freq_shift=0), c.pop('flip_sin_to_cos')),
  )
  with pytest.raises(convert.ConversionError) as error:
    convert.convert(
      small['config'], source='diffusers', checkpoint=str(folder), workdir=str(tmp_path / 'run')
    )
  text = str(error.value)
  assert 'mismatches (3)' in text
  assert 'layers_per_block: 2, needs 1 (from --config model.num_res_blocks)' in text
  assert 'freq_shift: 0, needs 1' in text
  assert "flip_sin_to_cos: absent (diffusers' default True), needs False" in text
  assert not (tmp_path / 'run' / 'checkpoints').exists()
  cifar10 = load_config('cifar10.py')
  convert_sources.check_diffusers_config(
    {**CIFAR10_CONFIG_JSON, 'attention_head_dim': 256}, cifar10
  )
  with pytest.raises(convert.ConversionError, match='attention_head_dim: 8, needs null'):
    convert_sources.check_diffusers_config(
      {**CIFAR10_CONFIG_JSON, 'attention_head_dim': 8}, cifar10
    )
  config = load_config('cifar10.py')
  config.model.attn_resolutions = (8,)
  with pytest.raises(convert.ConversionError) as error:
    convert_sources.check_diffusers_config(CIFAR10_CONFIG_JSON, config)
  assert (
    "down_block_types: ['DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'], needs "
    "['DownBlock2D', 'DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D'] "
    '(from --config model.attn_resolutions)' in str(error.value)
  )
  assert 'up_block_types' in str(error.value)


def test_tf_checkpoint_without_ema_or_with_extras_raises(small):
  variables = dict(small['tf_a']) | {
    'model/extra/W': np.zeros((2,), np.float32),
    'model/conv_in/W/Adam': 0,
  }
  with pytest.raises(convert.ConversionError) as error:
    convert.params_from_tf(variables, small['config'])
  text = str(error.value)
  assert f'missing ({len(small["tf_a"])})' in text
  assert 'model/conv_in/W/ExponentialMovingAverage [3, 3, 3, 32]' in text
  assert 'unexpected (1):\n    model/extra/W [2]' in text


def test_bin_without_torch_and_missing_files_raise_clearly(small, tmp_path, monkeypatch):
  folder = tmp_path / 'bin'
  folder.mkdir()
  (folder / 'diffusion_pytorch_model.bin').write_bytes(b'not read')
  (folder / 'config.json').write_text(json.dumps(small_config_json()))
  monkeypatch.setitem(sys.modules, 'torch', None)
  with pytest.raises(convert.ConversionError, match='PyTorch is not installed'):
    convert_sources.read_diffusers(folder)
  with pytest.raises(
    convert.ConversionError, match='No diffusion_pytorch_model.safetensors or .*bin in'
  ):
    convert_sources.read_diffusers(tmp_path)
  (folder / 'config.json').unlink()
  with pytest.raises(convert.ConversionError, match='No config.json beside'):
    convert_sources.read_diffusers(folder / 'diffusion_pytorch_model.bin')


# ----------------------------------------------------------------------------- end to end


def _restore(config, workdir):
  """The latest checkpoint of ``workdir``, restored as training, sampling and evaluation do."""
  run = Run.create(config, workdir)
  return run.restore_latest(), run.abstract_state()


def test_diffusers_to_checkpoint_with_ema_file_and_refuses_to_overwrite(small, tmp_path):
  config, workdir = small['config'], str(tmp_path / 'run')
  step = convert.convert(
    config,
    source='diffusers',
    checkpoint=str(small['folder_a']),
    workdir=workdir,
    ema_checkpoint=str(small['folder_b'] / 'diffusion_pytorch_model.safetensors'),
  )
  assert step == 0
  state, abstract = _restore(config, workdir)
  # The tree a run of this config writes: same structure, shapes and dtypes.
  assert jax.tree.structure(state) == jax.tree.structure(abstract)
  chex.assert_trees_all_equal_shapes_and_dtypes(state, abstract)
  assert int(state.step) == 0
  a, b = (convert.params_from_diffusers(small[k], config) for k in ('diffusers_a', 'diffusers_b'))
  chex.assert_trees_all_equal(state.params, a)
  chex.assert_trees_all_equal(state.ema_params, b)
  # A fresh Adam state (zero moments and count), and the run's ``train`` random stream.
  fresh = Run.create(config).state_factory.tx.init(a)
  chex.assert_trees_all_equal(state.opt_state, fresh)
  np.testing.assert_array_equal(state.rng, rngs.key(config.seed, 'train'))
  with pytest.raises(convert.ConversionError, match='already holds checkpoints'):
    convert.convert(config, source='diffusers', checkpoint=str(small['folder_a']), workdir=workdir)


def test_tf_to_checkpoint_then_sample(small, tmp_path):
  config, workdir = small['config'], str(tmp_path / 'run')
  assert (
    convert.convert(config, source='tf', checkpoint=small['tf_checkpoint'], workdir=workdir)
    == TF_STEP
  )
  state, _ = _restore(config, workdir)
  assert int(state.step) == TF_STEP
  params, ema_params = convert.params_from_tf(
    convert_sources.read_tf_checkpoint(small['tf_checkpoint'])[0], config
  )
  chex.assert_trees_all_equal(state.params, params)
  chex.assert_trees_all_equal(state.ema_params, ema_params)
  images = draw.sample_from_checkpoint(Run.create(config, workdir), num_samples=8)
  assert images.shape == (8, 16, 16, 3) and images.dtype == np.uint8
  assert images.std() > 0  # random weights: not a constant image
  # Sampled from the converted step, saved as --mode=sample saves.
  saved = npz.read(tmp_path / 'run' / 'samples' / f'ema_step_{TF_STEP:08d}_n8.npz')
  assert int(saved['step']) == TF_STEP
  np.testing.assert_array_equal(saved['images'], images)


def test_command_line(small, tmp_path):
  run = subprocess.run(
    [
      sys.executable,
      '-m',
      'diffusion_jax.convert',
      '--source=diffusers',
      f'--checkpoint={small["folder_a"]}',
      f'--config={ROOT / "configs" / "cifar10.py"}',
      '--config.dataset.image_size=16',
      '--config.model.ch=32',
      '--config.model.ch_mult=(1,2)',
      '--config.model.num_res_blocks=1',
      '--config.model.attn_resolutions=(8,)',
      f'--workdir={tmp_path / "run"}',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  state, _ = _restore(small['config'], tmp_path / 'run')
  assert int(state.step) == 0
  params = convert.params_from_diffusers(small['diffusers_a'], small['config'])
  chex.assert_trees_all_equal(state.params, params)
  chex.assert_trees_all_equal(state.ema_params, params)


def convert_cli(checkpoint: str, workdir, env: dict[str, str]) -> subprocess.CompletedProcess:
  """``python -m diffusion_jax.convert`` of the small config, as test_command_line runs it."""
  return subprocess.run(
    [
      sys.executable,
      '-m',
      'diffusion_jax.convert',
      '--source=diffusers',
      f'--checkpoint={checkpoint}',
      f'--config={ROOT / "configs" / "cifar10.py"}',
      '--config.dataset.image_size=16',
      '--config.model.ch=32',
      '--config.model.ch_mult=(1,2)',
      '--config.model.num_res_blocks=1',
      '--config.model.attn_resolutions=(8,)',
      f'--workdir={workdir}',
    ],
    cwd=ROOT,
    env={**os.environ, **env},
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_a_hub_id_converts_from_the_hub_cache_and_offline_names_the_id(small, tmp_path):
  """``--checkpoint=owner/name`` goes through huggingface_hub (cached); offline, a clear error."""
  cache = tmp_path / 'hub'
  snapshot = cache / 'models--google--ddpm-tiny' / 'snapshots' / ('0' * 40)
  shutil.copytree(small['folder_a'], snapshot)
  (cache / 'models--google--ddpm-tiny' / 'refs').mkdir()
  (cache / 'models--google--ddpm-tiny' / 'refs' / 'main').write_text('0' * 40)
  offline = {'HF_HUB_CACHE': str(cache), 'HF_HUB_OFFLINE': '1'}
  run = convert_cli('google/ddpm-tiny', tmp_path / 'run', offline)
  assert run.returncode == 0, run.stderr[-3000:]
  state, _ = _restore(small['config'], tmp_path / 'run')
  params = convert.params_from_diffusers(small['diffusers_a'], small['config'])
  chex.assert_trees_all_equal(state.params, params)

  run = convert_cli('google/ddpm-ema-cifar10-32', tmp_path / 'other', offline)
  assert run.returncode == 2 and 'Traceback' not in run.stderr
  assert 'google/ddpm-ema-cifar10-32 is not a local path and could not be downloaded' in run.stderr
  assert not (tmp_path / 'other' / 'checkpoints').exists()
