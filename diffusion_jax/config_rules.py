"""The vocabulary of config checks: a problem is a field and one line saying what is wrong and the
fix. The owners of the settings (``validation`` for the run, ``models`` through it, each
evaluator type) state their rules with these helpers; ``validation`` collects them.
"""

import difflib
from collections.abc import Callable, Iterable
from typing import Any

import ml_collections

from diffusion_jax.errors import SetupError

Problems = dict[str, str]  # field -> what is wrong and the fix; the first problem of a field wins
MISSING = object()

# Rules of numeric fields: (the bound as messages say it, its test, whether it takes integers).
RULES: dict[str, tuple[str, Callable[[Any], bool], bool]] = {
  'count': ('an integer >= 1', lambda v: v >= 1, True),
  'optional count': ('None or an integer >= 1', lambda v: v >= 1, True),
  'non-negative count': ('an integer >= 0', lambda v: v >= 0, True),
  'non-negative': ('>= 0', lambda v: v >= 0, False),
  'optional non-negative': ('None or >= 0', lambda v: v >= 0, False),
  'positive': ('> 0', lambda v: v > 0, False),
  'fraction': ('in [0, 1)', lambda v: 0 <= v < 1, False),
}
# A numeric field's rule: (dotted field, rule name of RULES, what the field is).
Range = tuple[str, str, str]


def get(config: ml_collections.ConfigDict, field: str) -> Any:
  """The value of the dotted ``field``, or ``MISSING``."""
  node = config
  for part in field.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return MISSING
    node = node[part]
  return node


def is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def missing(field: str) -> str:
  return f'the config has no field {field}; add it (defaults: diffusion_jax/config_defaults.py).'


def range_problems(
  config: ml_collections.ConfigDict,
  ranges: Iterable[Range],
  defaults: ml_collections.ConfigDict | None = None,
) -> Problems:
  """Numeric fields outside their rule; the fix quotes the field's value in ``defaults``."""
  problems = {}
  for field, rule, meaning in ranges:
    value = get(config, field)
    if value is MISSING:
      problems[field] = missing(field)
      continue
    if value is None and rule.startswith('optional'):
      continue
    bound, test, integer = RULES[rule]
    number = is_int(value) or (not integer and isinstance(value, float))
    if not number or not test(value):
      example = MISSING if defaults is None else get(defaults, field)
      example = '' if example in (None, MISSING) else f' (e.g. {example})'
      problems[field] = (
        f'{field}={value!r} must be {bound}: it is {meaning}; '
        f'set --config.{field}={"N" if integer else "X"}{example}.'
      )
  return problems


def evaluator_range_problems(
  name: str, settings: ml_collections.ConfigDict, ranges: Iterable[Range]
) -> Problems:
  """Range problems of evaluator ``name``: its period and ``ranges`` ((field of the evaluator,
  rule, meaning)), named ``evals.<name>.<field>``."""
  specs = [('every_steps', 'non-negative count', 'the period in the train loop, 0 = off'), *ranges]
  wrapped = ml_collections.ConfigDict({'evals': {name: settings}})
  return range_problems(wrapped, [(f'evals.{name}.{f}', rule, what) for f, rule, what in specs])


def choice_problem(field: str, value: Any, choices: tuple[str, ...]) -> str | None:
  """The problem of an enumerated field set to none of its ``choices`` (None if it is fine)."""
  if value in choices:
    return None
  if value is MISSING:
    return missing(field)
  near = difflib.get_close_matches(str(value), choices, n=1) or [choices[0]]
  return f'{field}={value!r} is not one of {", ".join(choices)}; set --config.{field}={near[0]}.'


def raise_problems(problems: Problems) -> None:
  """A SetupError of ``problems``: the one line, or a count and a line each."""
  lines = list(problems.values())
  if len(lines) == 1:
    raise SetupError(lines[0])
  if lines:
    raise SetupError(
      f'the config has {len(lines)} problems:\n' + '\n'.join(f'  {x}' for x in lines)
    )


def flag(values: Any) -> str:
  """A sequence as a tuple flag value without spaces: ``(1,2)``, ``(4,)``, ``()``."""
  values = tuple(values)
  return f'({",".join(map(str, values))}{"," if len(values) == 1 else ""})'
