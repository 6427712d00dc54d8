"""The train loop's periodic actions, each with its period and its console line: the metric log
(fed the values the loop computes), sample grids, and one action per evaluator of
``config.evals`` with a period. The loop asks each whether it is due after a host call.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

import jax
from clu import metric_writers, periodic_actions
from etils import epath

from diffusion_jax import console, evaluate, hardware, sampling
from diffusion_jax import run as run_lib
from diffusion_jax.train_state import TrainState

INTERRUPTED = 'interrupted_actions.json'  # the actions a preemption notice stopped, by step


@dataclasses.dataclass(frozen=True)
class Periodic:
  """``action(step, state)`` every ``every_steps`` optimizer steps (0: never) and, with
  ``at_end``, at the last step; ``name`` names it in the record of interrupted actions."""

  name: str
  every_steps: int
  action: Callable[[int, TrainState], None]
  at_end: bool = False

  def due(self, step: int, last_step: int) -> bool:
    return bool(self.every_steps and step % self.every_steps == 0) or (
      self.at_end and step == last_step
    )


class MetricLog:
  """Writes the train metrics the loop computed (TensorBoard, and one console line with the
  rate and the ETA), with the achieved FLOP rate of ``flops_per_step`` (XLA's count) and, where
  the device kind's peak is known, ``train/mfu``."""

  def __init__(
    self,
    writer: metric_writers.MetricWriter,
    *,
    num_steps: int,
    start_step: int,
    flops_per_step: float,
  ):
    self._writer, self._num_steps, self._flops = writer, num_steps, flops_per_step
    self._last_step, self._last_time = start_step, time.monotonic()

  def __call__(self, step: int, values: dict[str, Any]) -> None:
    now = time.monotonic()
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    scalars = {f'train/{k}': v for k, v in values.items()}
    self._writer.write_scalars(step, scalars | hardware.throughput_metrics(self._flops, 1 / rate))
    console.say(
      'step %d/%d  loss %.4f  %.1f steps/s  ETA %s',
      step,
      self._num_steps,
      values['loss'],
      rate,
      console.duration((self._num_steps - step) / rate),
    )


def sample_grid(
  run: run_lib.Run,
  writer: metric_writers.MetricWriter,
  report_progress: periodic_actions.ReportProgress,
) -> Periodic:
  """Every ``train.sample_every_steps`` and at the end: a grid of the EMA params' samples into
  ``workdir/samples/step_N.png`` and TensorBoard."""
  num_samples = run.config.train.num_sample_images
  sampler = run.chunked_sampler(num_samples, run.config.train.batch_size)  # a train batch fits

  def write_grid(step: int, state: TrainState) -> None:
    path = run.workdir / 'samples' / f'step_{step:08d}.png'
    with report_progress.timed('sample'):
      sampling.write_sample_grid(
        sampler,
        state.ema_params,
        run.key('sample_grid'),
        num_samples=num_samples,
        path=path,
        writer=writer,
        step=step,
        labels=run.sample_labels(num_samples),
      )
    console.say('samples of step %d: %s', step, path)

  return Periodic('samples', run.config.train.sample_every_steps, write_grid, at_end=True)


def evaluations(
  run: run_lib.Run,
  writer: metric_writers.MetricWriter,
  report_progress: periodic_actions.ReportProgress,
) -> list[Periodic]:
  """One action per evaluator with a period (``evals.<name>.every_steps``), references loaded
  now: its scalars to TensorBoard and the console."""
  periodic = []
  for name, evaluator in evaluate.build(run, in_loop=True).items():

    def run_eval(step: int, state: TrainState, name=name, evaluator=evaluator) -> None:
      with report_progress.timed(f'eval_{name}'):
        result = evaluator(state.ema_params, evaluate.evaluator_key(run, name))
      scalars = evaluate.scalars(result)
      writer.write_scalars(step, scalars)
      console.say('evaluation %s at step %d: %s', name, step, evaluate.describe(scalars))

    periodic.append(Periodic(f'eval {name}', run.config.evals[name].every_steps, run_eval))
  return periodic


def record_interrupted(workdir: epath.Path, step: int, names: list[str]) -> None:
  """Records the actions of ``step`` that a preemption notice stopped (none: clears the record);
  process 0 writes it, into the workdir all hosts share."""
  if jax.process_index() != 0:
    return
  path = workdir / INTERRUPTED
  if names:
    path.write_text(json.dumps({'step': step, 'actions': names}))
  elif path.exists():
    path.unlink()


def interrupted(workdir: epath.Path, step: int) -> list[str]:
  """The actions a preemption notice stopped at ``step`` (the step a run resumes from)."""
  path = workdir / INTERRUPTED
  if not path.exists():
    return []
  record = json.loads(path.read_text())
  return record['actions'] if record.get('step') == step else []
