"""The DDPM U-Net: sizes, names, dropout, dtypes, and its layers against independent references."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import models
from diffusion_jax.models import AttnBlock, Downsample, UNet, Upsample, get_timestep_embedding

pytestmark = pytest.mark.stack  # the subset CI runs on every supported Python

CIFAR10 = dict(ch=128, out_ch=3, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,))
LSUN256 = dict(
  ch=128, out_ch=3, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,)
)
SMALL = dict(ch=32, out_ch=1, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))


def _abstract_params(model, size, channels=3, batch=1):
  """Parameter shapes and dtypes of ``model`` on [batch, size, size, channels], not computed."""
  x = jax.ShapeDtypeStruct((batch, size, size, channels), jnp.float32)
  t = jax.ShapeDtypeStruct((batch,), jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), x, t)['params']


def _num_params(params):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


def _random_params(params, seed):
  """Random float32 values shaped as ``params``: unit-gain kernels, perturbed scales, biases."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    shape, name = leaf.shape, path[-1].key
    if name == 'kernel':
      value = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
    elif name == 'scale':
      value = 1.0 + 0.1 * rng.normal(size=shape)
    else:
      value = 0.1 * rng.normal(size=shape)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, params)


@functools.partial(jax.jit, static_argnames=('model', 'train'))
def _forward(model, params, x, t, key, train):
  """One jitted forward pass; always given a dropout key, so train=False calls share one compile."""
  return model.apply({'params': params}, x, t, train=train, rngs={'dropout': key})


@pytest.fixture(scope='module')
def small():
  """The small config (dropout 0.1) run for real: its inputs, initial params and random params."""
  model = UNet(**SMALL, dropout=0.1)
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 1), minval=-1.0, maxval=1.0)
  t = jnp.array([0, 999], jnp.int32)
  # An 'rbg' key: compiling the init with the default threefry PRNG takes several times longer.
  params = jax.jit(model.init)(jax.random.key(0, impl='rbg'), x, t)['params']
  return types.SimpleNamespace(
    model=model, x=x, t=t, params=params, random_params=_random_params(params, seed=0)
  )


def test_cifar10_param_count_and_names():
  params = _abstract_params(UNet(**CIFAR10), 32)
  assert _num_params(params) == 35_746_307
  expected = [
    'temb_dense0',
    'temb_dense1',
    'conv_in',
    'mid_block_1',
    'mid_attn_1',
    'mid_block_2',
    'norm_out',
    'conv_out',
    'down_0_block_0',
    'down_0_block_1',
    'down_0_downsample',
    'down_1_block_0',
    'down_1_attn_0',
    'down_1_block_1',
    'down_1_attn_1',
    'down_1_downsample',
    'down_2_block_0',
    'down_2_block_1',
    'down_2_downsample',
    'down_3_block_0',
    'down_3_block_1',
    'up_3_block_0',
    'up_3_block_1',
    'up_3_block_2',
    'up_3_upsample',
    'up_2_block_0',
    'up_2_block_1',
    'up_2_block_2',
    'up_2_upsample',
    'up_1_block_0',
    'up_1_attn_0',
    'up_1_block_1',
    'up_1_attn_1',
    'up_1_block_2',
    'up_1_attn_2',
    'up_1_upsample',
    'up_0_block_0',
    'up_0_block_1',
    'up_0_block_2',
  ]
  assert sorted(params) == sorted(expected)

  shapes = jax.tree.map(lambda leaf: leaf.shape, params)
  assert shapes['temb_dense0'] == {'kernel': (128, 512), 'bias': (512,)}
  assert shapes['conv_in'] == {'kernel': (3, 3, 3, 128), 'bias': (128,)}
  assert shapes['down_0_downsample'] == {'conv': {'kernel': (3, 3, 128, 128), 'bias': (128,)}}
  assert shapes['down_1_block_0'] == {  # 128 -> 256 channels: has the 1x1 shortcut
    'norm1': {'scale': (128,), 'bias': (128,)},
    'conv1': {'kernel': (3, 3, 128, 256), 'bias': (256,)},
    'temb_proj': {'kernel': (512, 256), 'bias': (256,)},
    'norm2': {'scale': (256,), 'bias': (256,)},
    'conv2': {'kernel': (3, 3, 256, 256), 'bias': (256,)},
    'nin_shortcut': {'kernel': (128, 256), 'bias': (256,)},
  }
  assert 'nin_shortcut' not in shapes['down_1_block_1']
  assert shapes['up_0_block_2']['nin_shortcut'] == {
    'kernel': (256, 128),
    'bias': (128,),
  }  # concat 128 + 128
  assert shapes['mid_attn_1'] == {
    'norm': {'scale': (256,), 'bias': (256,)},
    **{n: {'kernel': (256, 256), 'bias': (256,)} for n in ('q', 'k', 'v', 'proj_out')},
  }
  assert shapes['conv_out'] == {'kernel': (3, 3, 128, 3), 'bias': (3,)}


