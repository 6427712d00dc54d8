"""Evaluation of the EMA model: sample quality (FID/IS or the digits metric) and test bits/dim.

One ``Evaluator`` serves both ``--mode=eval`` (``evaluate_checkpoint``: ``eval.num_samples``
samples, the whole NLL split, a report folder) and the train loop (``make_in_loop_evaluator``:
``eval.in_loop_num_samples``, scalars only). Everything collective runs on every host:

- Samples are drawn with one compiled ``sampling.make_sample_fn`` in chunks of (at most)
  ``eval.batch_size``, chunk c with ``fold_in(rng, c)``; only the first ``num_samples`` are scored.
- Inception runs sharded where the samples live (each device featurizes its own rows); the pool3
  features and logits of each chunk are then all-gathered, so every host accumulates the same
  float64 statistics: per chunk of 256 that moves 256 x (2048 + 1008) float32 = 3.1 MB to each
  host, and the logits kept for IS take 200 MB at 50k samples. Images never leave their devices.
- The digits metric needs the images themselves (uint8 digits: 32 kB at 500 8x8 samples); they
  are all-gathered and scored on every host.
- Bits/dim is the full bound (Eq. 5, ``calc_bpd_loop``) sharded over the ``data`` mesh; example i
  of the eval stream draws its noise with ``fold_in(rng, i)``, so its bound does not depend on
  the device count or padding; padded rows (mask 0) are excluded and masked sums are psum'd.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from matplotlib.figure import Figure

from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import (
  digits_metric,
  fid,
  input_pipeline,
  sampling,
  train,  # used at call time only: train.py may import this module
)

DATA_AXIS = sampling.DATA_AXIS
METRICS = ('inception', 'digits')
NUM_IS_SPLITS = 10
NUM_GRID_IMAGES = 64
EVAL_SEED_OFFSET = 3  # train grids use seed + 1, --mode=sample seed + 2
ApplyFn = Callable[[Any, jax.Array, jax.Array], jax.Array]
BpdFn = Callable[
  [Any, jax.Array, jax.Array, int, jax.Array], tuple[jax.Array, dict[str, jax.Array]]
]
Scorer = Callable[[Iterable[jax.Array], int], dict[str, Any]]

_INCEPTION_HELP = (
  'eval.metrics="inception" needs the FID Inception weights, but config.eval.inception_path is not '
  "set. Download pytorch-fid's {name} ({url}), convert it once where torch is installed with\n"
  '  python -m diffusion_jax.fid --pytorch_fid_weights={name} --output=inception_fid.npz\n'
  'and pass --config.eval.inception_path=inception_fid.npz (or use eval.metrics="digits" for '
  'sklearn_digits). See docs/evaluation.md.'
)


# ----------------------------------------------------------------------------- config


def check_eval_config(config: ml_collections.ConfigDict) -> None:
  """Clear SetupErrors for eval settings that cannot run, before anything expensive is built."""
  if 'eval' not in config:
    raise train.SetupError(
      'The config has no `eval` section; add the eval.* fields of '
      'configs/default.py (see docs/evaluation.md).'
    )
  ev = config.eval
  if ev.metrics not in METRICS:
    raise train.SetupError(f'Unknown eval.metrics {ev.metrics!r}; choose one of {METRICS}.')
  if ev.metrics == 'digits' and config.dataset.name.split(':')[0] != digits_metric.DATASET_NAME:
    raise train.SetupError(
      f'eval.metrics="digits" scores only {digits_metric.DATASET_NAME!r}, but '
      f'dataset.name is {config.dataset.name!r}; use eval.metrics="inception".'
    )
  if ev.metrics == 'inception' and not ev.inception_path:
    raise train.SetupError(
      _INCEPTION_HELP.format(name=fid.PYTORCH_FID_WEIGHTS, url=fid.PYTORCH_FID_WEIGHTS_URL)
    )
  minimum = NUM_IS_SPLITS if ev.metrics == 'inception' else 2
  for name in ('num_samples', 'in_loop_num_samples'):
    if ev[name] < minimum:
      raise train.SetupError(
        f'eval.{name}={ev[name]} is too small: {ev.metrics} metrics need at '
        f'least {minimum} samples.'
      )
  if ev.batch_size < 1:
    raise train.SetupError(f'eval.batch_size must be >= 1, got {ev.batch_size}.')
  if ev.nll_num_examples is not None and ev.nll_num_examples < 1:
    raise train.SetupError(
      f'eval.nll_num_examples must be None (the whole split) or >= 1, got {ev.nll_num_examples}.'
    )


def nll_split(config: ml_collections.ConfigDict) -> str:
  """``eval.nll_split``, cut to its first ``eval.nll_num_examples`` examples if that is set."""
  k = config.eval.nll_num_examples
  return config.eval.nll_split if k is None else f'{config.eval.nll_split}[:{k}]'


def _round_up(n: int, multiple: int) -> int:
  """The smallest multiple of ``multiple`` that is >= ``n``."""
  return -(-n // multiple) * multiple


def global_batch_size(config: ml_collections.ConfigDict, mesh: Mesh) -> int:
  """``eval.batch_size`` rounded up to a multiple of the device count: the NLL data's global batch."""
  return _round_up(config.eval.batch_size, mesh.devices.size)


