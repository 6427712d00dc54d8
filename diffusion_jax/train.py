"""Training (Algorithm 1): a data-parallel step over every device of every host, and the CLU loop.

The step is one ``jax.shard_map`` over a 1-D ``data`` mesh: the train state is replicated, the
global batch is split over devices, gradients and metrics are averaged with ``pmean``. Each
example's timestep and noise are drawn from a key folded with its global index in the batch, so
the step does not depend on how the batch is laid out over devices; dropout keys are per device.
"""

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, metrics, parameter_overview, periodic_actions
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import evaluate, input_pipeline, models, sampling

DATA_AXIS = sampling.DATA_AXIS
GRAD_CLIP_MODES = ('per_device', 'global')


class SetupError(ValueError):
  """A config or workdir the run cannot use; the message says what to change."""


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue: step, params, EMA params, optimizer state, base key."""

  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  grad_norm: metrics.Average.from_output('grad_norm')
  learning_rate: metrics.LastValue.from_output('learning_rate')


def create_model(config: ml_collections.ConfigDict) -> models.UNet:
  """The U-Net of ``config.model`` with as many output channels as the data has."""
  return models.UNet(out_ch=config.dataset.num_channels, **config.model)


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  size = config.dataset.image_size
  return (size, size, config.dataset.num_channels)


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up from 0 over ``warmup_steps``, then constant (Appendix B)."""
  return optax.linear_schedule(0.0, config.optim.learning_rate, max(config.optim.warmup_steps, 1))


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam on the warm-up schedule; clipping is done in the step (per device or global)."""
  return optax.adam(
    learning_rate_schedule(config), b1=config.optim.b1, b2=config.optim.b2, eps=config.optim.eps
  )


def create_train_state(
  config: ml_collections.ConfigDict, model: nn.Module, optimizer: optax.GradientTransformation
) -> TrainState:
  """Initial state from ``config.seed``: params, EMA params a copy of them, optimizer state, key.

  Params are drawn with an 'rbg' key: XLA:CPU compiles a threefry-keyed init several times slower.
  """
  x = jnp.zeros((1, *image_shape(config)), jnp.float32)
  params = model.init(
    jax.random.key(config.seed, impl='rbg'), x, jnp.zeros((1,), jnp.int32), train=False
  )['params']
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    ema_params=jax.tree.map(jnp.copy, params),
    opt_state=optimizer.init(params),
    rng=jax.random.PRNGKey(config.seed),
  )


def init_train_state(
  config: ml_collections.ConfigDict,
  model: nn.Module,
  optimizer: optax.GradientTransformation,
  mesh: Mesh,
) -> TrainState:
  """The initial state from ``config.seed``, replicated over ``mesh``."""
  return jax.jit(
    lambda: create_train_state(config, model, optimizer), out_shardings=NamedSharding(mesh, P())
  )()


def _clip(grads: Any, max_norm: float) -> Any:
  """Scales ``grads`` so that their global norm is at most ``max_norm``."""
  clip = optax.clip_by_global_norm(max_norm)
  return clip.update(grads, clip.init(grads))[0]


def make_train_step(
  config: ml_collections.ConfigDict,
  model: nn.Module,
  diffusion: diffusion_lib.GaussianDiffusion,
  optimizer: optax.GradientTransformation,
  mesh: Mesh,
) -> Callable[[TrainState, jax.Array], tuple[TrainState, TrainMetrics]]:
  """Returns the jitted ``step(state, images) -> (state, metrics)`` over ``mesh``.

  ``images`` is the global batch [steps_per_call, B, H, W, C] sharded on B; the state is
  donated. Several optimizer steps per call run in a ``lax.scan``.
  """
  if config.optim.grad_clip_mode not in GRAD_CLIP_MODES:
    raise SetupError(
      f'Unknown optim.grad_clip_mode {config.optim.grad_clip_mode!r}; choose one '
      f'of {GRAD_CLIP_MODES}.'
    )
  num_timesteps = diffusion.num_timesteps
  schedule = learning_rate_schedule(config)
  clip_norm, decay = config.optim.grad_clip, config.optim.ema_decay

  def example_draws(rng: jax.Array, batch_index: jax.Array, shape: tuple[int, ...]):
    """Timestep t ~ U{0..T-1} and noise ε ~ N(0, I) for one example, keyed by its global index."""
    key_t, key_noise = jax.random.split(jax.random.fold_in(rng, batch_index))
    return (
      jax.random.randint(key_t, (), 0, num_timesteps),
      jax.random.normal(key_noise, shape, jnp.float32),
    )

  def one_step(state: TrainState, images: jax.Array):
    device = jax.lax.axis_index(DATA_AXIS)
    local_batch = images.shape[0]
    example_rng, dropout_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
    batch_index = device * local_batch + jnp.arange(local_batch)
    t, noise = jax.vmap(example_draws, in_axes=(None, 0, None))(
      example_rng, batch_index, images.shape[1:]
    )
    dropout_rng = jax.random.fold_in(dropout_rng, device)

    def loss_fn(params):
      model_fn = lambda x, t: model.apply(
        {'params': params}, x, t, train=True, rngs={'dropout': dropout_rng}
      )
      return jnp.mean(diffusion.training_losses(model_fn, images, t, noise))

    # Params are replicated; cast them to device-varying so that each device gets its own
    # gradient (differentiating an invariant input would psum the gradients implicitly).
    loss, grads = jax.value_and_grad(loss_fn)(jax.lax.pcast(state.params, DATA_AXIS, to='varying'))
    if config.optim.grad_clip_mode == 'per_device' and clip_norm:
      grads = _clip(grads, clip_norm)
    grads = jax.lax.pmean(grads, DATA_AXIS)
    grad_norm = optax.tree.norm(grads)
    if config.optim.grad_clip_mode == 'global' and clip_norm:
      grads = _clip(grads, clip_norm)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = optax.incremental_update(params, state.ema_params, 1.0 - decay)
    new_state = state.replace(
      step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state
    )
    return new_state, dict(
      loss=jax.lax.pmean(loss, DATA_AXIS), grad_norm=grad_norm, learning_rate=schedule(state.step)
    )

  def per_device(state: TrainState, images: jax.Array):
    if images.shape[0] == 1:  # no scan: XLA:CPU runs a scan around the backward pass ~20x slower
      state, outputs = one_step(state, images[0])
      return state, jax.tree.map(lambda x: x[None], outputs)
    return jax.lax.scan(one_step, state, images)

  sharded = jax.shard_map(
    per_device, mesh=mesh, in_specs=(P(), P(None, DATA_AXIS)), out_specs=(P(), P())
  )

  def step(state, images):
    state, outputs = sharded(state, images)
    collection = TrainMetrics.empty()
    for k in range(images.shape[0]):
      collection = collection.merge(
        TrainMetrics.single_from_model_output(**jax.tree.map(lambda x: x[k], outputs))
      )
    return state, collection

  replicated = NamedSharding(mesh, P())
  return jax.jit(
    step,
    in_shardings=(replicated, NamedSharding(mesh, P(None, DATA_AXIS))),
    out_shardings=replicated,
    donate_argnums=0,
  )


def global_batch(mesh: Mesh, local_images: np.ndarray) -> jax.Array:
  """This process's [k, B_local, H, W, C] share → the global [k, B, H, W, C] array on ``mesh``."""
  sharding = NamedSharding(mesh, P(None, DATA_AXIS))
  return jax.make_array_from_process_local_data(sharding, local_images)