def test_lsun256_param_count_and_output_shape():
  model = UNet(**LSUN256)
  params = _abstract_params(model, 256)
  assert _num_params(params) == 113_673_219
  x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.int32)
  out = jax.eval_shape(functools.partial(model.apply, train=False), {'params': params}, x, t)
  assert (out.shape, out.dtype) == ((2, 256, 256, 3), jnp.float32)


def test_invalid_hyperparameters_raise_clear_errors():
  with pytest.raises(ValueError, match='ch=48 must be a positive multiple of 32: GroupNorm'):
    _abstract_params(UNet(**{**SMALL, 'ch': 48}), 16, channels=1)
  with pytest.raises(ValueError, match=r'image size 20 is not divisible by 8.*ch_mult=\(1,2,2\)'):
    _abstract_params(UNet(**CIFAR10), 20)
  with pytest.raises(ValueError, match='floating dtype'):
    _abstract_params(UNet(**SMALL, dtype='int32'), 16, channels=1)


def test_timestep_embedding_matches_numpy_formula():
  t = np.array([0, 1, 2, 17, 250, 500, 998, 999])
  for dim in (128, 33):
    half = dim // 2
    freqs = np.exp(-np.log(10000.0) * np.arange(half, dtype=np.float64) / (half - 1))
    args = t[:, None].astype(np.float64) * freqs[None, :]
    expected = np.concatenate([np.sin(args), np.cos(args), np.zeros((len(t), dim % 2))], axis=1)
    emb = get_timestep_embedding(jnp.asarray(t, jnp.int32), dim)
    assert emb.shape == (len(t), dim) and emb.dtype == jnp.float32
    np.testing.assert_allclose(
      np.asarray(emb), expected, rtol=0, atol=2e-4
    )  # float32 arguments up to 999 rad


def test_output_is_near_zero_at_init(small):
  # conv_out's kernel starts at scale 1e-10: |w| <= sqrt(3e-10 / fan_avg) ~ 1.4e-6, so |out| ~ 1e-5.
  init_out = _forward(small.model, small.params, small.x, small.t, jax.random.key(0), train=False)
  assert np.abs(np.asarray(init_out)).max() < 1e-4
  assert np.abs(np.asarray(small.params['conv_out']['kernel'])).max() < 2e-6
  assert not np.any(np.asarray(small.params['conv_out']['bias']))
  out = _forward(small.model, small.random_params, small.x, small.t, jax.random.key(0), train=False)
  assert (
    np.abs(np.asarray(out)).mean() > 1e-2
  )  # the same inputs give O(1) outputs with random params


def test_small_output_shape_dtype_and_params_float32(small):
  out = _forward(small.model, small.params, small.x, small.t, jax.random.key(0), train=False)
  assert out.shape == (2, 16, 16, 1) and out.dtype == jnp.float32
  assert {leaf.dtype for leaf in jax.tree.leaves(small.params)} == {jnp.dtype(jnp.float32)}


def test_dropout(small):
  args = (small.random_params, small.x, small.t)
  key1, key2 = jax.random.key(1), jax.random.key(2)
  eval1 = np.asarray(_forward(small.model, *args, key1, train=False))
  eval2 = np.asarray(_forward(small.model, *args, key2, train=False))
  np.testing.assert_array_equal(eval1, eval2)

  train1 = np.asarray(_forward(small.model, *args, key1, train=True))
  train2 = np.asarray(_forward(small.model, *args, key2, train=True))
  np.testing.assert_array_equal(train1, np.asarray(_forward(small.model, *args, key1, train=True)))
  assert np.abs(train1 - train2).max() > 1e-3
  assert np.abs(train1 - eval1).max() > 1e-3

  no_dropout = UNet(**SMALL, dropout=0.0)
  np.testing.assert_allclose(
    np.asarray(_forward(no_dropout, *args, key1, train=True)), eval1, rtol=1e-6, atol=1e-6
  )


def test_bfloat16_compute(small):
  model = UNet(**SMALL, dropout=0.1, dtype='bfloat16')
  abstract = _abstract_params(model, 16, channels=1)
  assert {leaf.dtype for leaf in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}
  out = np.asarray(
    _forward(model, small.random_params, small.x, small.t, jax.random.key(0), train=False)
  )
  ref = np.asarray(
    _forward(small.model, small.random_params, small.x, small.t, jax.random.key(0), train=False)
  )
  assert out.dtype == np.float32
  assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 5e-2
  assert np.abs(out - ref).max() < 0.1 * np.abs(ref).max()


