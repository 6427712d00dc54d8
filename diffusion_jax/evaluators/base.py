"""What every evaluator type provides and returns.

A type is a module of ``diffusion_jax.evaluators`` listed in ``registry.TYPES``, with
``LABELS`` (metric name -> what the console calls it; its scalars are ``eval/<metric>``),
``problems(name, settings, config)`` (what keeps its settings from running, as config problems
keyed by field), ``create(name, settings, run, *, in_loop)`` (the evaluator, its networks and
reference statistics loaded) and ``programs(settings, run)`` (the device programs it runs, with
abstract arguments: what a TPU plan compiles without data or weights). An evaluator is called
with EMA params and its key and returns a ``Result``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import jax
import ml_collections

from diffusion_jax import run as run_lib
from diffusion_jax.config_rules import Problems


@dataclasses.dataclass(frozen=True)
class Result:
  """Scalars (``eval/<metric>`` in TensorBoard), details for ``report.json`` and files for the
  evaluation's folder (``eval/step_N/<evaluator>/``)."""

  scalars: dict[str, float]
  details: dict[str, Any] = dataclasses.field(default_factory=dict)
  files: dict[str, bytes] = dataclasses.field(default_factory=dict)


Evaluator = Callable[[Any, jax.Array], Result]  # (EMA params, key) -> Result
# A jitted program and abstract arguments to lower it with (jax.ShapeDtypeStruct leaves).
Program = tuple[Callable[..., Any], tuple[Any, ...]]


class EvaluatorType(Protocol):
  """The module of one evaluator type."""

  LABELS: dict[str, str]

  def problems(
    self, name: str, settings: ml_collections.ConfigDict, config: ml_collections.ConfigDict
  ) -> Problems: ...

  def create(
    self, name: str, settings: ml_collections.ConfigDict, run: run_lib.Run, *, in_loop: bool
  ) -> Evaluator: ...

  def programs(
    self, settings: ml_collections.ConfigDict, run: run_lib.Run
  ) -> dict[str, Program]: ...
