"""FID Inception-v3 in Flax (the 2015-12-05 graph used by TTUR, TF-GAN and pytorch-fid), its
weights, and the FID / IS metrics.

The network is pytorch-fid's ``fid_inception_v3()``: torchvision's Inception3 with the
FIDInceptionA/C/E_1/E_2 blocks (3x3 average pools that ignore padding, a 3x3 max pool in
Mixed_7c's pool branch), convs without bias, BatchNorm with eps 1e-3 in inference mode, no
AuxLogits and a 1008-way fc. Images are NHWC in [0, 1] of any size; they are resized to 299x299
like torch's ``F.interpolate(mode='bilinear', align_corners=False)`` and scaled to [-1, 1].
Outputs are the 2048-d pool3 features (global average after Mixed_7c) and the 1008 logits.

Param names mirror torchvision's Inception3 ('/'-joined in the .npz): torch's
``<block>[.<branch>].conv.weight`` (O, I, kh, kw) is ``<block>[/<branch>]/conv/kernel`` (kh, kw, I,
O); ``.bn.weight/bias/running_mean/running_var`` are ``bn/scale/bias/mean/var``; ``fc.weight``
(1008, 2048) is ``fc/kernel`` (2048, 1008).

Weights: convert pytorch-fid's pt_inception-2015-12-05-6726825d.pth once (needs torch) with
  python -m diffusion_jax.fid --pytorch_fid_weights=pt_inception-2015-12-05-6726825d.pth \\
      --output=inception_fid.npz
The statistics and distances live in ``feature_metrics`` (``frechet_distance``,
``inception_score``, ``FeatureStats``, ``save_stats``, ``load_stats``); their old names here,
``fid.frechet_distance`` and the others, still work with a deprecation warning."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from etils import epath
from flax.traverse_util import flatten_dict, unflatten_dict

from diffusion_jax import feature_metrics, npz, torch_weights

Params = Mapping[str, Any]

INCEPTION_SIZE = 299
POOL3_DIM = 2048
NUM_LOGITS = 1008
PYTORCH_FID_WEIGHTS = 'pt_inception-2015-12-05-6726825d.pth'
PYTORCH_FID_WEIGHTS_URL = (
  'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/' + PYTORCH_FID_WEIGHTS
)
_HIGHEST = jax.lax.Precision.HIGHEST  # TPU convs/matmuls in f32, as the reference computes
_MOVED = ('FeatureStats', 'frechet_distance', 'inception_score', 'load_stats', 'save_stats')


def __getattr__(name: str) -> Any:
  """``fid.frechet_distance`` and the other statistics of earlier releases, deprecated."""
  if name not in _MOVED:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  warnings.warn(
    f'diffusion_jax.fid.{name} is deprecated: use diffusion_jax.feature_metrics.{name}.',
    DeprecationWarning,
    stacklevel=2,
  )
  return getattr(feature_metrics, name)


# ----------------------------------------------------------------------------- network


class FrozenBatchNorm(nn.Module):
  """Inference-mode BatchNorm whose running statistics are plain params."""

  eps: float = 1e-3

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,))
    bias = self.param('bias', nn.initializers.zeros, (c,))
    mean = self.param('mean', nn.initializers.zeros, (c,))
    var = self.param('var', nn.initializers.ones, (c,))
    inv = scale * jax.lax.rsqrt(var + self.eps)
    return x * inv + (bias - mean * inv)


class BasicConv(nn.Module):
  """torchvision's BasicConv2d: bias-free conv, BatchNorm, ReLU."""

  features: int
  kernel: tuple[int, int] = (1, 1)
  stride: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = self.padding
    x = nn.Conv(
      self.features,
      self.kernel,
      strides=self.stride,
      padding=((ph, ph), (pw, pw)),
      use_bias=False,
      precision=_HIGHEST,
      name='conv',
    )(x)
    return nn.relu(FrozenBatchNorm(name='bn')(x))


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  """3x3 stride-1 average pool over the unpadded window (TF's, i.e. count_include_pad=False)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array) -> jax.Array:
  """3x3 stride-1 max pool with 1-pixel padding that never wins (FIDInceptionE_2's pool branch)."""
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """3x3 stride-2 unpadded max pool."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


class InceptionA(nn.Module):
  """FIDInceptionA (Mixed_5b/5c/5d)."""

  pool_features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = BasicConv(64, name='branch1x1')(x)
    b5 = BasicConv(48, name='branch5x5_1')(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name='branch5x5_2')(b5)
    b3 = BasicConv(64, name='branch3x3dbl_1')(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(b3)
    bp = BasicConv(self.pool_features, name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """InceptionB (Mixed_6a), grid reduction 35 -> 17."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = BasicConv(384, (3, 3), stride=2, name='branch3x3')(x)
    bd = BasicConv(64, name='branch3x3dbl_1')(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = BasicConv(96, (3, 3), stride=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """FIDInceptionC (Mixed_6b..6e) with factorized 7x7 convs."""

  channels_7x7: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c7 = self.channels_7x7
    b1 = BasicConv(192, name='branch1x1')(x)
    b7 = BasicConv(c7, name='branch7x7_1')(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = BasicConv(c7, name='branch7x7dbl_1')(x)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = BasicConv(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = BasicConv(192, name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """InceptionD (Mixed_7a), grid reduction 17 -> 8."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = BasicConv(192, name='branch3x3_1')(x)
    b3 = BasicConv(320, (3, 3), stride=2, name='branch3x3_2')(b3)
    b7 = BasicConv(192, name='branch7x7x3_1')(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = BasicConv(192, (3, 3), stride=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """FIDInceptionE_1 (Mixed_7b, average pool) or FIDInceptionE_2 (Mixed_7c, max pool)."""

  max_pool: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = BasicConv(320, name='branch1x1')(x)
    b3 = BasicConv(384, name='branch3x3_1')(x)
    b3 = jnp.concatenate(
      [
        BasicConv(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
        BasicConv(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3),
      ],
      axis=-1,
    )
    bd = BasicConv(448, name='branch3x3dbl_1')(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate(
      [
        BasicConv(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
        BasicConv(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd),
      ],
      axis=-1,
    )
    pool = _max_pool_3x3 if self.max_pool else _avg_pool_3x3
    bp = BasicConv(192, name='branch_pool')(pool(x))
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def preprocess(images: jax.Array) -> jax.Array:
  """Resizes NHWC [0, 1] images to 299x299 (torch bilinear, align_corners=False) and scales
  them to [-1, 1]."""
  n, _, _, c = images.shape
  x = jax.image.resize(
    images.astype(jnp.float32),
    (n, INCEPTION_SIZE, INCEPTION_SIZE, c),
    method='bilinear',
    antialias=False,
  )
  return 2.0 * x - 1.0


class FIDInceptionV3(nn.Module):
  """pytorch-fid's FID Inception-v3: NHWC [0, 1] images -> (pool3 (N, 2048), logits (N, 1008))."""

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'expected NHWC RGB images of shape (N, H, W, 3), got {images.shape}')
    x = preprocess(images)
    x = BasicConv(32, (3, 3), stride=2, name='Conv2d_1a_3x3')(x)
    x = BasicConv(32, (3, 3), name='Conv2d_2a_3x3')(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
    x = _max_pool_3x3_s2(x)
    x = BasicConv(80, name='Conv2d_3b_1x1')(x)
    x = BasicConv(192, (3, 3), name='Conv2d_4a_3x3')(x)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(32, name='Mixed_5b')(x)
    x = InceptionA(64, name='Mixed_5c')(x)
    x = InceptionA(64, name='Mixed_5d')(x)
    x = InceptionB(name='Mixed_6a')(x)
    x = InceptionC(128, name='Mixed_6b')(x)
    x = InceptionC(160, name='Mixed_6c')(x)
    x = InceptionC(160, name='Mixed_6d')(x)
    x = InceptionC(192, name='Mixed_6e')(x)
    x = InceptionD(name='Mixed_7a')(x)
    x = InceptionE(max_pool=False, name='Mixed_7b')(x)
    x = InceptionE(max_pool=True, name='Mixed_7c')(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(NUM_LOGITS, precision=_HIGHEST, name='fc')(pool3)
    return pool3, logits


_MODEL = FIDInceptionV3()


@jax.jit
def inception_outputs(params: Params, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Pool3 features (N, 2048) and logits (N, 1008) of NHWC [0, 1] images."""
  return _MODEL.apply({'params': params}, images)


# ----------------------------------------------------------------------------- weights

_TORCH_LEAF = {
  'kernel': 'weight',
  'scale': 'weight',
  'bias': 'bias',
  'mean': 'running_mean',
  'var': 'running_var',
}
_WEIGHTS_HELP = (
  "no FID Inception weights at {path!r}. Download pytorch-fid's {name} (GitHub release "
  '"fid_weights" of mseitzer/pytorch-fid: {url}) and convert it once, where torch is installed, '
  'with: python -m diffusion_jax.fid --pytorch_fid_weights={name} --output={path}'
)


@functools.cache
def param_shapes() -> dict[str, tuple[int, ...]]:
  """'/'-joined Flax param name -> shape, for every param of the FID Inception."""
  images = jax.ShapeDtypeStruct((1, INCEPTION_SIZE, INCEPTION_SIZE, 3), jnp.float32)
  abstract = jax.eval_shape(_MODEL.init, jax.random.key(0), images)['params']
  return {name: tuple(leaf.shape) for name, leaf in flatten_dict(abstract, sep='/').items()}


def _torch_name(name: str) -> str:
  """torchvision Inception3 state-dict key of a '/'-joined Flax param name."""
  *path, leaf = name.split('/')
  return '.'.join([*path, _TORCH_LEAF[leaf]])


def params_from_pytorch_fid(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Flax params from pytorch-fid's FID Inception state dict (strict; the BatchNorms'
  ``num_batches_tracked`` are ignored)."""
  wanted = {
    name: torch_weights.Wanted((_torch_name(name),), torch_weights.torch_shape(shape), name)
    for name, shape in param_shapes().items()
  }
  counters = {  # torch's BatchNorm counters: not parameters
    w.keys[0].replace('running_mean', 'num_batches_tracked')
    for w in wanted.values()
    if w.keys[0].endswith('.bn.running_mean')
  }
  shapes = {k: np.shape(v) for k, v in state_dict.items()}
  match = torch_weights.match([wanted], shapes, ignore=counters.__contains__)
  if not match.ok:
    raise ValueError(
      match.report(
        f'pytorch-fid state dict does not match the FID Inception-v3 ({len(wanted)} tensors '
        f"expected, pytorch-fid's {PYTORCH_FID_WEIGHTS} naming: torchvision Inception3 without "
        'AuxLogits, 1008-way fc):'
      )
    )
  flat = {
    name: torch_weights.from_torch(np.asarray(state_dict[key], np.float32))
    for name, key in match.found[0].items()
  }
  return unflatten_dict(flat, sep='/')


def save_params(path: epath.PathLike, params: Params) -> None:
  """Writes params to a flat .npz with '/'-joined keys (any epath, atomically)."""
  npz.write(path, {name: np.asarray(v) for name, v in flatten_dict(params, sep='/').items()})


def load_params(path: epath.PathLike) -> dict[str, Any]:
  """Reads and checks FID Inception params written by ``save_params``."""
  if not epath.Path(path).exists():
    raise FileNotFoundError(
      _WEIGHTS_HELP.format(path=str(path), name=PYTORCH_FID_WEIGHTS, url=PYTORCH_FID_WEIGHTS_URL)
    )
  flat = npz.read(path)
  wanted = {name: torch_weights.Wanted((name,), shape) for name, shape in param_shapes().items()}
  match = torch_weights.match([wanted], {name: value.shape for name, value in flat.items()})
  if not match.ok:
    raise ValueError(
      match.report(
        f'params file {str(path)!r} does not match the FID Inception-v3 ({len(wanted)} tensors '
        'expected); write it with save_params from params_from_pytorch_fid:'
      )
    )
  return unflatten_dict(flat, sep='/')


def read_torch_state_dict(path: epath.PathLike) -> dict[str, np.ndarray]:
  """Reads a .pth state dict into numpy arrays (needs torch, imported only there)."""
  return torch_weights.read_state_dict(
    path,
    hint='Run the conversion in an environment with torch and copy the .npz back; do not '
    'install torch into the JAX training environment.',
  )


# ----------------------------------------------------------------------------- command line

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  """Converts pytorch-fid's .pth weights into this module's .npz."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  params = params_from_pytorch_fid(read_torch_state_dict(FLAGS.pytorch_fid_weights))
  save_params(FLAGS.output, params)
  logging.info('wrote %d FID Inception tensors to %s', len(param_shapes()), FLAGS.output)


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so importing never clashes)."""
  flags.DEFINE_string(
    'pytorch_fid_weights', None, f"pytorch-fid's {PYTORCH_FID_WEIGHTS} ({PYTORCH_FID_WEIGHTS_URL})"
  )
  flags.DEFINE_string('output', 'inception_fid.npz', 'Where to write the Flax params (.npz).')
  flags.mark_flag_as_required('pytorch_fid_weights')


if __name__ == '__main__':
  define_flags()
  app.run(main)
