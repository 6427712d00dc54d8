"""The ``bound`` evaluator: bits/dim, the full bound of Eq. 5 (``calc_bpd_loop``) on a held-out
split, sharded over the ``data`` mesh, its per-t table as CSV and a plot like the paper's Fig. 5.

Example i of the eval stream draws its noise with ``fold_in(rng, i)``, so its bound does not
depend on the device count or padding; padded rows (mask 0) are excluded and masked sums psum'd.
"""

from __future__ import annotations

import dataclasses
import functools
import io
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from matplotlib.figure import Figure

from diffusion_jax import (
  config_rules,
  console,
  diffusion,
  input_pipeline,
  models,
  parallel,
  preemption,
)
from diffusion_jax import run as run_lib
from diffusion_jax.config_rules import Problems
from diffusion_jax.evaluators.base import Evaluator, Program, Result

LABELS = {'bpd': 'bits/dim', 'bpd_prior': 'prior', 'bpd_decoder': 'decoder'}  # eval/<metric>

# params -> the model as the process calls it, (x_t, t) -> output.
BindFn = Callable[[Any], diffusion.ModelFn]
# (params, images, mask, offset, rng) -> (per-example total bits/dim, psum'd masked sums).
BpdFn = Callable[
  [Any, jax.Array, jax.Array, int, jax.Array], tuple[jax.Array, dict[str, jax.Array]]
]
Batch = dict[str, np.ndarray]