# ----------------------------------------------------------------------------- samples


def sample_chunks(
  sample_fn: Callable[[Any, jax.Array], jax.Array], params: Any, rng: jax.Array, num_chunks: int
) -> Iterator[jax.Array]:
  """Yields ``num_chunks`` sharded sample arrays in [-1, 1], chunk c drawn with ``fold_in(rng, c)``."""
  for c in range(num_chunks):
    yield sample_fn(params, jax.random.fold_in(rng, c))


def gathered_rows(chunks: Iterable[Any], num_rows: int) -> Iterator[Any]:
  """Each chunk (a pytree of global arrays with a leading row axis) as numpy on every host,
  trimmed so that exactly the first ``num_rows`` rows come out; stops pulling chunks after that."""
  remaining = num_rows
  for chunk in chunks:
    rows = jax.tree.map(lambda x: _gather(x)[:remaining], chunk)
    remaining -= len(jax.tree.leaves(rows)[0])
    yield rows
    if remaining <= 0:
      return


def _gather(x: jax.Array) -> np.ndarray:
  """A global array, whole, as numpy on every host."""
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _global_arrays(mesh: Mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """This process's rows → global arrays sharded on the leading axis over ``mesh``."""
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
  }


def _host_value(x: jax.Array) -> np.ndarray:
  """A replicated array's value on this host."""
  return np.asarray(x.addressable_data(0))


# ----------------------------------------------------------------------------- FID / IS


def inception_input(images: jax.Array) -> jax.Array:
  """[-1, 1] → 8-bit values as [0, 1] floats (uint8 / 255, as pytorch-fid reads PNGs); gray → RGB."""
  x = jnp.clip(jnp.round((images + 1.0) * 127.5), 0.0, 255.0) / 255.0
  return jnp.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def make_inception_fn(mesh: Mesh) -> Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]:
  """Jitted ``(params, [-1, 1] images) → (pool3, IS logits)`` over ``mesh``; rows stay on their device.

  The IS logits are pool3 @ W without the fc bias, as OpenAI's IS code computes them.
  """

  def per_device(params, images):
    pool3, logits = fid.inception_outputs(params, inception_input(images))
    return pool3, logits - params['fc']['bias']

  return jax.jit(
    jax.shard_map(
      per_device, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=(P(DATA_AXIS), P(DATA_AXIS))
    )
  )


def _slug(name: str) -> str:
  """'lsun/bedroom' → 'lsun_bedroom', 'test[:20]' → 'test_20'."""
  return re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')


def reference_stats_path(
  cache_dir: epath.PathLike, config: ml_collections.ConfigDict, split: str, count: int
) -> epath.Path:
  """``<cache_dir>/<dataset>_<size>px_<split>_<count>.npz``, e.g. ``cifar10_32px_train_50000.npz``."""
  name = f'{_slug(config.dataset.name)}_{config.dataset.image_size}px_{_slug(split)}_{count}.npz'
  return epath.Path(cache_dir) / name


def _exists_everywhere(path: epath.Path) -> bool:
  """Whether ``path`` exists, as process 0 sees it (so every host takes the same branch)."""
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(path.exists())))