# ----------------------------------------------------------------------------- checkpoints


def resolve_workdir(workdir: epath.PathLike) -> epath.Path:
  """``workdir`` as an absolute path (Orbax rejects relative ones); gs:// paths as given."""
  return epath.Path(workdir) if '://' in str(workdir) else epath.Path(os.path.abspath(workdir))


def checkpoint_manager(
  workdir: epath.PathLike, config: ml_collections.ConfigDict, *, read_only: bool = False
) -> ocp.CheckpointManager:
  """Orbax manager for ``workdir/checkpoints``: async saves, the last K kept."""
  workdir = resolve_workdir(workdir)
  options = ocp.CheckpointManagerOptions(
    max_to_keep=config.train.keep_checkpoints,
    enable_async_checkpointing=not read_only,
    read_only=read_only,
    create=not read_only,
  )
  return ocp.CheckpointManager(workdir / 'checkpoints', options=options)


def abstract_train_state(
  config: ml_collections.ConfigDict,
  model: nn.Module,
  optimizer: optax.GradientTransformation,
  mesh: Mesh,
) -> TrainState:
  """Shapes, dtypes and (replicated) shardings of the train state, for restoring."""
  shapes = jax.eval_shape(lambda: create_train_state(config, model, optimizer))
  replicated = NamedSharding(mesh, P())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shapes)


