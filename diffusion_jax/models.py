"""The DDPM U-Net (Ho et al. 2020), layer for layer as diffusion_tf/models/unet.py of the
original release.

Inputs are NHWC images in [-1, 1] and timesteps t of shape [B] (code step t=0 is the paper's
t=1):

  model = UNet(ch=128, out_ch=3, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
               attn_resolutions=(16,), dropout=0.1)
  eps = model.apply({'params': params}, x, t, train=True, rngs={'dropout': key})

Parameter names are fixed: they mirror the original TF variable scopes, and weight importers
rely on them. ``i`` is the resolution level (0 = full resolution, len(ch_mult) - 1 = lowest), ``j``
the block within a level; the up path visits i = len(ch_mult) - 1, ..., 0 and has
num_res_blocks + 1 blocks per level.

  temb_dense0, temb_dense1  Dense        kernel [in, out], bias
  conv_in, conv_out         Conv 3x3     kernel [3, 3, in, out], bias
  norm_out                  GroupNorm    scale, bias
  down_{i}_block_{j}, mid_block_1, mid_block_2, up_{i}_block_{j}
                            ResnetBlock  norm1, conv1, temb_proj (Dense), norm2, conv2,
                                         nin_shortcut (Dense over channels; only when
                                         input and output channels differ)
  down_{i}_attn_{j}, mid_attn_1, up_{i}_attn_{j}
                            AttnBlock    norm, q, k, v, proj_out (Dense over channels, [C, C])
  down_{i}_downsample       Downsample   conv (3x3 stride 2)
  up_{i}_upsample           Upsample     conv (3x3)

Attention blocks follow every block whose output resolution is in attn_resolutions;
``down_{i}_downsample`` exists for i < len(ch_mult) - 1 and ``up_{i}_upsample`` for i > 0, and
neither has parameters (nor appears) without resamp_with_conv. Parameters are always float32;
``dtype`` (a dtype or its name, e.g. 'bfloat16') is the compute dtype, and the output is float32.
``remat=True`` rematerializes every ResnetBlock and AttnBlock (``nn.remat``): the backward pass
recomputes their insides from their inputs, trading one more forward pass for activation memory;
parameters and outputs are those of ``remat=False``.
"""

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

NUM_GROUPS = 32
DEFAULT_INIT = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform')
# The original's init_scale=0: a tiny but non-zero scale, so the layer starts near zero.
NEAR_ZERO_INIT = nn.initializers.variance_scaling(1e-10, 'fan_avg', 'uniform')


def get_timestep_embedding(timesteps: jax.Array, embedding_dim: int) -> jax.Array:
  """Sinusoidal float32 embedding [B, embedding_dim] of timesteps [B]: sines of all frequencies,
  then cosines."""
  timesteps = jnp.asarray(timesteps)
  if timesteps.ndim != 1:
    raise ValueError(f'timesteps must have shape [B], got shape {timesteps.shape}.')
  if embedding_dim < 4:
    raise ValueError(f'embedding_dim must be at least 4 (two frequencies), got {embedding_dim}.')
  half = embedding_dim // 2
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / (half - 1)))
  args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
  return jnp.pad(emb, ((0, 0), (0, embedding_dim % 2)))


def compute_dtype(dtype: Any) -> jnp.dtype:
  """The floating compute dtype named by ``dtype`` (a dtype or a name such as 'bfloat16')."""
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
      f"UNet dtype must be a floating dtype such as 'float32' or 'bfloat16', got {dtype}."
    )
  return dtype


def _int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _tuple_flag(values: Sequence[int]) -> str:
  """``(1,2)``, ``(4,)``, ``()``: a sequence as one command-line word."""
  values = tuple(values)
  return f'({",".join(map(str, values))}{"," if len(values) == 1 else ""})'


