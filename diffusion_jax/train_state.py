"""The train state and its checkpoints: the state, the model and optimizer factories, the Orbax
manager, the abstract state for restoring, and restore. Train, sample, eval and convert share them.

The state's tree (``step``, ``params``, ``ema_params``, ``opt_state``, ``rng``) is what every
checkpoint holds; the optimizer and the EMA decay ride along as static fields, outside the tree.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh

from diffusion_jax import models, parallel, rngs
from diffusion_jax.errors import SetupError


@flax.struct.dataclass
class TrainState:
  """Step, params, EMA params, optimizer state and the base key of the per-step draws."""

  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  ema_decay: float = flax.struct.field(pytree_node=False)

  @classmethod
  def create(
    cls, *, params: Any, tx: optax.GradientTransformation, ema_decay: float, rng: jax.Array
  ) -> TrainState:
    """Step 0, EMA params a copy of ``params``, a fresh optimizer state."""
    return cls(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params=jax.tree.map(jnp.copy, params),
      opt_state=tx.init(params),
      rng=rng,
      tx=tx,
      ema_decay=ema_decay,
    )

  def apply_gradients(self, grads: Any) -> TrainState:
    """One optimizer step, then the EMA update ema <- decay * ema + (1 - decay) * params."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    ema_params = optax.incremental_update(params, self.ema_params, 1.0 - self.ema_decay)
    return self.replace(
      step=self.step + 1, params=params, ema_params=ema_params, opt_state=opt_state
    )


def create_model(model_config: ml_collections.ConfigDict, num_channels: int) -> models.UNet:
  """The U-Net of ``config.model`` with ``num_channels`` output channels (the data's)."""
  return models.UNet(out_ch=num_channels, **model_config)


def learning_rate_schedule(optim_config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up from 0 over ``warmup_steps``, then constant (Appendix B)."""
  return optax.linear_schedule(0.0, optim_config.learning_rate, max(optim_config.warmup_steps, 1))


def create_optimizer(optim_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam on the warm-up schedule (gradient clipping happens in the step, per device or global)."""
  return optax.adam(
    learning_rate_schedule(optim_config),
    b1=optim_config.b1,
    b2=optim_config.b2,
    eps=optim_config.eps,
  )


@dataclasses.dataclass(frozen=True)
class StateFactory:
  """How a run's initial state is made; builds it, or its abstract shape, on a mesh."""

  model: models.UNet
  tx: optax.GradientTransformation
  image_shape: tuple[int, int, int]
  seed: int
  ema_decay: float

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> StateFactory:
    size, channels = config.dataset.image_size, config.dataset.num_channels
    return cls(
      model=create_model(config.model, channels),
      tx=create_optimizer(config.optim),
      image_shape=(size, size, channels),
      seed=config.seed,
      ema_decay=config.optim.ema_decay,
    )

  def initial(self) -> TrainState:
    """The initial state from the seed's ``params`` and ``train`` streams (traceable)."""
    x = jnp.zeros((1, *self.image_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    params = self.model.init(rngs.params_key(self.seed), x, t, train=False)['params']
    return TrainState.create(
      params=params, tx=self.tx, ema_decay=self.ema_decay, rng=rngs.key(self.seed, 'train')
    )

  def create(self, mesh: Mesh) -> TrainState:
    """The initial state, replicated over ``mesh``."""
    return jax.jit(self.initial, out_shardings=parallel.replicated(mesh))()

  def abstract(self, mesh: Mesh) -> TrainState:
    """Shapes, dtypes and (replicated) shardings of the state, for restoring."""
    sharding = parallel.replicated(mesh)
    return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      jax.eval_shape(self.initial),
    )


# ----------------------------------------------------------------------------- checkpoints


def resolve_workdir(workdir: epath.PathLike) -> epath.Path:
  """``workdir`` as an absolute path (Orbax rejects relative ones); gs:// paths as given."""
  return epath.Path(workdir) if '://' in str(workdir) else epath.Path(os.path.abspath(workdir))


def checkpoint_manager(
  workdir: epath.PathLike,
  *,
  keep: int | None = None,
  save_every_steps: int | None = None,
  read_only: bool = False,
) -> ocp.CheckpointManager:
  """Orbax manager of ``workdir/checkpoints``: async saves every ``save_every_steps`` (and forced
  ones), the last ``keep`` kept."""
  policy = None
  if save_every_steps is not None:
    policy = ocp.checkpoint_managers.FixedIntervalPolicy(save_every_steps)
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep,
    save_decision_policy=policy,
    enable_async_checkpointing=not read_only,
    read_only=read_only,
    create=not read_only,
  )
  return ocp.CheckpointManager(resolve_workdir(workdir) / 'checkpoints', options=options)


def save(manager: ocp.CheckpointManager, state: TrainState, *, force: bool = False) -> bool:
  """Saves ``state`` at its step if the manager's interval says so (or ``force``)."""
  return manager.save(int(state.step), args=ocp.args.StandardSave(state), force=force)


def restore(
  manager: ocp.CheckpointManager, abstract_state: TrainState, step: int | None = None
) -> TrainState:
  """The checkpoint at ``step`` (default: the latest), laid out as ``abstract_state``."""
  step = manager.latest_step() if step is None else step
  return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))


def restore_latest(workdir: epath.PathLike, abstract_state: TrainState) -> TrainState:
  """The latest complete checkpoint in ``workdir``, or a SetupError saying what to do."""
  workdir = resolve_workdir(workdir)
  if not (workdir / 'checkpoints').exists():
    raise SetupError(
      f'No checkpoints in {workdir}: train first with --mode=train and the same '
      '--workdir, or point --workdir at a run.'
    )
  manager = checkpoint_manager(workdir, read_only=True)
  try:
    if manager.latest_step() is None:
      raise SetupError(f'No complete checkpoint in {workdir / "checkpoints"}.')
    return restore(manager, abstract_state)
  finally:
    manager.close()
