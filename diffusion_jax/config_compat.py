"""Config fields of earlier releases that still work for this one: each one set is moved to its new
place with one deprecation line, before the config is checked.

- ``train.clip_denoised`` -> ``sample.clip_denoised`` (a sampling setting).
- ``eval.*`` (one evaluation section) -> ``evals.<name>.*`` (evaluators by name, each with its
  own period): ``eval.metrics`` picks the sample evaluator (``inception`` or ``digits``),
  ``eval.nll_*`` go to the ``bound`` evaluator, the other fields to the sample evaluator (and
  ``eval.batch_size`` to both). ``eval.every_steps`` sets the sample evaluator's period, and the
  bound's when it has ``num_examples`` (as the old loop computed the bound only then).

A workdir's ``config.json`` written by an earlier release holds the old sections; the comparison
with it (``workdir_config``) only concerns the model and the process, so it is not affected.
"""

from collections.abc import Iterator

import ml_collections
from absl import logging

from diffusion_jax import config_defaults

SAMPLE_TYPES = ('inception', 'digits')
# Old eval field -> (the evaluator kind it goes to, its name there).
_MOVES = {
  'num_samples': ('sample', 'num_samples'),
  'in_loop_num_samples': ('sample', 'in_loop_num_samples'),
  'inception_path': ('sample', 'inception_path'),
  'reference_split': ('sample', 'reference_split'),
  'reference_dir': ('sample', 'reference_dir'),
  'reference_num_examples': ('sample', 'reference_num_examples'),
  'nll_split': ('bound', 'split'),
  'nll_num_examples': ('bound', 'num_examples'),
}


def translate(config: ml_collections.ConfigDict) -> list[str]:
  """Moves every deprecated field that is set into its new place (in ``config``, in place) and
  returns the deprecation lines, each also logged as a warning."""
  with config.unlocked():  # an evaluator may change type: its settings are made anew
    lines = list(_clip_denoised(config)) + list(_eval_section(config))
  for line in lines:
    logging.warning('%s', line)
  return lines


def _clip_denoised(config: ml_collections.ConfigDict) -> Iterator[str]:
  value = config.train.get('clip_denoised')
  if value is not None:
    config.sample.clip_denoised = value
    config.train.clip_denoised = None
    yield (
      f'train.clip_denoised is deprecated: it is a sampling setting, now sample.clip_denoised '
      f'(set to {value}). Use --config.sample.clip_denoised={value}.'
    )


def _eval_section(config: ml_collections.ConfigDict) -> Iterator[str]:
  legacy = config.get('eval')
  if legacy is None:
    return
  given = {
    name: legacy[name] for name in config_defaults.LEGACY_EVAL if legacy.get(name) is not None
  }
  if not given:
    return
  for name in given:
    legacy[name] = None
  evals = config.evals
  sample = _sample_evaluator(evals, given.pop('metrics', None))
  bound = next((name for name, settings in evals.items() if settings.type == 'bound'), None)
  moved = [f'--config.evals.{sample}.type={evals[sample].type}'] if sample else []
  for field, value in given.items():
    for name in _targets(field, evals, sample, bound, bound_sized='nll_num_examples' in given):
      key = _MOVES.get(field, (None, field))[1]
      if key in evals[name]:
        evals[name][key] = value
        moved.append(f'--config.evals.{name}.{key}={value}')
  yield (
    'config.eval is deprecated (evaluators are config.evals.<name>, each with its own period; '
    f'docs/evaluation.md); its settings were moved: {" ".join(moved) or "none"}.'
  )


def _sample_evaluator(evals: ml_collections.ConfigDict, kind: str | None) -> str | None:
  """The name of the sample evaluator, made anew as ``kind`` if ``eval.metrics`` asks for
  another type than the config has."""
  name = next((n for n, settings in evals.items() if settings.type in SAMPLE_TYPES), None)
  if kind is None or (name is not None and evals[name].type == kind):
    return name
  if name is not None:
    del evals[name]
  name = 'fid' if kind == 'inception' else kind
  evals[name] = (
    config_defaults.inception_eval() if kind == 'inception' else config_defaults.sample_eval(kind)
  )
  return name


def _targets(
  field: str,
  evals: ml_collections.ConfigDict,
  sample: str | None,
  bound: str | None,
  *,
  bound_sized: bool,
) -> list[str]:
  """The evaluators an old ``eval.<field>`` goes to."""
  if field == 'batch_size':
    names = [sample, bound]
  elif field == 'every_steps':  # the old loop computed the bound only with nll_num_examples
    sized = bound is not None and (bound_sized or evals[bound].num_examples is not None)
    names = [sample, bound if sized else None]
  else:
    names = [sample if _MOVES[field][0] == 'sample' else bound]
  return [name for name in names if name is not None]