def problems(
  *,
  ch: Any,
  ch_mult: Any,
  num_res_blocks: Any,
  attn_resolutions: Any,
  dropout: Any,
  dtype: Any,
  num_classes: Any = None,
  image_size: int | None = None,
  prefix: str = '',
  set_prefix: str = '',
) -> dict[str, str]:
  """What keeps ``UNet`` from taking these hyperparameters (on ``image_size`` images, if given):
  field (``prefix`` + name) -> what is wrong and the fix (``set_prefix`` + name = value)."""
  found = {}

  def say(name: str, message: str, fix: str) -> None:
    found.setdefault(f'{prefix}{name}', f'{prefix}{message}; set {set_prefix}{fix}.')

  if not _int(num_res_blocks) or num_res_blocks < 0:
    say(
      'num_res_blocks',
      f'num_res_blocks={num_res_blocks!r} must be an integer >= 0: it is the blocks per level',
      'num_res_blocks=2',
    )
  if num_classes is not None and (not _int(num_classes) or num_classes < 1):
    say('num_classes', f'num_classes={num_classes!r} must be None or >= 1', 'num_classes=10')
  if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
    say('dropout', f'dropout={dropout!r} must be in [0, 1): it is the dropout rate', 'dropout=0.1')
  try:
    compute_dtype(dtype)
  except (TypeError, ValueError):
    say(
      'dtype', f'dtype={dtype!r} is not a floating dtype name', 'dtype=float32 (or bfloat16 on TPU)'
    )
  if (
    not isinstance(ch_mult, tuple | list)
    or not ch_mult
    or not all(_int(k) and k > 0 for k in ch_mult)
  ):
    say(
      'ch_mult', f'ch_mult={ch_mult!r} must list a positive integer per level', 'ch_mult=(1,2,2,2)'
    )
    return found
  if not _int(ch) or ch < 1 or ch % NUM_GROUPS:
    widths = [ch * k for k in ch_mult] if _int(ch) else []
    suggestion = max(NUM_GROUPS, round(ch / NUM_GROUPS) * NUM_GROUPS) if _int(ch) else NUM_GROUPS
    say(
      'ch',
      f'ch={ch!r} must be a positive multiple of {NUM_GROUPS}: GroupNorm splits the channels of '
      f'every level (ch * ch_mult = {widths}) into {NUM_GROUPS} groups',
      f'ch={suggestion}',
    )
  if not _int(image_size) or image_size < 1:
    return found
  levels = len(ch_mult)
  if image_size % 2 ** (levels - 1):
    fit = max(n for n in range(1, levels + 1) if image_size % 2 ** (n - 1) == 0)
    say(
      'ch_mult',
      f'ch_mult={tuple(ch_mult)} has {levels} levels, which halve the image {levels - 1} times, '
      f'but the image size {image_size} is not divisible by {2 ** (levels - 1)}; use at most '
      f'{fit} levels for {image_size}x{image_size} images',
      f'ch_mult={_tuple_flag(ch_mult[:fit])}',
    )
  attn = (
    tuple(attn_resolutions) if isinstance(attn_resolutions, tuple | list) else (attn_resolutions,)
  )
  sizes = [image_size // 2**i for i in range(levels) if image_size // 2**i]
  wrong = [r for r in attn if r not in sizes]
  if wrong:
    kept = tuple(r for r in attn if r in sizes) or (sizes[len(sizes) // 2],)
    say(
      'attn_resolutions',
      f'attn_resolutions={attn}: {", ".join(map(str, wrong))} is not a feature-map size of this '
      f'U-Net ({image_size}x{image_size} images over {levels} levels: {sizes}), so no layer '
      'would attend there',
      f'attn_resolutions={_tuple_flag(kept)} (or () for none)',
    )
  return found


def _group_norm(dtype: Any, name: str) -> nn.GroupNorm:
  """GroupNorm as in the original: 32 groups, eps 1e-6, two-pass (mean, then variance)
  statistics."""
  return nn.GroupNorm(
    num_groups=NUM_GROUPS, epsilon=1e-6, use_fast_variance=False, dtype=dtype, name=name
  )


def _conv3x3(
  features: int,
  dtype: Any,
  name: str,
  strides: int = 1,
  kernel_init: nn.initializers.Initializer = DEFAULT_INIT,
) -> nn.Conv:
  """3x3 convolution with TF 'SAME' padding."""
  return nn.Conv(
    features,
    (3, 3),
    strides=strides,
    padding='SAME',
    dtype=dtype,
    kernel_init=kernel_init,
    name=name,
  )


def _dense(
  features: int, dtype: Any, name: str, kernel_init: nn.initializers.Initializer = DEFAULT_INIT
) -> nn.Dense:
  """Dense over the last axis (the original's ``dense``, and ``nin`` for a 1x1 projection over
  channels)."""
  return nn.Dense(features, dtype=dtype, kernel_init=kernel_init, name=name)


class ResnetBlock(nn.Module):
  """Wide-ResNet block with the projected timestep embedding added between its two convolutions."""

  out_ch: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
    """Maps x [B, H, W, C] and temb [B, E] to [B, H, W, out_ch]."""
    h = nn.swish(_group_norm(self.dtype, 'norm1')(x))
    h = _conv3x3(self.out_ch, self.dtype, 'conv1')(h)
    h = h + _dense(self.out_ch, self.dtype, 'temb_proj')(nn.swish(temb))[:, None, None, :]
    h = nn.swish(_group_norm(self.dtype, 'norm2')(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = _conv3x3(self.out_ch, self.dtype, 'conv2', kernel_init=NEAR_ZERO_INIT)(h)
    if x.shape[-1] != self.out_ch:
      x = _dense(self.out_ch, self.dtype, 'nin_shortcut')(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all H*W positions, with a residual connection."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps x [B, H, W, C] to [B, H, W, C]; the softmax runs in float32 whatever the compute
    dtype."""
    b, height, width, c = x.shape
    h = _group_norm(self.dtype, 'norm')(x)
    q, k, v = (
      _dense(c, self.dtype, name)(h).reshape(b, height * width, c) for name in ('q', 'k', 'v')
    )
    logits = jnp.einsum('bic,bjc->bij', q, k, preferred_element_type=jnp.float32) * (c**-0.5)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    h = jnp.einsum('bij,bjc->bic', weights, v).reshape(b, height, width, c)
    return x + _dense(c, self.dtype, 'proj_out', kernel_init=NEAR_ZERO_INIT)(h)


class Downsample(nn.Module):
  """Halves H and W: 3x3 stride-2 conv with TF 'SAME' padding (0 before, 1 after), or a 2x2
  average pool."""

  with_conv: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps x [B, H, W, C] (H, W even) to [B, H/2, W/2, C]."""
    if self.with_conv:
      return _conv3x3(x.shape[-1], self.dtype, 'conv', strides=2)(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Upsample(nn.Module):
  """Doubles H and W: nearest-neighbour repeat, then (optionally) a 3x3 conv."""

  with_conv: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps x [B, H, W, C] to [B, 2H, 2W, C]."""
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    if self.with_conv:
      x = _conv3x3(x.shape[-1], self.dtype, 'conv')(x)
    return x


class UNet(nn.Module):
  """The DDPM noise-prediction U-Net eps_theta(x_t, t); see the module docstring for its
  parameter names."""

  ch: int
  out_ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  dropout: float = 0.0
  resamp_with_conv: bool = True
  dtype: Any = jnp.float32
  remat: bool = False
  num_classes: int | None = None  # class-conditional (Ho & Salimans 2021) if set

  @property
  def null_class(self) -> int:
    """The label of "no class" (the unconditional model of classifier-free guidance)."""
    return self.num_classes

  def _check(self, x: jax.Array, t: jax.Array) -> None:
    """Raises ValueError, saying what to change, for hyperparameters or inputs the network
    cannot take."""
    if x.ndim != 4 or x.shape[1] != x.shape[2]:
      raise ValueError(
        f'x must be a batch of square NHWC images [B, S, S, C], got shape {x.shape}.'
      )
    if t.shape != (x.shape[0],):
      raise ValueError(f't must have shape [B] = ({x.shape[0]},) to match x, got shape {t.shape}.')
    found = problems(
      ch=self.ch,
      ch_mult=self.ch_mult,
      num_res_blocks=self.num_res_blocks,
      attn_resolutions=(),  # a resolution no level has only means no attention there
      dropout=self.dropout,
      dtype=self.dtype,
      image_size=x.shape[1],
    )
    if found:
      raise ValueError(' '.join(found.values()))

  @nn.compact
  def __call__(
    self, x: jax.Array, t: jax.Array, train: bool = False, labels: jax.Array | None = None
  ) -> jax.Array:
    """Maps x [B, S, S, C] in [-1, 1] and integer timesteps t [B] (and, if ``num_classes``, class
    labels [B], ``null_class`` or None for none) to float32 [B, S, S, out_ch]."""
    t = jnp.asarray(t)
    self._check(x, t)
    if labels is not None and self.num_classes is None:
      raise ValueError('labels were given to an unconditional UNet (num_classes is None).')
    dtype = compute_dtype(self.dtype)
    num_levels = len(self.ch_mult)
    resnet_block, attn_block = ResnetBlock, AttnBlock
    if self.remat:  # keep only each block's inputs for the backward pass; same names and params
      resnet_block = nn.remat(ResnetBlock, static_argnums=(3,))  # (self, x, temb, train)
      attn_block = nn.remat(AttnBlock)
    block = functools.partial(resnet_block, dropout=self.dropout, dtype=dtype)

    temb = get_timestep_embedding(t, self.ch)
    temb = _dense(4 * self.ch, dtype, 'temb_dense0')(temb)
    temb = _dense(4 * self.ch, dtype, 'temb_dense1')(nn.swish(temb))
    if self.num_classes is not None:  # a class embedding added to the time embedding
      if labels is None:
        labels = jnp.full(x.shape[:1], self.null_class, jnp.int32)
      table = nn.Embed(self.num_classes + 1, 4 * self.ch, dtype=dtype, name='label_emb')
      temb = temb + table(labels)

    hs = [_conv3x3(self.ch, dtype, 'conv_in')(x)]
    for i, mult in enumerate(self.ch_mult):
      for j in range(self.num_res_blocks):
        h = block(self.ch * mult, name=f'down_{i}_block_{j}')(hs[-1], temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attn_block(dtype, name=f'down_{i}_attn_{j}')(h)
        hs.append(h)
      if i != num_levels - 1:
        hs.append(Downsample(self.resamp_with_conv, dtype, name=f'down_{i}_downsample')(hs[-1]))

    h = hs[-1]
    h = block(h.shape[-1], name='mid_block_1')(h, temb, train)
    h = attn_block(dtype, name='mid_attn_1')(h)
    h = block(h.shape[-1], name='mid_block_2')(h, temb, train)

    for i in reversed(range(num_levels)):
      for j in range(self.num_res_blocks + 1):
        h = block(self.ch * self.ch_mult[i], name=f'up_{i}_block_{j}')(
          jnp.concatenate([h, hs.pop()], axis=-1), temb, train
        )
        if h.shape[1] in self.attn_resolutions:
          h = attn_block(dtype, name=f'up_{i}_attn_{j}')(h)
      if i != 0:
        h = Upsample(self.resamp_with_conv, dtype, name=f'up_{i}_upsample')(h)

    h = nn.swish(_group_norm(dtype, 'norm_out')(h))
    h = _conv3x3(self.out_ch, dtype, 'conv_out', kernel_init=NEAR_ZERO_INIT)(h)
    return h.astype(jnp.float32)


def model_fn(
  model: nn.Module,
  params: Any,
  *,
  dropout_rng: jax.Array | None = None,
  labels: jax.Array | None = None,
  guidance: float = 0.0,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """``(x_t, t) -> output`` of ``model``: in train mode (dropout) iff ``dropout_rng`` is given;
  of the classes ``labels`` if given; with classifier-free guidance w = ``guidance`` (Ho &
  Salimans 2021) the output is (1 + w) f(x, c) − w f(x, ∅), both in one batched call."""
  train = dropout_rng is not None
  rngs = {'dropout': dropout_rng} if train else None

  def apply(x: jax.Array, t: jax.Array, y: jax.Array | None) -> jax.Array:
    return model.apply({'params': params}, x, t, train=train, labels=y, rngs=rngs)

  def conditional(x: jax.Array, t: jax.Array) -> jax.Array:
    return apply(x, t, labels)

  if not guidance:
    return conditional
  if labels is None:
    raise ValueError('classifier-free guidance needs the class labels to guide toward.')

  def guided(x: jax.Array, t: jax.Array) -> jax.Array:
    null = jnp.full_like(labels, model.null_class)
    both = apply(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([labels, null]))
    cond, uncond = jnp.split(both, 2)
    return (1.0 + guidance) * cond - guidance * uncond

  return guided
