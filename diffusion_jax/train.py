"""Training (Algorithm 1): a data-parallel step over every device of every host, and the CLU loop.

The step is one ``jax.shard_map`` over a 1-D ``data`` mesh: the train state is replicated, the
global batch is split over devices, gradients and metrics are averaged with ``pmean``. Each
example's timestep and noise are drawn from a key folded with its global index in the batch, so
with ``optim.grad_clip_mode='global'`` and no dropout the step does not depend on how the batch is
laid out over devices (per-device clipping clips each device's own gradient, and dropout keys are
per device).
"""

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, metrics, parameter_overview, periodic_actions
from etils import epath
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import (
  evaluate,
  input_pipeline,
  models,
  parallel,
  rngs,
  runtime,
  sampling,
  train_state,
  validation,
)
from diffusion_jax.errors import SetupError
from diffusion_jax.train_state import TrainState

StepFn = Callable[[TrainState, jax.Array], tuple[TrainState, 'TrainMetrics']]


NO_STEP = np.iinfo(np.int32).max


class NonFiniteError(SetupError):
  """The loss or the gradients stopped being finite: the run diverged."""


@flax.struct.dataclass
class FirstNonFinite(metrics.Metric):
  """The first step whose loss or gradients were not finite (``NO_STEP`` if none); stays on
  device until read."""

  step: jax.Array

  @classmethod
  def from_model_output(cls, *, nonfinite_step: jax.Array, **_) -> 'FirstNonFinite':
    return cls(step=nonfinite_step)

  @classmethod
  def empty(cls) -> 'FirstNonFinite':
    return cls(step=jnp.asarray(NO_STEP, jnp.int32))

  def merge(self, other: 'FirstNonFinite') -> 'FirstNonFinite':
    return type(self)(step=jnp.minimum(self.step, other.step))

  def compute(self) -> jax.Array:
    return self.step


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  grad_norm: metrics.Average.from_output('grad_norm')
  learning_rate: metrics.LastValue.from_output('learning_rate')
  first_nonfinite_step: FirstNonFinite


def _clip(grads: Any, max_norm: float) -> Any:
  """``grads`` scaled so that their global norm is at most ``max_norm`` (stateless)."""
  return optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())[0]


def make_train_step(
  optim_config: ml_collections.ConfigDict,
  model: models.UNet,
  diffusion: diffusion_lib.GaussianDiffusion,
  mesh: Mesh,
) -> StepFn:
  """The jitted ``step(state, images) -> (state, metrics)`` over ``mesh``.

  ``images`` is the global batch [steps_per_call, B, H, W, C] sharded on B; the state is donated.
  Several optimizer steps per call run in a ``lax.scan``. Gradients are clipped to
  ``optim_config.grad_clip`` per device before the average or globally after it.
  """
  num_timesteps = diffusion.num_timesteps
  schedule = train_state.learning_rate_schedule(optim_config)
  clip_norm, clip_mode = optim_config.grad_clip, optim_config.grad_clip_mode

  def example_draws(rng: jax.Array, batch_index: jax.Array, shape: tuple[int, ...]):
    """Timestep t ~ U{0..T-1} and noise ε ~ N(0, I) for one example, keyed by its global index."""
    key_t, key_noise = jax.random.split(jax.random.fold_in(rng, batch_index))
    return (
      jax.random.randint(key_t, (), 0, num_timesteps),
      jax.random.normal(key_noise, shape, jnp.float32),
    )

  def one_step(state: TrainState, images: jax.Array):
    device = jax.lax.axis_index(parallel.DATA_AXIS)
    local_batch = images.shape[0]
    example_rng, dropout_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
    batch_index = device * local_batch + jnp.arange(local_batch)
    draws = jax.vmap(example_draws, in_axes=(None, 0, None))
    t, noise = draws(example_rng, batch_index, images.shape[1:])
    dropout_rng = jax.random.fold_in(dropout_rng, device)

    def loss_fn(params):
      model_fn = models.model_fn(model, params, dropout_rng=dropout_rng)
      return jnp.mean(diffusion.training_losses(model_fn, images, t, noise))

    # Params are replicated; cast them to device-varying so that each device gets its own
    # gradient (differentiating an invariant input would psum the gradients implicitly).
    params = jax.lax.pcast(state.params, parallel.DATA_AXIS, to='varying')
    loss, grads = jax.value_and_grad(loss_fn)(params)
    if clip_mode == 'per_device' and clip_norm:
      grads = _clip(grads, clip_norm)
    grads = jax.lax.pmean(grads, parallel.DATA_AXIS)
    grad_norm = optax.tree.norm(grads)
    if clip_mode == 'global' and clip_norm:
      grads = _clip(grads, clip_norm)
    loss = jax.lax.pmean(loss, parallel.DATA_AXIS)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    outputs = dict(
      loss=loss,
      grad_norm=grad_norm,
      learning_rate=schedule(state.step),
      nonfinite_step=jnp.where(finite, NO_STEP, state.step + 1).astype(jnp.int32),
    )
    return state.apply_gradients(grads), outputs

  def per_device(state: TrainState, images: jax.Array):
    if images.shape[0] == 1:  # no scan: XLA:CPU runs a scan around the backward pass ~20x slower
      state, outputs = one_step(state, images[0])
      return state, jax.tree.map(lambda x: x[None], outputs)
    return jax.lax.scan(one_step, state, images)

  sharded = jax.shard_map(
    per_device,
    mesh=mesh,
    in_specs=(P(), P(None, parallel.DATA_AXIS)),
    out_specs=(P(), P()),
  )

  def step(state, images):
    state, outputs = sharded(state, images)
    collection = TrainMetrics.empty()
    for i in range(images.shape[0]):
      output = jax.tree.map(lambda x, i=i: x[i], outputs)
      collection = collection.merge(TrainMetrics.single_from_model_output(**output))
    return state, collection

  return jax.jit(
    step,
    in_shardings=(parallel.replicated(mesh), parallel.steps_sharding(mesh)),
    out_shardings=parallel.replicated(mesh),
    donate_argnums=0,
  )