def restore_state(
  manager: ocp.CheckpointManager, abstract_state: TrainState, step: int | None = None
) -> TrainState:
  """The checkpoint at ``step`` (default: latest), laid out as ``abstract_state``."""
  step = manager.latest_step() if step is None else step
  return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))


def restore_latest(
  config: ml_collections.ConfigDict, workdir: epath.PathLike, model: nn.Module, mesh: Mesh
) -> TrainState:
  """The latest complete checkpoint in ``workdir``, or a SetupError saying what to do."""
  workdir = resolve_workdir(workdir)
  if not (workdir / 'checkpoints').exists():
    raise SetupError(
      f'No checkpoints in {workdir}: train first with --mode=train and the same '
      '--workdir, or point --workdir at a run.'
    )
  manager = checkpoint_manager(workdir, config, read_only=True)
  try:
    if manager.latest_step() is None:
      raise SetupError(f'No complete checkpoint in {workdir / "checkpoints"}.')
    return restore_state(
      manager, abstract_train_state(config, model, create_optimizer(config), mesh)
    )
  finally:
    manager.close()


class PreemptionHandler:
  """Turns SIGTERM (TPU preemption) into a flag the loop checks; all hosts agree when multi-host."""

  def __init__(self):
    self._received = threading.Event()
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._received.set())
    else:
      self._previous = None

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._received.is_set()

  def restore(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


# ----------------------------------------------------------------------------- the loop


def validate(config: ml_collections.ConfigDict) -> None:
  """Clear errors for settings the loop cannot run, before anything is built."""
  k = config.train.steps_per_call
  if k < 1:
    raise SetupError(f'train.steps_per_call must be >= 1, got {k}.')
  periods = {
    f'train.{name}': config.train[name]
    for name in (
      'num_train_steps',
      'checkpoint_every_steps',
      'log_every_steps',
      'sample_every_steps',
    )
  }
  periods['eval.every_steps'] = config.eval.every_steps
  for name, value in periods.items():
    if value % k:
      raise SetupError(f'{name}={value} must be a multiple of train.steps_per_call={k}.')
  if config.train.batch_size % jax.device_count():
    raise SetupError(
      f'train.batch_size={config.train.batch_size} must be divisible by the '
      f'{jax.device_count()} devices; change --config.train.batch_size.'
    )


def flatten_config(config: ml_collections.ConfigDict, prefix: str = '') -> dict[str, Any]:
  """{'model.ch': 128, ...}: scalar leaves for TensorBoard's hparams; sequences as strings."""
  flat = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      flat.update(flatten_config(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value if isinstance(value, (int, float, str, bool)) else str(value)
  return flat


def write_sample_grid(
  sample_fn: Callable,
  params: Any,
  rng: jax.Array,
  *,
  num_samples: int,
  path: epath.Path,
  writer: metric_writers.MetricWriter,
  step: int,
) -> np.ndarray:
  """Samples with ``params``, writes a PNG grid at ``path`` and to TensorBoard; returns uint8 images."""
  images = sampling.gather_images(sample_fn(params, rng), num_samples)
  grid = sampling.image_grid(images)
  if jax.process_index() == 0:
    sampling.save_png(path, grid)
    writer.write_images(step, {'samples': grid[None]})
  return images


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains (or resumes) in ``workdir``: checkpoints, TensorBoard logs and sample grids land there."""
  validate(config)
  workdir = resolve_workdir(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  input_pipeline.check_prepared(config)

  mesh = sampling.make_mesh()
  model = create_model(config)
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  optimizer = create_optimizer(config)
  manager = checkpoint_manager(workdir, config)
  abstract_state = abstract_train_state(config, model, optimizer, mesh)
  if manager.latest_step() is not None:
    state = restore_state(manager, abstract_state)
    logging.info('Resumed from step %d in %s.', int(state.step), manager.directory)
  else:
    state = init_train_state(config, model, optimizer, mesh)
  start_step = int(state.step)
  if start_step >= config.train.num_train_steps:
    logging.info('The run in %s is complete (step %d); nothing to do.', workdir, start_step)
    manager.close()
    return state

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams(flatten_config(config))
    if jax.process_index() == 0:
      (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
  parameter_overview.log_parameter_overview(state.params)

  num_steps, k = config.train.num_train_steps, config.train.steps_per_call
  train_step = make_train_step(config, model, diffusion, optimizer, mesh)
  sample_fn = sampling.make_sample_fn(
    model,
    diffusion,
    mesh,
    image_shape=image_shape(config),
    num_samples=config.train.num_sample_images,
    clip_denoised=config.train.clip_denoised,
  )
  sample_rng = jax.random.PRNGKey(config.seed + 1)
  train_iter = input_pipeline.create_train_iterator(config, start_step=start_step // k)
  report_progress = periodic_actions.ReportProgress(
    num_train_steps=num_steps, writer=writer, every_steps=config.train.log_every_steps
  )
  evaluator = (
    evaluate.make_in_loop_evaluator(config, workdir, model, diffusion, mesh)
    if config.eval.every_steps
    else None
  )
  preemption = PreemptionHandler()
  collected = None
  step = saved_step = start_step
  try:
    while step < num_steps:
      batch = next(train_iter)['image']
      if k == 1:
        batch = batch[None]
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        state, step_metrics = train_step(state, global_batch(mesh, batch))
      step += k
      collected = step_metrics if collected is None else collected.merge(step_metrics)
      report_progress(step)
      if step % config.train.log_every_steps == 0 or step == num_steps:
        writer.write_scalars(
          step, {f'train/{name}': value for name, value in collected.compute().items()}
        )
        collected = None
      if step % config.train.checkpoint_every_steps == 0 or step == num_steps:
        manager.save(step, args=ocp.args.StandardSave(state))
        saved_step = step
      if step % config.train.sample_every_steps == 0 and step != num_steps:
        with report_progress.timed('sample'):
          write_sample_grid(
            sample_fn,
            state.ema_params,
            sample_rng,
            num_samples=config.train.num_sample_images,
            path=workdir / 'samples' / f'step_{step:08d}.png',
            writer=writer,
            step=step,
          )
      if evaluator and step % config.eval.every_steps == 0:
        with report_progress.timed('eval'):
          evaluator(step, state.ema_params, writer)
      if preemption.should_stop(step):
        logging.warning('Preempted (SIGTERM) at step %d: saving and exiting.', step)
        if saved_step != step:
          manager.save(step, args=ocp.args.StandardSave(state), force=True)
        break
    if step >= num_steps:
      write_sample_grid(
        sample_fn,
        state.ema_params,
        sample_rng,
        num_samples=config.train.num_sample_images,
        path=workdir / 'samples' / f'step_{step:08d}.png',
        writer=writer,
        step=step,
      )
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.flush()
    preemption.restore()
  return state


def sample_from_checkpoint(
  config: ml_collections.ConfigDict, workdir: str, *, num_samples: int
) -> np.ndarray:
  """Draws samples with the latest checkpoint's EMA params; writes a PNG grid and an .npz."""
  workdir = resolve_workdir(workdir)
  mesh = sampling.make_mesh()
  model = create_model(config)
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  state = restore_latest(config, workdir, model, mesh)
  step = int(state.step)
  sample_fn = sampling.make_sample_fn(
    model,
    diffusion,
    mesh,
    image_shape=image_shape(config),
    num_samples=num_samples,
    clip_denoised=config.train.clip_denoised,
  )
  images = sampling.gather_images(
    sample_fn(state.ema_params, jax.random.PRNGKey(config.seed + 2)), num_samples
  )
  if jax.process_index() == 0:
    stem = workdir / 'samples' / f'ema_step_{step:08d}_n{num_samples}'
    sampling.save_png(stem.with_suffix('.png'), sampling.image_grid(images))
    with (stem.with_suffix('.npz')).open('wb') as f:
      np.savez_compressed(f, images=images, step=step)
    logging.info('Wrote %d samples of step %d to %s.{png,npz}', num_samples, step, stem)
  return images
