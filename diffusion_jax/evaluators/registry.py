"""Evaluator types by the name ``config.evals.<name>.type`` gives them. A new type is one module
(see ``base``) and one line here."""

from diffusion_jax.evaluators import bound, digits, inception
from diffusion_jax.evaluators.base import EvaluatorType

TYPES: dict[str, EvaluatorType] = {
  'inception': inception,
  'digits': digits,
  'bound': bound,
}
