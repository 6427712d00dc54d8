"""The train loop's periodic actions: metric logs, sample grids and evaluation, each with its one
console line; CLU's ``PeriodicCallback`` calls them after every optimizer step."""

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import ml_collections
from clu import metric_writers, periodic_actions
from etils import epath
from jax.sharding import Mesh

from diffusion_jax import console, evaluate, hardware, rngs, sampling, train_state, train_step
from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax.train_state import TrainState


@dataclasses.dataclass
class Running:
  """The train metrics since the last log, on device: the loop passes them to each step call
  (``train_step``'s ``running``), which returns them merged with its own."""

  metrics: train_step.TrainMetrics


def make_hooks(
  config: ml_collections.ConfigDict,
  workdir: epath.Path,
  builder: Any,
  factory: train_state.StateFactory,
  diffusion: diffusion_lib.GaussianDiffusion,
  mesh: Mesh,
  writer: metric_writers.MetricWriter,
  report_progress: periodic_actions.ReportProgress,
  start_step: int,
  flops_per_step: float,
) -> tuple[list[periodic_actions.PeriodicCallback], Running]:
  """The loop's periodic callbacks (metrics, sample grids, evaluation; timed by
  ``report_progress``), called after every optimizer step with the state, and the running
  metrics the loop feeds through the step. The metric log adds the achieved FLOP rate of
  ``flops_per_step`` (XLA's count) and, where the device kind's peak is known, ``train/mfu``."""
  num_steps = config.train.num_train_steps
  running = Running(train_step.empty_metrics(mesh))

  last_log = {'step': start_step, 'time': time.monotonic()}

  def write_metrics(step: int, t: float, state: TrainState) -> None:
    del state
    values = running.metrics.compute()
    running.metrics = train_step.empty_metrics(mesh)
    del values['first_nonfinite_step']  # checked by the loop, at every boundary
    rate = (step - last_log['step']) / max(t - last_log['time'], 1e-9)
    last_log.update(step=step, time=t)
    scalars = {f'train/{k}': v for k, v in values.items()}
    writer.write_scalars(step, scalars | hardware.throughput_metrics(flops_per_step, 1 / rate))
    console.say(
      'step %d/%d  loss %.4f  %.1f steps/s  ETA %s',
      step,
      num_steps,
      values['loss'],
      rate,
      console.duration((num_steps - step) / rate),
    )

  sample_fn = sampling.make_sample_fn(
    factory.model,
    diffusion,
    mesh,
    image_shape=factory.image_shape,
    num_samples=config.train.num_sample_images,
    **sampling.sampler_settings(config),
  )

  def write_grid(step: int, t: float, state: TrainState) -> None:
    del t
    path = workdir / 'samples' / f'step_{step:08d}.png'
    sampling.write_sample_grid(
      sample_fn,
      state.ema_params,
      rngs.key(config.seed, 'sample_grid'),
      num_samples=config.train.num_sample_images,
      path=path,
      writer=writer,
      step=step,
    )
    console.say('samples of step %d: %s', step, path)

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
      scalars = evaluator(step, state.ema_params, writer)
      console.say('evaluation at step %d: %s', step, evaluate.describe(scalars))

    hooks.append(
      periodic_actions.PeriodicCallback(
        every_steps=config.eval.every_steps, callback_fn=_timed(report_progress, 'eval', run_eval)
      )
    )
  return hooks, running


def _timed(report_progress: periodic_actions.ReportProgress, name: str, fn: Callable) -> Callable:
  """``fn`` with its time reported by ``report_progress`` under ``name``."""

  def timed(**kwargs):
    with report_progress.timed(name):
      return fn(**kwargs)

  return timed