def _group_norm_np(x, scale, bias, groups=32, eps=1e-6):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(b, h, w, c) * scale + bias


def test_attention_block_matches_numpy():
  block = AttnBlock()
  x = np.random.default_rng(0).normal(size=(2, 4, 6, 64)).astype(np.float32)
  params = _random_params(jax.eval_shape(block.init, jax.random.key(0), x)['params'], seed=1)
  out = np.asarray(block.apply({'params': params}, jnp.asarray(x)))

  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  h = _group_norm_np(x.astype(np.float64), p['norm']['scale'], p['norm']['bias']).reshape(2, 24, 64)
  q, k, v = (h @ p[n]['kernel'] + p[n]['bias'] for n in ('q', 'k', 'v'))
  logits = q @ k.transpose(0, 2, 1) / np.sqrt(64)
  weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
  weights /= weights.sum(axis=-1, keepdims=True)
  expected = x + ((weights @ v) @ p['proj_out']['kernel'] + p['proj_out']['bias']).reshape(
    2, 4, 6, 64
  )
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_downsample_uses_tf_same_padding():
  x = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype(np.float32)
  block = Downsample(with_conv=True)
  params = _random_params(jax.eval_shape(block.init, jax.random.key(0), x)['params'], seed=2)
  out = block.apply({'params': params}, jnp.asarray(x))
  expected = (
    jax.lax.conv_general_dilated(
      x,
      params['conv']['kernel'],
      window_strides=(2, 2),
      padding=((0, 1), (0, 1)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    )
    + params['conv']['bias']
  )
  assert out.shape == (2, 4, 4, 4)
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)

  pooled = Downsample(with_conv=False).apply({}, jnp.asarray(x))
  np.testing.assert_allclose(
    np.asarray(pooled), x.reshape(2, 4, 2, 4, 2, 4).mean(axis=(2, 4)), rtol=1e-6
  )


def test_upsample_is_nearest_neighbour():
  x = np.arange(2 * 3 * 3 * 2, dtype=np.float32).reshape(2, 3, 3, 2)
  out = np.asarray(Upsample(with_conv=False).apply({}, jnp.asarray(x)))
  assert out.shape == (2, 6, 6, 2)
  np.testing.assert_array_equal(out, x[:, [0, 0, 1, 1, 2, 2]][:, :, [0, 0, 1, 1, 2, 2]])


# ----------------------------------------------------------------------------- classes


def test_unconditional_unet_has_the_papers_parameters_and_a_conditional_one_adds_a_table():
  plain = _abstract_params(UNet(**SMALL), 16, channels=1)
  assert 'label_emb' not in plain  # num_classes=None: the paper's tree, checkpoints load as before
  classes = _abstract_params(UNet(**SMALL, num_classes=10), 16, channels=1)
  assert classes['label_emb']['embedding'].shape == (11, 4 * SMALL['ch'])  # 10 classes + null
  assert {k: v for k, v in classes.items() if k != 'label_emb'} == plain


@pytest.fixture(scope='module')
def conditional(small):
  model = UNet(**SMALL, num_classes=3)
  params = jax.jit(model.init)(jax.random.key(0, impl='rbg'), small.x, small.t)['params']
  return model, _random_params(params, seed=1)


def test_labels_change_the_output_and_none_is_the_null_class(small, conditional):
  model, params = conditional
  apply = jax.jit(lambda y: model.apply({'params': params}, small.x, small.t, labels=y))
  outputs = [np.asarray(apply(jnp.array([c, c], jnp.int32))) for c in range(4)]
  assert all(np.abs(outputs[a] - outputs[b]).max() > 1e-3 for a in range(4) for b in range(a))
  null = model.apply({'params': params}, small.x, small.t)
  np.testing.assert_allclose(null, outputs[model.null_class], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='labels were given to an unconditional UNet'):
    UNet(**SMALL).apply({'params': small.params}, small.x, small.t, labels=jnp.zeros(2, jnp.int32))


def test_guidance_mixes_the_conditional_and_the_unconditional_output(small, conditional):
  model, params = conditional
  labels = jnp.array([0, 2], jnp.int32)
  cond = models.model_fn(model, params, labels=labels)(small.x, small.t)
  uncond = models.model_fn(model, params)(small.x, small.t)
  np.testing.assert_array_equal(
    models.model_fn(model, params, labels=labels, guidance=0.0)(small.x, small.t), cond
  )
  guided = models.model_fn(model, params, labels=labels, guidance=2.5)(small.x, small.t)
  np.testing.assert_allclose(guided, 3.5 * cond - 2.5 * uncond, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='guidance needs the class labels'):
    models.model_fn(model, params, guidance=1.0)
