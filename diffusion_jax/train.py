"""The training loop: restore or start, the data-parallel step (``train_step``) on the input
pipeline's batches, Orbax checkpoints, CLU metrics, sample grids and evaluation, preemption."""

from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from clu import metric_writers, parameter_overview, periodic_actions
from etils import epath
from jax.sharding import Mesh

from diffusion_jax import (
  console,
  hardware,
  hooks,
  input_pipeline,
  parallel,
  runtime,
  train_state,
  train_step,
  validation,
  workdir_config,
)
from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax.errors import SetupError
from diffusion_jax.train_state import TrainState


class NonFiniteError(SetupError):
  """The loss or the gradients stopped being finite: the run diverged."""


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
  train_state.remove_stale_temporaries(workdir, keep=config.train.keep_checkpoints)
  manager = train_state.checkpoint_manager(
    workdir,
    keep=config.train.keep_checkpoints,
    save_every_steps=config.train.checkpoint_every_steps,
  )
  try:
    if manager.latest_step() is not None:
      state = train_state.restore(manager, factory.abstract(mesh), rename_unreadable=True)
      console.say('Resumed from step %d in %s.', int(state.step), manager.directory)
    else:
      state = factory.create(mesh)
    if int(state.step) >= config.train.num_train_steps:
      console.say('The run in %s is complete (step %d); nothing to do.', workdir, state.step)
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
      workdir_config.write(config, workdir)
  parameter_overview.log_parameter_overview(state.params)

  k = runtime.steps_per_call(config.train)
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
  lowered = train_step.make_train_step(config.optim, factory.model, diffusion, mesh).lower(
    factory.abstract(mesh),
    factory.abstract_batch(mesh, config.train.batch_size, k),
    train_step.empty_metrics(mesh),
  )
  flops = hardware.lowered_flops(lowered, mesh=mesh) / k  # one trace: counted, then compiled
  step_fn = lowered.compile()
  hardware.check_fits(
    step_fn,
    mesh.devices.flat[0],
    what=f'The train step at train.batch_size={config.train.batch_size}',
    fix='Recompute activations with --config.model.remat=True, compute in bfloat16 with '
    '--config.model.dtype=bfloat16, or lower --config.train.batch_size (then also the learning '
    'rate), or use a slice with more devices.',
  )
  periodic, running = hooks.make_hooks(
    config, workdir, builder, factory, diffusion, mesh, writer, report_progress, start_step, flops
  )
  periods = [config.train.log_every_steps, config.train.sample_every_steps, config.eval.every_steps]
  preemption = runtime.Preemption()
  step = start_step
  try:
    with metric_writers.ensure_flushes(writer):
      while step < num_steps:
        batch = parallel.shard_steps(mesh, next(train_iter)['image'])
        with jax.profiler.StepTraceAnnotation('train', step_num=step):
          state, running.metrics = step_fn(state, batch, running.metrics)  # all on device
        step += k
        last = step == num_steps
        if last or manager.should_save(step) or any(p and step % p == 0 for p in periods):
          _check_finite(running.metrics, manager)  # before anything is saved or written
        saved = train_state.save(manager, state, step=step, force=last)
        if saved:
          console.say('checkpoint of step %d: %s', step, manager.directory / str(step))
        if preemption.should_stop():  # before the hooks: a preemption notice gives ~30 s
          console.say('Preempted (SIGTERM) at step %d: saving and exiting.', step)
          if not saved:
            _check_finite(running.metrics, manager)
            train_state.save(manager, state, step=step, force=True)
          break
        for hook_step in range(step - k + 1, step + 1):  # hooks see every optimizer step
          report_progress(hook_step)
          for hook in periodic:
            hook(hook_step, state=state)
  finally:
    preemption.restore()
  if step == num_steps:
    _summary(workdir, manager, step)
  return state


def _summary(workdir: epath.Path, manager: ocp.CheckpointManager, step: int) -> None:
  """Where the run's results are, and how to look at them."""
  console.say('Done: step %d in %s', step, workdir)
  console.say('  sample grids:  %s', workdir / 'samples')
  console.say('  checkpoints:   %s (latest: step %s)', manager.directory, manager.latest_step())
  console.say('  TensorBoard:   tensorboard --logdir %s', workdir)


def _check_finite(running: train_step.TrainMetrics, manager: ocp.CheckpointManager) -> None:
  """A NonFiniteError naming the first non-finite step, if any (reads one scalar).

  ``running`` holds the steps since the last log; every log is a boundary checked before the
  metrics are reset, so the earlier steps were all checked."""
  first = int(running.first_nonfinite_step.compute())
  if first != train_step.NO_STEP:
    raise NonFiniteError(
      f'Training diverged: the loss or the gradients are not finite from step {first} on. '
      f'Nothing was saved after it: the latest checkpoint (step {manager.latest_step()}) is the '
      'last good one. Lower --config.optim.learning_rate (or raise optim.warmup_steps, or clip '
      'with optim.grad_clip) and run the same command again to resume from it.'
    )