def flatten_config(config: ml_collections.ConfigDict, prefix: str = '') -> dict[str, Any]:
  """{'model.ch': 128, ...}: scalar leaves for TensorBoard's hparams; sequences as strings."""
  flat = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      flat.update(flatten_config(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value if isinstance(value, int | float | str | bool) else str(value)
  return flat


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains (or resumes) in ``workdir``: checkpoints, TensorBoard logs and sample grids go there."""
  validation.check_train(config)
  workdir = train_state.resolve_workdir(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  runtime.check_shared_workdir(workdir)
  builder = input_pipeline.get_builder(config.dataset)
  validation.check_splits(builder, {'dataset.train_split': config.dataset.train_split})

  mesh = parallel.make_mesh()
  factory = train_state.StateFactory.from_config(config)
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  train_state.remove_stale_temporaries(workdir)
  manager = train_state.checkpoint_manager(
    workdir,
    keep=config.train.keep_checkpoints,
    save_every_steps=config.train.checkpoint_every_steps,
  )
  try:
    if manager.latest_step() is not None:
      state = train_state.restore(manager, factory.abstract(mesh), rename_unreadable=True)
      logging.info('Resumed from step %d in %s.', int(state.step), manager.directory)
    else:
      state = factory.create(mesh)
    if int(state.step) >= config.train.num_train_steps:
      logging.info('The run in %s is complete (step %d); nothing to do.', workdir, state.step)
      return state
    return _train(config, workdir, builder, factory, diffusion, mesh, manager, state)
  finally:
    manager.wait_until_finished()
    manager.close()


def _train(
  config: ml_collections.ConfigDict,
  workdir: epath.Path,
  builder: Any,
  factory: train_state.StateFactory,
  diffusion: diffusion_lib.GaussianDiffusion,
  mesh: Mesh,
  manager: ocp.CheckpointManager,
  state: TrainState,
) -> TrainState:
  """The loop from ``state`` to ``train.num_train_steps``, or to a preemption."""
  start_step, num_steps = int(state.step), config.train.num_train_steps

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams(flatten_config(config))
    if jax.process_index() == 0:
      (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
  parameter_overview.log_parameter_overview(state.params)

  k = config.train.steps_per_call
  train_step = make_train_step(config.optim, factory.model, diffusion, mesh)
  train_iter = input_pipeline.create_train_iterator(
    builder,
    config.dataset,
    batch_size=config.train.batch_size,
    steps_per_call=k,
    seed=config.seed,
    start_step=start_step // k,
  )
  report_progress = periodic_actions.ReportProgress(
    num_train_steps=num_steps, writer=writer, every_steps=config.train.log_every_steps
  )
  hooks, collected = _make_hooks(
    config, workdir, builder, factory, diffusion, mesh, writer, report_progress
  )
  periods = [config.train.log_every_steps, config.train.sample_every_steps, config.eval.every_steps]
  preemption = runtime.Preemption()
  health = FirstNonFinite.empty()
  step = start_step
  try:
    with metric_writers.ensure_flushes(writer):
      while step < num_steps:
        batch = parallel.shard_steps(mesh, next(train_iter)['image'])
        with jax.profiler.StepTraceAnnotation('train', step_num=step):
          state, step_metrics = train_step(state, batch)
        collected.append(step_metrics)
        health = health.merge(step_metrics.first_nonfinite_step)  # on device: no sync
        step += k
        last = step == num_steps
        if last or manager.should_save(step) or any(p and step % p == 0 for p in periods):
          _check_finite(health, manager)  # before anything is saved or written
        saved = train_state.save(manager, state, force=last)
        if preemption.should_stop():  # before the hooks: a preemption notice gives ~30 s
          logging.warning('Preempted (SIGTERM) at step %d: saving and exiting.', step)
          if not saved:
            _check_finite(health, manager)
            train_state.save(manager, state, force=True)
          break
        for hook_step in range(step - k + 1, step + 1):  # hooks see every optimizer step
          report_progress(hook_step)
          for hook in hooks:
            hook(hook_step, state=state)
  finally:
    preemption.restore()
  return state


def _check_finite(health: FirstNonFinite, manager: ocp.CheckpointManager) -> None:
  """A NonFiniteError naming the first non-finite step, if any (reads one scalar)."""
  first = int(health.compute())
  if first != NO_STEP:
    raise NonFiniteError(
      f'Training diverged: the loss or the gradients are not finite from step {first} on. '
      f'Nothing was saved after it: the latest checkpoint (step {manager.latest_step()}) is the '
      'last good one. Lower --config.optim.learning_rate (or raise optim.warmup_steps, or clip '
      'with optim.grad_clip) and run the same command again to resume from it.'
    )


def _make_hooks(
  config: ml_collections.ConfigDict,
  workdir: epath.Path,
  builder: Any,
  factory: train_state.StateFactory,
  diffusion: diffusion_lib.GaussianDiffusion,
  mesh: Mesh,
  writer: metric_writers.MetricWriter,
  report_progress: periodic_actions.ReportProgress,
) -> tuple[list[periodic_actions.PeriodicCallback], list[TrainMetrics]]:
  """The loop's periodic callbacks (metrics, sample grids, evaluation; timed by
  ``report_progress``), called after every optimizer step with the state, and the list the loop
  appends each call's metrics to."""
  num_steps = config.train.num_train_steps
  collected: list[TrainMetrics] = []

  def write_metrics(step: int, t: float, state: TrainState) -> None:
    del t, state
    merged = collected[0]
    for more in collected[1:]:
      merged = merged.merge(more)
    collected.clear()
    values = merged.compute()
    del values['first_nonfinite_step']  # checked by the loop, at every boundary
    writer.write_scalars(step, {f'train/{k}': v for k, v in values.items()})

  sample_fn = sampling.make_sample_fn(
    factory.model,
    diffusion,
    mesh,
    image_shape=factory.image_shape,
    num_samples=config.train.num_sample_images,
    clip_denoised=config.train.clip_denoised,
  )

  def write_grid(step: int, t: float, state: TrainState) -> None:
    del t
    sampling.write_sample_grid(
      sample_fn,
      state.ema_params,
      rngs.key(config.seed, 'sample_grid'),
      num_samples=config.train.num_sample_images,
      path=workdir / 'samples' / f'step_{step:08d}.png',
      writer=writer,
      step=step,
    )

  hooks = [
    periodic_actions.PeriodicCallback(
      every_steps=config.train.log_every_steps, on_steps=[num_steps], callback_fn=write_metrics
    ),
    periodic_actions.PeriodicCallback(
      every_steps=config.train.sample_every_steps,
      on_steps=[num_steps],
      callback_fn=_timed(report_progress, 'sample', write_grid),
    ),
  ]
  if config.eval.every_steps:
    evaluator = evaluate.make_in_loop_evaluator(
      config, workdir, builder, factory.model, diffusion, mesh
    )

    def run_eval(step: int, t: float, state: TrainState) -> None:
      del t
      evaluator(step, state.ema_params, writer)

    hooks.append(
      periodic_actions.PeriodicCallback(
        every_steps=config.eval.every_steps, callback_fn=_timed(report_progress, 'eval', run_eval)
      )
    )
  return hooks, collected


def _timed(report_progress: periodic_actions.ReportProgress, name: str, fn: Callable) -> Callable:
  """``fn`` with its time reported by ``report_progress`` under ``name``."""

  def timed(**kwargs):
    with report_progress.timed(name):
      return fn(**kwargs)

  return timed