def _write_bytes_atomic(path: epath.Path, data: bytes) -> None:
  """Writes via a temporary sibling and a rename, so readers never see a partial file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f'.{path.name}.tmp'
  tmp.write_bytes(data)
  tmp.replace(path)


def inception_reference_stats(
  config: ml_collections.ConfigDict,
  inception_fn: Callable,
  inception_params: Any,
  mesh: Mesh,
  *,
  split: str,
  cache_dir: epath.PathLike,
) -> tuple[np.ndarray, np.ndarray, int]:
  """(mu, sigma, count) of the pool3 features of a TFDS split, cached (``fid.save_stats``'s format)."""
  count = input_pipeline.get_builder(config).info.splits[split].num_examples
  path = reference_stats_path(cache_dir, config, split, count)
  if _exists_everywhere(path):
    with np.load(io.BytesIO(path.read_bytes())) as f:
      logging.info('FID reference statistics from %s.', path)
      return np.asarray(f['mu'], np.float64), np.asarray(f['sigma'], np.float64), count
  logging.info(
    'Computing FID reference statistics of %s[%s] (%d images) into %s.',
    config.dataset.name,
    split,
    count,
    path,
  )
  stats = fid.FeatureStats(fid.POOL3_DIM)
  batches, _ = input_pipeline.create_eval_dataset(
    config, split, batch_size=global_batch_size(config, mesh)
  )
  for local in batches:
    batch = _global_arrays(mesh, local)
    pool3 = _gather(inception_fn(inception_params, batch['image'])[0])
    stats.update(pool3[_gather(batch['mask']) > 0])
  mu, sigma = stats.mean_cov()
  if jax.process_index() == 0:
    buffer = io.BytesIO()
    np.savez(buffer, mu=mu, sigma=sigma, num_images=np.int64(stats.num))
    _write_bytes_atomic(path, buffer.getvalue())
  return mu, sigma, count


def inception_metrics(
  inception_fn: Callable,
  inception_params: Any,
  chunks: Iterable[jax.Array],
  num_samples: int,
  reference: tuple[np.ndarray, np.ndarray],
) -> dict[str, float]:
  """FID against ``reference`` (mu, sigma) and IS (10 splits) of the first ``num_samples`` samples."""
  stats, logits = fid.FeatureStats(fid.POOL3_DIM), []
  outputs = (inception_fn(inception_params, samples) for samples in chunks)
  for pool3, chunk_logits in gathered_rows(outputs, num_samples):
    stats.update(pool3)
    logits.append(chunk_logits)
  is_mean, is_std = fid.inception_score(np.concatenate(logits), NUM_IS_SPLITS)
  return {
    'fid': fid.frechet_distance(*stats.mean_cov(), *reference),
    'is': is_mean,
    'is_std': is_std,
  }


# ----------------------------------------------------------------------------- digits


def digits_sample_metrics(
  classifier: digits_metric.DigitsClassifier,
  reference: tuple[np.ndarray, np.ndarray],
  chunks: Iterable[jax.Array],
  num_samples: int,
) -> dict[str, Any]:
  """Digits FD to the real reference, confident fraction and class balance of ``num_samples``."""
  images = np.concatenate([sampling.to_uint8(rows) for rows in gathered_rows(chunks, num_samples)])
  m = digits_metric.digits_metrics(classifier, images, reference)
  return {
    'digits_fd': m['fd'],
    'digits_confident_fraction': m['confident_fraction'],
    'digits_min_class_fraction': m['min_class_fraction'],
    'digits_max_class_fraction': m['max_class_fraction'],
    'digits_class_histogram': m['class_histogram'],
  }


@dataclasses.dataclass(frozen=True)
class SampleScorer:
  """Scores sample chunks with loaded weights and reference statistics; says which reference."""

  score: Scorer
  reference_split: str
  reference_count: int


def make_scorer(
  config: ml_collections.ConfigDict, workdir: epath.PathLike, mesh: Mesh
) -> SampleScorer:
  """Loads the metric's network and reference statistics (computed once and cached)."""
  ev, split = config.eval, config.eval.reference_split
  if ev.metrics == 'digits':
    classifier = digits_metric.load_or_train_classifier(config, cache_dir=ev.reference_dir)
    reference = digits_metric.reference_stats(
      config, split, classifier=classifier, cache_dir=ev.reference_dir
    )
    count = input_pipeline.get_builder(config).info.splits[split].num_examples
    return SampleScorer(
      lambda chunks, n: digits_sample_metrics(classifier, reference, chunks, n), split, count
    )
  try:
    params = fid.load_params(ev.inception_path)
  except FileNotFoundError as e:
    raise train.SetupError(f'config.eval.inception_path: {e}') from None
  params = jax.device_put(params, NamedSharding(mesh, P()))  # once, not per call
  inception_fn = make_inception_fn(mesh)
  cache_dir = ev.reference_dir or epath.Path(workdir) / 'fid_stats'
  mu, sigma, count = inception_reference_stats(
    config, inception_fn, params, mesh, split=split, cache_dir=cache_dir
  )
  return SampleScorer(
    lambda chunks, n: inception_metrics(inception_fn, params, chunks, n, (mu, sigma)), split, count
  )


# ----------------------------------------------------------------------------- bits/dim


def flax_apply_fn(model: nn.Module) -> ApplyFn:
  """``(params, x_t, t) → model output`` of a Flax U-Net in inference mode."""
  return lambda params, x, t: model.apply({'params': params}, x, t, train=False)


def make_bpd_fn(
  apply_fn: ApplyFn, diffusion: diffusion_lib.GaussianDiffusion, mesh: Mesh, *, clip_denoised: bool
) -> BpdFn:
  """Jitted ``bpd(params, images, mask, offset, rng) → (per-example total bits/dim, masked sums)``.

  ``images`` [B, ...] and ``mask`` [B] are sharded over ``mesh``; row r is example ``offset + r``
  and draws its noise with ``fold_in(rng, offset + r)``. The sums (count, total, prior, and the
  per-t terms and x̂_0 squared errors) cover the mask-1 rows only and are psum'd (replicated).
  """

  def per_device(params, images, mask, offset, rng):
    n = images.shape[0]
    index = offset + jax.lax.axis_index(DATA_AXIS) * n + jnp.arange(n)
    model_fn = lambda x, t: apply_fn(params, x, t)

    def one_example(x, i):
      out = diffusion.calc_bpd_loop(model_fn, x[None], jax.random.fold_in(rng, i), clip_denoised)
      return jax.tree.map(lambda a: a[0], out)

    out = jax.vmap(one_example)(images, index)
    keep = mask > 0
    masked_sum = lambda a: jnp.sum(
      jnp.where(keep.reshape((n,) + (1,) * (a.ndim - 1)), a, 0.0), axis=0
    )
    sums = dict(
      count=jnp.sum(keep.astype(jnp.float32)),
      total_bpd=masked_sum(out['total_bpd']),
      prior_bpd=masked_sum(out['prior_bpd']),
      terms_bpd=masked_sum(out['terms_bpd']),
      xstart_mse=masked_sum(out['xstart_mse']),
    )
    return out['total_bpd'], jax.lax.psum(sums, DATA_AXIS)

  return jax.jit(
    jax.shard_map(
      per_device,
      mesh=mesh,
      in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS), P(), P()),
      out_specs=(P(DATA_AXIS), P()),
    )
  )


