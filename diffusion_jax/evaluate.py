"""Evaluation of the EMA model: the evaluators of ``config.evals`` (``evaluators.registry``), run
in the train loop (each on its own period) or by ``--mode=eval`` (all of them, into a report).

Evaluator ``name`` draws from ``fold_in(key('eval'), crc32(name))``, so its numbers do not depend
on which other evaluators run, and in-loop evaluations at different steps share their noise.
Everything collective runs on every host.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import jax
from clu import metric_writers

from diffusion_jax import console, train_state
from diffusion_jax import run as run_lib
from diffusion_jax.evaluators import base
from diffusion_jax.evaluators.registry import TYPES


def evaluator_key(run: run_lib.Run, name: str) -> jax.Array:
  """The key of evaluator ``name``."""
  return jax.random.fold_in(run.key('eval'), zlib.crc32(name.encode()))


def build(run: run_lib.Run, *, in_loop: bool) -> dict[str, base.Evaluator]:
  """The run's evaluators by name (in the loop: those with a period), references loaded."""
  return {
    name: TYPES[settings.type].create(name, settings, run, in_loop=in_loop)
    for name, settings in run.config.evals.items()
    if settings.every_steps or not in_loop
  }


def describe(scalars: dict[str, float]) -> str:
  """``confident 0.894, FD 11.8, ...``: evaluation scalars (``eval/<metric>``) for the console."""
  labels = {metric: label for kind in TYPES.values() for metric, label in kind.LABELS.items()}
  return ', '.join(
    f'{labels.get(k.removeprefix("eval/"), k.removeprefix("eval/"))} {v:.4g}'
    for k, v in scalars.items()
  )


def scalars(result: base.Result) -> dict[str, float]:
  """``eval/<metric>`` of every scalar of ``result``."""
  return {f'eval/{k}': v for k, v in result.scalars.items()}


def evaluate_checkpoint(run: run_lib.Run, *, config_name: str | None = None) -> dict[str, Any]:
  """``--mode=eval``: every evaluator on the latest checkpoint's EMA params ->
  ``workdir/eval/step_<N>/`` (``report.json``, each evaluator's files in its own folder, e.g.
  ``digits/samples.png``, ``bpd/nll_terms.csv``) and ``eval/*`` scalars; returns the report."""
  train_state.latest_step(run.workdir)  # a checkpoint to evaluate, before anything is built
  evaluators = build(run, in_loop=False)
  state = run.restore_latest()  # Orbax warns once more that the folder is read only: true
  step = int(state.step)
  results = {
    name: ev(state.ema_params, evaluator_key(run, name)) for name, ev in evaluators.items()
  }
  merged = {k: v for result in results.values() for k, v in scalars(result).items()}
  report = {
    'config': config_name or run.config.dataset.name,
    'dataset': run.config.dataset.name,
    'step': step,
    'sampler': run.sampler.as_dict(),
    'metrics': {k.removeprefix('eval/'): v for k, v in merged.items()},  # every evaluator's
    'evals': {
      name: {
        'settings': run.config.evals[name].to_dict(),
        'metrics': result.scalars,
        **result.details,
      }
      for name, result in results.items()
    },
  }
  out_dir = run.workdir / 'eval' / f'step_{step}'
  if jax.process_index() == 0:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / 'report.json').write_text(json.dumps(report, indent=2))
    for name, result in results.items():
      for file, data in result.files.items():
        (out_dir / name).mkdir(exist_ok=True)
        (out_dir / name / file).write_bytes(data)
  writer = metric_writers.create_default_writer(run.workdir, just_logging=jax.process_index() > 0)
  writer.write_scalars(step, merged)
  writer.flush()
  writer.close()
  console.say('Evaluated step %d: %s', step, describe(merged))
  console.say('  report: %s', out_dir / 'report.json')
  return report
