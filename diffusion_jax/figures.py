"""The paper's figures from a run's latest EMA params, as PNGs (and a CSV) in ``workdir/figures``:

- ``progressive.png`` (Fig. 6): x̂_0 predicted along the reverse chain, one row per chain;
- ``shared_latents.png`` (Fig. 7): samples of p(x_0 | x_t) sharing one x_t ~ q(x_t | x_0) of a
  test image, for t = T, 3T/4, T/2, T/4 (the paper's 1000, 750, 500, 250);
- ``interpolation.png`` (Fig. 8): two test images encoded by q at ``t`` with the same noise, mixed
  linearly with λ in [0, 1], decoded by the reverse process with the same noise;
- ``ddim_interpolation.png``: the same with DDIM inversion (x_0 -> x_T and back, deterministic);
- ``rate_distortion.csv`` / ``.png`` (Fig. 5, Table 4): rate L_T + ... + L_t and distortion (RMSE
  of x̂_0 on [0, 255]) for every t, on the first test images.

  python -m diffusion_jax.main --mode=figures --config=configs/digits.py --workdir=W
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from diffusion_jax import console, diffusion, images, input_pipeline, models
from diffusion_jax import run as run_lib
from diffusion_jax.evaluators import bound

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
LAMBDAS = tuple(np.linspace(0.0, 1.0, 9))


def q_encode(
  process: diffusion.GaussianDiffusion, x_0: jax.Array, t: int, noise: jax.Array
) -> jax.Array:
  """x_t = q_sample(x_0, t, noise) (Eq. 4) at one code step ``t`` for the whole batch."""
  return process.q_sample(x_0, jnp.full((x_0.shape[0],), t, jnp.int32), noise)


def mix(a: jax.Array, b: jax.Array, lambdas: Sequence[float]) -> jax.Array:
  """[len(lambdas), ...]: (1 − λ) a + λ b for each λ (Fig. 8's linear interpolation)."""
  lam = jnp.asarray(lambdas, jnp.float32).reshape((-1,) + (1,) * a.ndim)
  return (1.0 - lam) * a[None] + lam * b[None]


def progressive(
  run: run_lib.Run, ema_params: Any, rng: jax.Array, *, num_chains: int, columns: int
) -> np.ndarray:
  """uint8 [num_chains * columns, H, W, C]: x̂_0 along each chain, ``columns`` per chain (Fig. 6)."""
  every = max(run.process.num_timesteps // columns, 1)
  while run.process.num_timesteps % every:
    every -= 1
  model_fn = models.model_fn(run.model, ema_params)

  def chain(key: jax.Array) -> jax.Array:
    shape = (num_chains, *run.image_shape)
    return run.process.p_sample_loop(model_fn, shape, key, progress_every=every)[1]['pred_xstart']

  frames = np.asarray(jax.jit(chain)(rng))  # [steps, chains, H, W, C]
  return images.to_uint8(np.swapaxes(frames, 0, 1).reshape(-1, *run.image_shape))


def rate_distortion(
  process: diffusion.GaussianDiffusion,
  model_fn: ModelFn,
  x_0: jax.Array,
  rng: jax.Array,
  clip_denoised: bool = True,
) -> bound.NllResult:
  """The bound's terms (Eq. 5) and x̂_0 errors of ``x_0``, averaged: its ``table()`` is Fig. 5."""
  out = jax.jit(lambda x: process.calc_bpd_loop(model_fn, x, rng, clip_denoised))(x_0)
  out = jax.tree.map(lambda a: np.asarray(a, np.float64).mean(axis=0), out)
  return bound.NllResult(
    num_examples=int(x_0.shape[0]),
    total_bpd=float(out['total_bpd']),
    prior_bpd=float(out['prior_bpd']),
    terms_bpd=out['terms_bpd'],
    xstart_mse=out['xstart_mse'],
  )


def make_figures(run: run_lib.Run, *, num_test: int = 8) -> dict[str, epath.Path]:
  """Every figure of the module docstring into ``workdir/figures``; returns their paths."""
  state = run.restore_latest()
  config = run.config
  split = config.dataset.eval_split or config.dataset.train_split
  batches, _ = input_pipeline.create_eval_dataset(
    run.builder,
    config.dataset,
    f'{split}[:{num_test}]',
    batch_size=num_test,
    process_count=1,
    process_index=0,
  )
  test = jnp.asarray(next(iter(batches))['image'])
  d, clip = run.process, run.sampler.clip_denoised
  model_fn = models.model_fn(run.model, state.ema_params)
  rng, T = run.key('figures'), d.num_timesteps
  chains = progressive(run, state.ema_params, rng, num_chains=4, columns=10)
  grids = {'progressive': images.image_grid(chains, columns=10)}

  rows = []  # Fig. 7: per t, x_t then 7 samples of p(x_0 | x_t)
  for t in (T - 1, 3 * T // 4 - 1, T // 2 - 1, T // 4 - 1):
    x_t = q_encode(d, test[:1], t, jax.random.normal(jax.random.fold_in(rng, t), test[:1].shape))
    keys = jax.random.split(jax.random.fold_in(rng, T + t), 7)
    decode = jax.vmap(
      lambda k, x_t=x_t, t=t: d.p_sample_loop_from(model_fn, x_t, t, k, clip_denoised=clip)[0]
    )
    rows += [images.to_uint8(x_t), images.to_uint8(jax.jit(decode)(keys))]
  grids['shared_latents'] = images.image_grid(np.concatenate(rows), columns=8)

  t = T // 2 - 1  # Fig. 8: the paper mixes at t = 500 of 1000
  noise = jax.random.normal(jax.random.fold_in(rng, 2 * T), test[:1].shape)
  latents = mix(q_encode(d, test[:1], t, noise)[0], q_encode(d, test[1:2], t, noise)[0], LAMBDAS)
  decode = jax.jit(
    lambda x: d.p_sample_loop_from(
      model_fn, x, t, jax.random.fold_in(rng, 3 * T), clip_denoised=clip
    )
  )
  ends = (images.to_uint8(test[:1]), images.to_uint8(test[1:2]))
  grids['interpolation'] = _row(ends, images.to_uint8(decode(latents)))

  steps = min(50, T)  # DDIM inversion: deterministic both ways
  x_T = jax.jit(lambda x: d.ddim_reverse_loop(model_fn, x, num_steps=steps))(test[:2])
  ddim = jax.jit(
    lambda x: d.ddim_sample_loop(model_fn, x.shape, rng, num_steps=steps, x_T=x, clip_denoised=clip)
  )
  grids['ddim_interpolation'] = _row(ends, images.to_uint8(ddim(mix(x_T[0], x_T[1], LAMBDAS))))

  curve = rate_distortion(d, model_fn, test, jax.random.fold_in(rng, 4 * T), clip)
  out, paths = run.workdir / 'figures', {}
  if jax.process_index() == 0:
    for name, grid in grids.items():
      paths[name] = out / f'{name}.png'
      images.save_png(paths[name], grid)
    for name, data in bound.nll_files(curve).items():
      paths[name] = out / name.replace('nll_terms', 'rate_distortion')
      paths[name].write_bytes(data)
    console.say('Figures of step %d: %s', int(state.step), out)
  return paths


def _row(ends: tuple[np.ndarray, np.ndarray], middle: np.ndarray) -> np.ndarray:
  """One grid row: the first end, the interpolants, the second end."""
  return images.image_grid(np.concatenate([ends[0], middle, ends[1]]), columns=len(middle) + 2)
