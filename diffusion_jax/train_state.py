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
from absl import logging
from etils import epath
from jax.sharding import Mesh

from diffusion_jax import console, models, parallel, rngs, runtime
from diffusion_jax.errors import SetupError

_TMP_MARK = '.orbax-checkpoint-tmp'  # Orbax names a save in flight <step>.orbax-checkpoint-tmp...
_COMPLETE_MARK = 'commit_success.txt'  # the last file Orbax writes into a finished step


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

  def abstract_batch(
    self, mesh: Mesh, batch_size: int, steps_per_call: int = 1
  ) -> jax.ShapeDtypeStruct:
    """Shape, dtype and sharding of the train step's images [steps_per_call, batch_size, ...],
    for lowering the step without data (FLOP counts, compile and memory analysis)."""
    shape = (steps_per_call, batch_size, *self.image_shape)
    return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=parallel.steps_sharding(mesh))


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
    save_interval_steps=0 if read_only else 1,  # what Orbax sets, with a warning, if read only
    create=not read_only,
  )
  return ocp.CheckpointManager(resolve_workdir(workdir) / 'checkpoints', options=options)


def save(
  manager: ocp.CheckpointManager,
  state: TrainState,
  *,
  step: int | None = None,
  force: bool = False,
) -> bool:
  """Saves ``state`` at its step if the manager's interval says so (or ``force``). A loop passes
  the ``step`` it counts: reading ``state.step`` would wait for the device on every call."""
  step = int(state.step) if step is None else step
  return manager.save(step, args=ocp.args.StandardSave(state), force=force)


def remove_stale_temporaries(workdir: epath.PathLike, *, keep: int | None = None) -> None:
  """Deletes what killed saves and retention deletions left unfinished; moves aside any other
  incomplete step folder (process 0 does it, every process waits for it).

  Orbax deletes a step only once ``keep`` complete steps are newer, so an incomplete step with that
  many complete ones above it is a retention deletion cut short: it is finished. Any other
  incomplete step (a copy cut short) is renamed ``<step>.incomplete``, never deleted.
  """
  directory = resolve_workdir(workdir) / 'checkpoints'
  if jax.process_index() == 0 and directory.exists():
    for stale in sorted(directory.glob(f'*{_TMP_MARK}*')):
      console.say('Removing %s, a save that never finished.', stale)
      if stale.is_dir():
        stale.rmtree()
      else:
        stale.unlink()
    complete, incomplete = [], []
    for step in (p for p in directory.iterdir() if p.name.isdigit()):
      (complete if (step / _COMPLETE_MARK).exists() else incomplete).append(step)
    for step in incomplete:
      if keep is not None and sum(int(c.name) > int(step.name) for c in complete) >= keep:
        console.say('Removing %s, a retention deletion cut short.', step)
        step.rmtree()
      else:
        console.say('%s is incomplete (a copy cut short?): moved aside.', step)
        step.rename(directory / f'{step.name}.incomplete')
  runtime.barrier('removed stale checkpoint temporaries')


def restore(
  manager: ocp.CheckpointManager,
  abstract_state: TrainState,
  step: int | None = None,
  *,
  rename_unreadable: bool = False,
) -> TrainState:
  """The checkpoint at ``step`` (default: the latest readable one), laid out as ``abstract_state``.

  A checkpoint that cannot be read (a truncated file, a killed copy) is logged and skipped for the
  previous complete one; with ``rename_unreadable`` it is renamed aside (``<step>.unreadable``),
  never deleted, so that the run goes on from the previous one. A checkpoint of another model is
  a SetupError: its tree does not fit ``abstract_state``.
  """
  steps = sorted(manager.all_steps(), reverse=True) if step is None else [step]
  for target in steps:
    try:
      _check_fits(manager.directory / str(target), abstract_state)
      state = manager.restore(target, args=ocp.args.StandardRestore(abstract_state))
      if target != steps[0] and rename_unreadable:
        manager.reload()  # forget the steps renamed aside
      return state
    except SetupError:
      raise
    except Exception as e:  # noqa: BLE001  (any failure to read means damaged files)
      error = e
    logging.error(
      'The checkpoint at step %d in %s cannot be read (%s: %s).',
      target,
      manager.directory,
      type(error).__name__,
      str(error)[:300],
    )
    if rename_unreadable:
      if jax.process_index() == 0:
        aside = manager.directory / f'{target}.unreadable'
        (manager.directory / str(target)).rename(aside)
        logging.error('Renamed it to %s; reading the previous checkpoint.', aside)
      runtime.barrier(f'renamed the unreadable checkpoint {target} aside')
  if not steps:
    raise SetupError(f'No complete checkpoint in {manager.directory}.')
  raise SetupError(
    f'No checkpoint in {manager.directory} can be read (tried steps {steps}; see the errors '
    'above). Move them aside to start over.'
  )


def _check_fits(directory: epath.Path, abstract_state: TrainState) -> None:
  """A SetupError, before any array is read, if the checkpoint in ``directory`` holds another
  tree or other shapes than ``abstract_state`` (the config describes another model)."""
  stored = _shapes(ocp.StandardCheckpointHandler().metadata(directory / 'default'))
  if not stored:
    raise ValueError(f'no array metadata in {directory}')  # damaged: read the previous one
  wanted = _shapes(abstract_state)
  problems = [
    f'{"/".join(path)}: stored {stored.get(path, "nothing")}, the config needs '
    f'{wanted.get(path, "nothing")}'
    for path in sorted(stored.keys() | wanted.keys())
    if stored.get(path) != wanted.get(path)
  ]
  if problems:
    raise SetupError(
      f'The checkpoint {directory} holds another model than the config describes '
      f'({len(problems)} differences, e.g. {"; ".join(problems[:3])}). Use the config the run '
      'was trained with (its config.json), or a new --workdir.'
    )


def _shapes(tree: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Leaf path (as names) -> shape."""
  return {
    tuple(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path): tuple(
      leaf.shape
    )
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def latest_step(workdir: epath.PathLike) -> int:
  """The step of the latest complete checkpoint in ``workdir``, or a SetupError saying what to
  do (nothing is read but the folder listing)."""
  manager = _read_only_manager(workdir)
  try:
    return manager.latest_step()
  finally:
    manager.close()


def restore_latest(workdir: epath.PathLike, abstract_state: TrainState) -> TrainState:
  """The latest complete checkpoint in ``workdir``, or a SetupError saying what to do."""
  manager = _read_only_manager(workdir)
  try:
    return restore(manager, abstract_state)
  finally:
    manager.close()


def _read_only_manager(workdir: epath.PathLike) -> ocp.CheckpointManager:
  """A read-only manager of ``workdir``'s checkpoints, or a SetupError if there is no complete
  one."""
  workdir = resolve_workdir(workdir)
  if not (workdir / 'checkpoints').exists():
    raise SetupError(
      f'No checkpoints in {workdir}: train first with --mode=train and the same '
      '--workdir, or point --workdir at a run.'
    )
  manager = checkpoint_manager(workdir, read_only=True)
  if manager.latest_step() is None:
    manager.close()
    raise SetupError(f'No complete checkpoint in {workdir / "checkpoints"}.')
  return manager