@dataclasses.dataclass(frozen=True)
class NllResult:
  """The bound of Eq. 5 averaged over examples, in bits/dim; arrays are indexed by t = 0..T-1."""

  num_examples: int
  total_bpd: float
  prior_bpd: float  # L_T
  terms_bpd: np.ndarray  # L_t; t = 0 is the decoder L_0 (Eq. 13)
  xstart_mse: np.ndarray  # mean (x̂_0 − x_0)² in [-1, 1] units, x̂_0 predicted from x_{t+1}

  def table(self) -> dict[str, np.ndarray]:
    """Per-t rows: the term L_t, the rate L_T + Σ_{s≥t} L_s (bits/dim sent once x_t is known) and the
    distortion then: RMSE on [0, 255] of x̂_0 predicted from x_t (0 at t = 0), as in Fig. 5."""
    rate = self.prior_bpd + np.cumsum(self.terms_bpd[::-1])[::-1]
    distortion = 127.5 * np.sqrt(np.concatenate([[0.0], self.xstart_mse[:-1]]))
    return {
      't': np.arange(len(self.terms_bpd)),
      'term_bpd': self.terms_bpd,
      'cumulative_rate_bpd': rate,
      'distortion_rmse': distortion,
    }

  def summary(self) -> dict[str, float]:
    """bpd (the total), its prior L_T and decoder L_0 parts."""
    return {
      'bpd': self.total_bpd,
      'bpd_prior': self.prior_bpd,
      'bpd_decoder': float(self.terms_bpd[0]),
    }


