"""The training loop: restore or start, the data-parallel step (``train_step``) on the input
pipeline's batches, Orbax checkpoints, CLU metrics, the periodic actions (``hooks``), preemption.
"""

import time
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from clu import metric_writers, parameter_overview, periodic_actions

from diffusion_jax import (
  console,
  hardware,
  hooks,
  input_pipeline,
  parallel,
  preemption,
  runtime,
  train_state,
  train_step,
  validation,
  workdir_config,
)
from diffusion_jax import run as run_lib
from diffusion_jax.errors import DivergedError
from diffusion_jax.train_state import TrainState

_MEMORY_FIX = (
  'Recompute activations with --config.model.remat=True, compute in bfloat16 with '
  '--config.model.dtype=bfloat16, or lower --config.train.batch_size (then also the learning '
  'rate), or use a slice with more devices.'
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


def train_and_evaluate(run: run_lib.Run) -> TrainState:
  """Trains (or resumes) ``run`` in its workdir: checkpoints, TensorBoard logs and sample grids
  go there. A preemption notice stops it at the next host call or chunk, saved."""
  config = run.config
  validation.check_train(config)
  run.workdir.mkdir(parents=True, exist_ok=True)
  runtime.check_shared_workdir(run.workdir)
  input_pipeline.check_splits(run.builder, {'dataset.train_split': config.dataset.train_split})
  classes = run.model.num_classes
  input_pipeline.check_labels(
    run.builder, input_pipeline.label_key(config.dataset, classes), classes
  )
  train_state.remove_stale_temporaries(run.workdir, keep=config.train.keep_checkpoints)
  manager = train_state.checkpoint_manager(
    run.workdir,
    keep=config.train.keep_checkpoints,
    save_every_steps=config.train.checkpoint_every_steps,
  )
  try:
    if manager.latest_step() is not None:
      state = train_state.restore(manager, run.abstract_state(), rename_unreadable=True)
      console.say('Resumed from step %d in %s.', int(state.step), manager.directory)
    else:
      state = run.initial_state()
    done = int(state.step) >= config.train.num_train_steps
    if done and not hooks.interrupted(run.workdir, int(state.step)):
      console.say('The run in %s is complete (step %d); nothing to do.', run.workdir, state.step)
      return state
    with preemption.watching():
      return _train(run, manager, state)
  finally:
    manager.wait_until_finished()
    manager.close()


def _train(run: run_lib.Run, manager: ocp.CheckpointManager, state: TrainState) -> TrainState:
  """The loop from ``state`` to ``train.num_train_steps``, or to a preemption notice."""
  config = run.config
  start_step, num_steps = int(state.step), config.train.num_train_steps

  writer = metric_writers.create_default_writer(run.workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams(flatten_config(config))
    if jax.process_index() == 0:
      workdir_config.write(config, run.workdir)
  parameter_overview.log_parameter_overview(state.params)

  k = runtime.steps_per_call(config.train)
  train_iter = input_pipeline.create_train_iterator(
    run.builder,
    config.dataset,
    batch_size=config.train.batch_size,
    steps_per_call=k,
    seed=config.seed,
    start_step=start_step // k,
    label_key=input_pipeline.label_key(config.dataset, run.model.num_classes),
  )
  log_every = config.train.log_every_steps
  report_progress = periodic_actions.ReportProgress(
    num_train_steps=num_steps, writer=writer, every_steps=log_every
  )
  running = train_step.empty_metrics(run.mesh)
  step_fn, flops = _compile_step(run, running, k)
  if preemption.stop_requested():  # compiling takes minutes: nothing trained, nothing to save
    console.say('Preempted (SIGTERM) while compiling at step %d: exiting.', start_step)
    return state
  metric_log = hooks.MetricLog(
    writer, num_steps=num_steps, start_step=start_step, flops_per_step=flops
  )
  progress = [report_progress, *_profiler(config.train, run.workdir, start_step)]
  periodic = [hooks.sample_grid(run, writer, report_progress)]
  periodic += hooks.evaluations(run, writer, report_progress)
  saves = _TimedSaves(runtime.checkpoint_minutes(config.train))
  step = start_step
  with metric_writers.ensure_flushes(writer):
    redo = hooks.interrupted(run.workdir, step)  # what a preemption stopped at this step
    if redo:
      if not _act(run, manager, state, step, [h for h in periodic if h.name in redo]):
        return state
      hooks.record_interrupted(run.workdir, step, [])  # done now
    while step < num_steps:
      batch = {k: parallel.shard_steps(run.mesh, v) for k, v in next(train_iter).items()}
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        state, running = step_fn(state, batch['image'], running, batch.get('label'))
      step += k  # the periods are multiples of k: only this step can be due
      last = step == num_steps
      log = last or step % log_every == 0
      due = [hook for hook in periodic if hook.due(step, num_steps)]
      if log or due or manager.should_save(step):
        _check_finite(running, manager)  # before anything is saved or written
      force = last or (log and saves.due())
      if train_state.save(manager, state, step=step, force=force):
        saves.saved()
        console.say('checkpoint of step %d: %s', step, manager.directory / str(step))
      if preemption.stop_requested():  # before the periodic actions, which may take long
        _check_finite(running, manager)
        _save_on_notice(manager, state, step)
        break
      for each_step in range(step - k + 1, step + 1):  # CLU's actions want every step
        for action in progress:
          action(each_step)
      if log:
        values = jax.tree.map(parallel.host_value, running.compute())  # replicated
        del values['first_nonfinite_step']  # checked above, at every boundary
        metric_log(step, values)
        running = train_step.empty_metrics(run.mesh)
      if not _act(run, manager, state, step, due):
        break
  if step == num_steps:
    _summary(run, manager, step)
  return state


def _compile_step(run: run_lib.Run, running: train_step.TrainMetrics, k: int):
  """The train step lowered once (its FLOP count taken from that lowering) and compiled; a
  SetupError if it needs more memory than the device has."""
  config = run.config
  batch_size = config.train.batch_size
  lowered = train_step.make_train_step(run).lower(
    run.abstract_state(),
    run.abstract_batch(batch_size, k),
    running,
    run.abstract_labels(batch_size, k),
  )
  flops = hardware.lowered_flops(lowered, mesh=run.mesh) / k
  step_fn = lowered.compile()
  what = f'The train step at train.batch_size={config.train.batch_size}'
  hardware.check_fits(step_fn, jax.local_devices()[0], what=what, fix=_MEMORY_FIX)
  return step_fn, flops


def _profiler(train_config: ml_collections.ConfigDict, workdir, start_step: int) -> list:
  """CLU's profiler action of ``train.profile_steps`` steps, from this process's second step."""
  if not train_config.profile_steps:
    return []
  profile = periodic_actions.Profile(
    logdir=workdir,
    num_profile_steps=train_config.profile_steps,
    profile_duration_ms=None,
    first_profile=start_step + 1,
    every_secs=None,
  )
  return [profile]


def _act(run: run_lib.Run, manager, state: TrainState, step: int, due: list) -> bool:
  """Runs the periodic actions ``due`` at ``step``; False if a preemption notice stopped them
  (the state is then saved and the actions not done are recorded, to run on resume)."""
  for done, hook in enumerate(due):
    try:
      preemption.check()
      hook.action(step, state)
    except preemption.Preempted:
      _save_on_notice(manager, state, step)
      hooks.record_interrupted(run.workdir, step, [h.name for h in due[done:]])
      return False
  return True


def _save_on_notice(manager: ocp.CheckpointManager, state: TrainState, step: int) -> None:
  """After a preemption notice: the state of ``step`` saved, if no checkpoint has it yet."""
  console.say('Preempted (SIGTERM) at step %d: saving and exiting.', step)
  manager.wait_until_finished()  # a save of this step may be in flight
  if manager.latest_step() != step:
    train_state.save(manager, state, step=step, force=True)


class _TimedSaves:
  """Wall-clock checkpoints: ``due`` every ``minutes`` since the last save (None: never), decided
  by process 0 for every host (called at the same steps on every host)."""

  def __init__(self, minutes: float | None):
    self._seconds = None if not minutes else 60 * minutes
    self._last = time.monotonic()

  def due(self) -> bool:
    if self._seconds is None:
      return False
    return runtime.agree(time.monotonic() - self._last >= self._seconds)

  def saved(self) -> None:
    self._last = time.monotonic()


def _summary(run: run_lib.Run, manager: ocp.CheckpointManager, step: int) -> None:
  """Where the run's results are, and how to look at them."""
  console.say('Done: step %d in %s', step, run.workdir)
  console.say('  sample grids:  %s', run.workdir / 'samples')
  console.say('  checkpoints:   %s (latest: step %s)', manager.directory, manager.latest_step())
  console.say('  TensorBoard:   tensorboard --logdir %s', run.workdir)


def _check_finite(running: train_step.TrainMetrics, manager: ocp.CheckpointManager) -> None:
  """A DivergedError naming the first non-finite step, if any (reads one scalar).

  ``running`` holds the steps since the last log; every log is a boundary checked before the
  metrics are reset, so the earlier steps were all checked."""
  first = int(parallel.host_value(running.first_nonfinite_step.compute()))
  if first != train_step.NO_STEP:
    raise DivergedError(
      f'Training diverged: the loss or the gradients are not finite from step {first} on. '
      f'Nothing was saved after it: the latest checkpoint (step {manager.latest_step()}) is the '
      'last good one. Lower --config.optim.learning_rate (or raise optim.warmup_steps, or clip '
      'with optim.grad_clip) and run the same command again to resume from it.'
    )
