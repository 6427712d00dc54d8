"""The train step (Algorithm 1): one ``jax.shard_map`` over every device of every host.

The train state is replicated, the global batch is split over devices, gradients and metrics are
averaged with ``pmean``. Each example's timestep and noise are drawn from a key folded with its
global index in the batch, so with ``optim.grad_clip_mode='global'`` and no dropout the step does
not depend on how the batch is laid out over devices (per-device clipping clips each device's own
gradient, and dropout keys are per device). The step also reports, on device, the first step
whose loss or gradients were not finite.
"""

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from diffusion_jax import models, parallel, train_state
from diffusion_jax import run as run_lib
from diffusion_jax.train_state import TrainState

StepFn = Callable[..., tuple[TrainState, 'TrainMetrics']]


NO_STEP = np.iinfo(np.int32).max
_LABEL_STREAM = 0x6C61626C  # folded into a step's example key for the dropped labels


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


def make_train_step(run: run_lib.Run) -> StepFn:
  """The jitted ``step(state, images[, running, labels]) -> (state, metrics)`` of ``run`` over
  its mesh.

  ``images`` is the global batch [steps_per_call, B, H, W, C] sharded on B, ``labels`` its classes
  [steps_per_call, B] for a class-conditional model (each dropped to the null class with
  probability ``train.p_uncond``); the state is donated.
  Several optimizer steps per call run in a ``lax.scan`` that also merges their metrics, so the
  call returns one ``TrainMetrics`` of device arrays. Given ``running`` metrics (e.g. from
  ``empty_metrics``; donated), the call returns them merged with its own, still on device: a loop
  that passes each call's result to the next reads nothing back until it logs. Gradients are
  clipped to ``optim.grad_clip`` per device before the average or globally after it.
  """
  optim_config, model, process, mesh = run.config.optim, run.model, run.process, run.mesh
  num_timesteps = process.num_timesteps
  p_uncond = run.config.train.p_uncond
  cpu = mesh.devices.flat[0].platform == 'cpu'
  schedule = train_state.learning_rate_schedule(optim_config)
  clip_norm, clip_mode = optim_config.grad_clip, optim_config.grad_clip_mode

  def example_draws(rng: jax.Array, batch_index: jax.Array, shape: tuple[int, ...]):
    """Timestep t ~ U{0..T-1} and noise ε ~ N(0, I) for one example, keyed by its global index."""
    key_t, key_noise = jax.random.split(jax.random.fold_in(rng, batch_index))
    return (
      jax.random.randint(key_t, (), 0, num_timesteps),
      jax.random.normal(key_noise, shape, jnp.float32),
    )

  def dropped_labels(rng: jax.Array, batch_index: jax.Array, labels: jax.Array) -> jax.Array:
    """Each example's class, or the null class with probability ``train.p_uncond`` (the
    unconditional model of classifier-free guidance), keyed by its global index."""
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, batch_index)
    drop = jax.vmap(jax.random.bernoulli, in_axes=(0, None))(keys, p_uncond)
    return jnp.where(drop, model.null_class, labels)

  def one_step(state: TrainState, batch: dict[str, jax.Array]):
    images = batch['image']
    device = jax.lax.axis_index(parallel.DATA_AXIS)
    local_batch = images.shape[0]
    example_rng, dropout_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
    batch_index = device * local_batch + jnp.arange(local_batch)
    draws = jax.vmap(example_draws, in_axes=(None, 0, None))
    t, noise = draws(example_rng, batch_index, images.shape[1:])
    labels = batch.get('label')
    if labels is not None:
      labels = dropped_labels(jax.random.fold_in(example_rng, _LABEL_STREAM), batch_index, labels)
    dropout_rng = jax.random.fold_in(dropout_rng, device)

    def loss_fn(params):
      model_fn = models.model_fn(model, params, dropout_rng=dropout_rng, labels=labels)
      return jnp.mean(process.training_losses(model_fn, images, t, noise))

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

  def per_device(state: TrainState, batch: dict[str, jax.Array]):
    """The call's optimizer steps on this device's share, their metrics merged on device."""
    if batch['image'].shape[0] == 1:
      state, outputs = one_step(state, jax.tree.map(lambda x: x[0], batch))
      return state, TrainMetrics.single_from_model_output(**outputs)

    def scanned(carry, batch):
      state, collection = carry
      state, outputs = one_step(state, batch)
      return (state, collection.merge(TrainMetrics.single_from_model_output(**outputs))), None

    # XLA:CPU runs the step ~16x slower inside a loop (BENCHMARKS.md): unrolled there.
    return jax.lax.scan(scanned, (state, TrainMetrics.empty()), batch, unroll=cpu)[0]

  sharded = jax.shard_map(
    per_device,
    mesh=mesh,
    in_specs=(P(), P(None, parallel.DATA_AXIS)),
    out_specs=(P(), P()),
  )

  def step(
    state: TrainState,
    images: jax.Array,
    running: TrainMetrics | None = None,
    labels: jax.Array | None = None,
  ):
    batch = {'image': images} if labels is None else {'image': images, 'label': labels}
    state, collection = sharded(state, batch)
    return state, collection if running is None else running.merge(collection)

  return jax.jit(step, out_shardings=parallel.replicated(mesh), donate_argnums=(0, 2))


def empty_metrics(mesh: Mesh) -> TrainMetrics:
  """Empty train metrics on ``mesh`` (replicated): the start of a run of ``step(state, images,
  running)`` calls, which merge each call's metrics into ``running`` inside the step."""
  return jax.jit(TrainMetrics.empty, out_shardings=parallel.replicated(mesh))()


def abstract_metrics(mesh: Mesh) -> TrainMetrics:
  """Shapes, dtypes and (replicated) shardings of ``empty_metrics``: the step's ``running``
  argument for compiling without devices (a TPU topology)."""
  sharding = parallel.replicated(mesh)
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
    jax.eval_shape(TrainMetrics.empty),
  )