def nll_bits_per_dim(
  bpd_fn: BpdFn, params: Any, batches: Iterable[dict[str, np.ndarray]], mesh: Mesh, rng: jax.Array
) -> NllResult:
  """Mean bound over the mask-1 rows of this process's batches (``{'image', 'mask'}``, same count on
  every process); batch b's rows are examples ``b * global batch + r`` for the noise keys."""
  totals, offset = None, 0
  for local in batches:
    batch = _global_arrays(mesh, {'image': local['image'], 'mask': local['mask']})
    _, sums = bpd_fn(params, batch['image'], batch['mask'], offset, rng)
    sums = jax.tree.map(lambda a: _host_value(a).astype(np.float64), sums)
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    offset += batch['mask'].shape[0]
  if totals is None or totals['count'] == 0:
    raise ValueError('nll_bits_per_dim got no examples (every batch empty or masked).')
  n = totals['count']
  return NllResult(
    num_examples=int(n),
    total_bpd=float(totals['total_bpd'] / n),
    prior_bpd=float(totals['prior_bpd'] / n),
    terms_bpd=totals['terms_bpd'] / n,
    xstart_mse=totals['xstart_mse'] / n,
  )


def write_nll_csv(path: epath.PathLike, result: NllResult) -> None:
  """CSV ``t,term_bpd,cumulative_rate_bpd,distortion_rmse``: T rows (see ``NllResult.table``)."""
  table = result.table()
  lines = [','.join(table)]
  lines += [f'{int(t)},{a:.8g},{b:.8g},{c:.8g}' for t, a, b, c in zip(*table.values())]
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text('\n'.join(lines) + '\n')


def plot_nll(path: epath.PathLike, result: NllResult) -> None:
  """PNG like the paper's Fig. 5: terms vs t (log scale), rate vs reverse steps, distortion vs rate."""
  table = result.table()
  num_steps = len(table['t'])
  fig = Figure(figsize=(15, 4), layout='constrained')
  ax = fig.add_subplot(1, 3, 1)
  ax.plot(table['t'], table['term_bpd'])
  ax.set(yscale='log', xlabel='t', ylabel='bits/dim', title='Bound terms $L_t$ ($L_0$: decoder)')
  ax = fig.add_subplot(1, 3, 2)
  ax.plot(num_steps - table['t'], table['cumulative_rate_bpd'])
  ax.set(
    xlabel='reverse process steps (T - t)',
    ylabel='rate (bits/dim)',
    title=f'Rate $L_T + \\sum_{{s \\geq t}} L_s$ (total {result.total_bpd:.3f})',
  )
  ax = fig.add_subplot(1, 3, 3)
  ax.plot(table['cumulative_rate_bpd'], table['distortion_rmse'])
  ax.set(xlabel='rate (bits/dim)', ylabel='distortion (RMSE, [0, 255])', title='Rate-distortion')
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=100)
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(buffer.getvalue())


# ----------------------------------------------------------------------------- the evaluator