def make_bpd_fn(
  model_fn: BindFn, process: diffusion.GaussianDiffusion, mesh: Mesh, *, clip_denoised: bool
) -> BpdFn:
  """Jitted ``bpd(params, images, mask, offset, rng) -> (per-example total bits/dim, masked sums)``
  of the bound (Eq. 5) with the model ``model_fn(params)``.

  ``images`` [B, ...] and ``mask`` [B] are sharded over ``mesh``; row r is example ``offset + r``
  and draws its noise with ``fold_in(rng, offset + r)``. The sums (count, total, prior, and the
  per-t terms and x̂_0 squared errors) cover the mask-1 rows only and are psum'd (replicated).
  """

  def per_device(params, x, mask, offset, rng):
    n = x.shape[0]
    index = offset + jax.lax.axis_index(parallel.DATA_AXIS) * n + jnp.arange(n)
    model = model_fn(params)

    def one_example(x_0, i):
      out = process.calc_bpd_loop(model, x_0[None], jax.random.fold_in(rng, i), clip_denoised)
      return jax.tree.map(lambda a: a[0], out)

    out = jax.vmap(one_example)(x, index)
    keep = mask > 0

    def masked_sum(a):
      return jnp.sum(jnp.where(keep.reshape((n,) + (1,) * (a.ndim - 1)), a, 0.0), axis=0)

    sums = dict(
      count=jnp.sum(keep.astype(jnp.float32)),
      total_bpd=masked_sum(out['total_bpd']),
      prior_bpd=masked_sum(out['prior_bpd']),
      terms_bpd=masked_sum(out['terms_bpd']),
      xstart_mse=masked_sum(out['xstart_mse']),
    )
    return out['total_bpd'], jax.lax.psum(sums, parallel.DATA_AXIS)

  data = P(parallel.DATA_AXIS)
  return jax.jit(
    jax.shard_map(
      per_device, mesh=mesh, in_specs=(P(), data, data, P(), P()), out_specs=(data, P())
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
    """Per-t rows: the term L_t, the rate L_T + Σ_{s≥t} L_s (bits/dim sent once x_t is known) and
    the distortion then: RMSE on [0, 255] of x̂_0 predicted from x_t (0 at t = 0), as in Fig. 5."""
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
  bpd_fn: BpdFn, params: Any, batches: Iterable[Batch], mesh: Mesh, rng: jax.Array
) -> NllResult:
  """Mean bound over the mask-1 rows of this process's batches (``{'image', 'mask'}``, same count
  on every process); batch b's rows are examples ``b * global batch + r`` for the noise keys."""
  totals, offset = None, 0
  for local in batches:
    preemption.check()  # a notice stops the work here, on every host alike
    batch = parallel.shard_rows(mesh, {'image': local['image'], 'mask': local['mask']})
    _, sums = bpd_fn(params, batch['image'], batch['mask'], offset, rng)
    sums = jax.tree.map(lambda a: parallel.host_value(a).astype(np.float64), sums)
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


@dataclasses.dataclass(frozen=True)
class BoundEvaluator:
  """The bound (Eq. 5) of a model's params on fixed, re-iterable batches of ``split``; with
  ``files``, its per-t table and plot too."""

  bpd_fn: BpdFn
  batches: Iterable[Batch]
  mesh: Mesh
  split: str
  files: bool

  def __call__(self, params: Any, rng: jax.Array) -> Result:
    """The mean bound over ``batches``, example i's noise drawn with ``fold_in(rng, i)``."""
    nll = nll_bits_per_dim(self.bpd_fn, params, self.batches, self.mesh, rng)
    details = {'split': self.split, 'num_examples': nll.num_examples}
    return Result(nll.summary(), details, nll_files(nll) if self.files else {})


def nll_csv(result: NllResult) -> str:
  """CSV ``t,term_bpd,cumulative_rate_bpd,distortion_rmse``: T rows (see ``NllResult.table``)."""
  table = result.table()
  lines = [','.join(table)]
  lines += [f'{int(t)},{a:.8g},{b:.8g},{c:.8g}' for t, a, b, c in zip(*table.values())]
  return '\n'.join(lines) + '\n'


def nll_plot(result: NllResult) -> bytes:
  """A PNG like the paper's Fig. 5: terms vs t (log scale), rate vs reverse steps, distortion vs
  rate."""
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
  return buffer.getvalue()


def nll_files(result: NllResult) -> dict[str, bytes]:
  """The files of a bound: ``nll_terms.csv`` (the per-t table) and ``nll_terms.png`` (its plot)."""
  return {'nll_terms.csv': nll_csv(result).encode(), 'nll_terms.png': nll_plot(result)}


def split_of(settings: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> str | None:
  """The examples of the bound: ``split`` (else the data set's ``eval_split``; None if neither)
  cut to ``num_examples``."""
  split = settings.split or config.dataset.eval_split
  return None if split is None else input_pipeline.first_examples(split, settings.num_examples)


def problems(
  name: str, settings: ml_collections.ConfigDict, config: ml_collections.ConfigDict
) -> Problems:
  """Ranges, and a split to compute the bound on."""
  field = f'evals.{name}'
  found = config_rules.evaluator_range_problems(
    name,
    settings,
    [
      ('batch_size', 'count', 'the global batch of images'),
      ('num_examples', 'optional count', 'the examples of the bound (None: the split)'),
    ],
  )
  if split_of(settings, config) is None:
    found[f'{field}.split'] = (
      f'{config.dataset.name} has no held-out split (dataset.eval_split is None) and '
      f'{field}.split is not set: set --config.{field}.split (e.g. "train[:10000]"), or drop '
      f'the evaluator (the paper reports no bits/dim for LSUN cat and CelebA-HQ).'
    )
  return found


def run_bpd_fn(run: run_lib.Run) -> BpdFn:
  """``make_bpd_fn`` of the run's model, process, mesh and sampler's clipping."""
  bind = functools.partial(models.model_fn, run.model)
  return make_bpd_fn(bind, run.process, run.mesh, clip_denoised=run.sampler.clip_denoised)


def global_batch(settings: ml_collections.ConfigDict, run: run_lib.Run) -> int:
  """``batch_size`` rounded up to a multiple of the device count."""
  devices = run.mesh.devices.size
  return -(-settings.batch_size // devices) * devices


def create(
  name: str, settings: ml_collections.ConfigDict, run: run_lib.Run, *, in_loop: bool
) -> Evaluator:
  """The bound of the run's model on its split (the table and plot only outside the loop)."""
  split = split_of(settings, run.config)
  input_pipeline.check_splits(run.builder, {f'evals.{name}.split': split})
  batches, num_batches = input_pipeline.create_eval_dataset(
    run.builder, run.config.dataset, split, batch_size=global_batch(settings, run)
  )
  batches = console.Counted(batches, f'bits/dim on {split} (batches)', num_batches)
  return BoundEvaluator(run_bpd_fn(run), batches, run.mesh, split, files=not in_loop)


def programs(settings: ml_collections.ConfigDict, run: run_lib.Run) -> dict[str, Program]:
  """The bound of one batch of images (all T terms), with abstract arguments."""
  batch = global_batch(settings, run)
  images = parallel.abstract_rows(run.mesh, (batch, *run.image_shape), jnp.float32)
  mask = parallel.abstract_rows(run.mesh, (batch,), jnp.float32)
  offset = jax.ShapeDtypeStruct((), jnp.int32)
  params = run.abstract_state().ema_params
  return {'bound': (run_bpd_fn(run), (params, images, mask, offset, run.abstract_key()))}