@dataclasses.dataclass(frozen=True)
class EvalResult:
  """Sample metrics, bits/dim (if computed) and the first samples (if asked for)."""

  metrics: dict[str, Any]
  nll: NllResult | None
  grid: np.ndarray | None  # uint8 [n, H, W, C], the first samples

  def scalars(self) -> dict[str, float]:
    """``eval/<name>`` of every scalar metric, bits/dim included."""
    values = {**self.metrics, **(self.nll.summary() if self.nll else {})}
    return {f'eval/{k}': float(v) for k, v in values.items() if isinstance(v, (int, float))}


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """Compiled functions and loaded references of one eval setting; call it with EMA params."""

  config: ml_collections.ConfigDict
  mesh: Mesh
  sample_fn: Callable[[Any, jax.Array], jax.Array]
  chunk_size: int
  num_samples: int
  scorer: SampleScorer
  bpd_fn: BpdFn | None
  nll_split: str | None

  def __call__(self, params: Any, *, num_grid: int = 0) -> EvalResult:
    """Sample metrics of ``num_samples`` samples, bits/dim if configured, the first ``num_grid``.

    The keys are fixed by ``config.seed``, so in-loop evaluations at different steps share their noise.
    """
    rng = jax.random.PRNGKey(self.config.seed + EVAL_SEED_OFFSET)
    chunks = sample_chunks(
      self.sample_fn, params, jax.random.fold_in(rng, 0), -(-self.num_samples // self.chunk_size)
    )
    grid = None
    if num_grid:  # gathers the whole first chunk once
      first = next(chunks)
      grid = sampling.gather_images(first, min(num_grid, self.num_samples))
      chunks = itertools.chain([first], chunks)
    metrics = self.scorer.score(chunks, self.num_samples)
    nll = None
    if self.bpd_fn is not None:
      batches, _ = input_pipeline.create_eval_dataset(
        self.config, self.nll_split, batch_size=global_batch_size(self.config, self.mesh)
      )
      nll = nll_bits_per_dim(self.bpd_fn, params, batches, self.mesh, jax.random.fold_in(rng, 1))
    return EvalResult(metrics=metrics, nll=nll, grid=grid)


def build_evaluator(
  config: ml_collections.ConfigDict,
  workdir: epath.PathLike,
  model: nn.Module,
  diffusion: diffusion_lib.GaussianDiffusion,
  mesh: Mesh,
  *,
  num_samples: int,
  nll_split: str | None,
) -> Evaluator:
  """An Evaluator of ``num_samples`` samples and, unless ``nll_split`` is None, bits/dim on it."""
  check_eval_config(config)
  chunk_size = min(global_batch_size(config, mesh), _round_up(num_samples, mesh.devices.size))
  sample_fn = sampling.make_sample_fn(
    model,
    diffusion,
    mesh,
    image_shape=train.image_shape(config),
    num_samples=chunk_size,
    clip_denoised=config.train.clip_denoised,
  )
  bpd_fn = None
  if nll_split is not None:
    bpd_fn = make_bpd_fn(
      flax_apply_fn(model), diffusion, mesh, clip_denoised=config.train.clip_denoised
    )
  return Evaluator(
    config=config,
    mesh=mesh,
    sample_fn=sample_fn,
    chunk_size=chunk_size,
    num_samples=num_samples,
    scorer=make_scorer(config, workdir, mesh),
    bpd_fn=bpd_fn,
    nll_split=nll_split,
  )


def make_in_loop_evaluator(
  config: ml_collections.ConfigDict,
  workdir: epath.PathLike,
  model: nn.Module,
  diffusion: diffusion_lib.GaussianDiffusion,
  mesh: Mesh,
) -> Callable[[int, Any, metric_writers.MetricWriter], dict[str, float]]:
  """``evaluate(step, ema_params, writer) → scalars`` for the train loop: ``eval.in_loop_num_samples``
  samples, bits/dim only if ``eval.nll_num_examples`` is set. Loads/computes references now."""
  evaluator = build_evaluator(
    config,
    workdir,
    model,
    diffusion,
    mesh,
    num_samples=config.eval.in_loop_num_samples,
    nll_split=nll_split(config) if config.eval.nll_num_examples else None,
  )

  def evaluate(step: int, ema_params: Any, writer: metric_writers.MetricWriter) -> dict[str, float]:
    scalars = evaluator(ema_params).scalars()
    writer.write_scalars(step, scalars)
    return scalars

  return evaluate


def evaluate_checkpoint(
  config: ml_collections.ConfigDict, workdir: str, *, config_name: str | None = None
) -> dict[str, Any]:
  """``--mode=eval``: the latest checkpoint's EMA params → ``workdir/eval/step_<N>/`` (report.json,
  samples.png, nll_terms.csv, nll_terms.png) and ``eval/*`` scalars; returns the report."""
  check_eval_config(config)
  workdir = train.resolve_workdir(workdir)
  mesh = sampling.make_mesh()
  model = train.create_model(config)
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  state = train.restore_latest(config, workdir, model, mesh)
  step = int(state.step)
  evaluator = build_evaluator(
    config,
    workdir,
    model,
    diffusion,
    mesh,
    num_samples=config.eval.num_samples,
    nll_split=nll_split(config),
  )
  result = evaluator(state.ema_params, num_grid=NUM_GRID_IMAGES)
  report = {
    'config': config_name or config.dataset.name,
    'dataset': config.dataset.name,
    'step': step,
    'metrics_kind': config.eval.metrics,
    'num_samples': config.eval.num_samples,
    'reference_split': evaluator.scorer.reference_split,
    'reference_count': evaluator.scorer.reference_count,
    'nll_split': evaluator.nll_split,
    'nll_num_examples': result.nll.num_examples,
    'metrics': {**result.metrics, **result.nll.summary()},
  }
  out_dir = workdir / 'eval' / f'step_{step}'
  if jax.process_index() == 0:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / 'report.json').write_text(json.dumps(report, indent=2))
    sampling.save_png(out_dir / 'samples.png', sampling.image_grid(result.grid))
    write_nll_csv(out_dir / 'nll_terms.csv', result.nll)
    plot_nll(out_dir / 'nll_terms.png', result.nll)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  writer.write_scalars(step, result.scalars())
  writer.flush()
  writer.close()
  logging.info('Evaluated step %d into %s: %s', step, out_dir, report['metrics'])
  return report
