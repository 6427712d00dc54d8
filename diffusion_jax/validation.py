"""Checks of a config against what a run can do, before anything heavy is built.

``validate`` collects every problem of a config (ranges, choices, the U-Net against the image
size, the data set's name, the batch against the devices, what evaluation needs) into one
SetupError, a line per problem naming the field, its value and the fix. ``check_train``,
``check_eval`` and ``check_splits`` are the parts the train loop and the evaluation call.
"""

import difflib
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import naming

from diffusion_jax import config_defaults, fid, models, runtime
from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax.datasets import sklearn_digits  # importing registers the project's builders
from diffusion_jax.errors import SetupError
from diffusion_jax.evaluators import inception
from diffusion_jax.sampling import SAMPLE_METHODS

MODES = ('train', 'sample', 'eval', 'figures')
GRAD_CLIP_MODES = ('per_device', 'global')
EVAL_METRICS = ('inception', 'digits')
# The fewest samples each metric can score: IS averages over splits; a covariance needs 2.
MIN_EVAL_SAMPLES = {'inception': inception.NUM_IS_SPLITS, 'digits': 2}

_INCEPTION_HELP = (
  'eval.metrics="inception" needs the FID Inception weights, but config.eval.inception_path is '
  "not set. Download pytorch-fid's {name} ({url}), convert it once where torch is installed with\n"
  '  python -m diffusion_jax.fid --pytorch_fid_weights={name} --output=inception_fid.npz\n'
  'and pass --config.eval.inception_path=inception_fid.npz (or use eval.metrics="digits" for '
  'sklearn_digits). See docs/evaluation.md.'
)

Problems = dict[str, str]  # field -> what is wrong and the fix; the first problem of a field wins

# Rules of numeric fields: (the bound as messages say it, its test, whether it takes integers).
_RULES: dict[str, tuple[str, Callable[[Any], bool], bool]] = {
  'count': ('an integer >= 1', lambda v: v >= 1, True),
  'optional count': ('None or an integer >= 1', lambda v: v >= 1, True),
  'non-negative count': ('an integer >= 0', lambda v: v >= 0, True),
  'non-negative': ('>= 0', lambda v: v >= 0, False),
  'positive': ('> 0', lambda v: v > 0, False),
  'fraction': ('in [0, 1)', lambda v: 0 <= v < 1, False),
}
# Numeric fields: (field, rule, what it is).
_RANGES = (
  ('train.num_train_steps', 'count', 'how many optimizer steps the run trains'),
  ('train.steps_per_call', 'optional count', 'the optimizer steps per host call (None: auto)'),
  ('train.log_every_steps', 'count', 'the period of metric logs'),
  ('train.checkpoint_every_steps', 'count', 'the period of checkpoint saves'),
  ('train.sample_every_steps', 'count', 'the period of sample grids'),
  ('train.keep_checkpoints', 'count', 'how many checkpoints are kept (0 would delete each one)'),
  ('train.batch_size', 'count', 'the global batch size'),
  ('train.num_sample_images', 'count', 'the number of images in a sample grid'),
  ('eval.every_steps', 'non-negative count', 'the period of in-loop evaluation, 0 = off'),
  ('eval.batch_size', 'count', 'the global batch of evaluation'),
  ('eval.num_samples', 'count', 'the number of samples --mode=eval scores'),
  ('eval.in_loop_num_samples', 'count', 'the number of samples an in-loop evaluation scores'),
  ('eval.nll_num_examples', 'optional count', 'the examples of the bound (None: the split)'),
  ('eval.reference_num_examples', 'optional count', 'the FID reference images (None: all)'),
  ('dataset.image_size', 'count', 'the side of the square images'),
  ('dataset.num_channels', 'count', 'the channels of the images'),
  ('dataset.shuffle_buffer_size', 'count', 'the number of examples the input shuffles'),
  ('dataset.prefetch', 'count', 'the number of batches prepared ahead'),
  ('diffusion.num_diffusion_timesteps', 'count', 'T, the steps of the diffusion process'),
  ('num_cpu_devices', 'optional count', 'the JAX devices a CPU host is split into'),
  ('model.num_res_blocks', 'non-negative count', 'the ResNet blocks per level'),
  ('model.dropout', 'fraction', 'the dropout rate'),
  ('optim.learning_rate', 'positive', "Adam's learning rate"),
  ('optim.eps', 'positive', "Adam's epsilon"),
  ('optim.b1', 'fraction', "Adam's first-moment decay"),
  ('optim.b2', 'fraction', "Adam's second-moment decay"),
  ('optim.grad_clip', 'non-negative', 'the gradient norm clip, 0 = none'),
  ('optim.warmup_steps', 'non-negative count', 'the steps of learning-rate warm-up'),
  ('optim.ema_decay', 'fraction', 'the decay of the EMA params'),
  ('sample.num_steps', 'optional count', 'the sampler steps (None: all T)'),
  ('sample.eta', 'non-negative', "DDIM's eta (0: deterministic, 1: ancestral-like)"),
)
_CHOICES = (
  ('diffusion.beta_schedule', diffusion_lib.BETA_SCHEDULES),
  ('diffusion.model_mean_type', diffusion_lib.MEAN_TYPES),
  ('diffusion.model_var_type', diffusion_lib.VAR_TYPES),
  ('diffusion.loss_type', diffusion_lib.LOSS_TYPES),
  ('optim.grad_clip_mode', GRAD_CLIP_MODES),
  ('eval.metrics', EVAL_METRICS),
  ('sample.method', SAMPLE_METHODS),
)
# The betas each schedule uses ('jsd' and 'cosine' use neither).
_BOTH_BETAS = ('beta_start', 'beta_end')
_SCHEDULE_BETAS = {**dict.fromkeys(('linear', 'quad', 'warmup10', 'warmup50'), _BOTH_BETAS)}
_SCHEDULE_BETAS['const'] = ('beta_end',)
_MISSING = object()


def validate(config: ml_collections.ConfigDict, *, mode: str) -> None:
  """One SetupError listing every problem of ``config`` for ``mode`` ('train', 'sample',
  'eval'): ranges, choices, the model against the images, the data set's name, and the train and
  evaluation checks where they run. Needs the JAX runtime started (``jax.device_count()``)."""
  if mode not in MODES:
    raise ValueError(f'Unknown mode {mode!r}; choose one of {MODES}.')
  problems: Problems = {}
  parts = [_range_problems, _choice_problems, _beta_problems, _model_problems, _dataset_problems]
  parts.append(_sample_problems)
  if mode == 'train':
    parts.append(train_problems)
  every = _get(config, 'eval.every_steps')
  if mode == 'eval' or (mode == 'train' and _is_int(every) and every > 0):
    parts.append(eval_problems)
  for part in parts:
    for field, message in part(config).items():
      problems.setdefault(field, message)
  _raise(problems)


def check_train(config: ml_collections.ConfigDict) -> None:
  """A SetupError for train settings the loop cannot run on this many devices."""
  _raise(train_problems(config))


def check_eval(config: ml_collections.ConfigDict) -> None:
  """A SetupError for eval settings that cannot run."""
  _raise(eval_problems(config))


def train_problems(config: ml_collections.ConfigDict) -> Problems:
  """Steps per call against the periods, the batch against the devices, the clipping mode."""
  problems = _range_problems(config, ('train.steps_per_call',))
  k = runtime.steps_per_call(config.train)
  periods = ('num_train_steps', 'checkpoint_every_steps', 'log_every_steps', 'sample_every_steps')
  for name in [f'train.{p}' for p in periods] + ['eval.every_steps']:
    value = _get(config, name)
    if 'train.steps_per_call' not in problems and _is_int(value) and value % k:
      problems[name] = (
        f'{name}={value} must be a multiple of train.steps_per_call={k}; set --config.{name} '
        f'to a multiple of {k} (or --config.train.steps_per_call=1).'
      )
  batch, devices = config.train.batch_size, jax.device_count()
  if _is_int(batch) and batch % devices:
    problems['train.batch_size'] = (
      f'train.batch_size={batch} must be divisible by the {devices} devices; change '
      f'--config.train.batch_size (e.g. to {max(devices, batch // devices * devices)}).'
    )
  problems.update(_choice_problems(config, ('optim.grad_clip_mode',)))
  return problems


def eval_problems(config: ml_collections.ConfigDict) -> Problems:
  """What keeps evaluation from running: the metric, its data set and weights, sample counts."""
  if 'eval' not in config:
    return {
      'eval': 'The config has no `eval` section; add the eval.* fields of '
      'diffusion_jax/config_defaults.py (see docs/evaluation.md).'
    }
  ev, problems = config.eval, _choice_problems(config, ('eval.metrics',))
  if problems:
    return problems
  digits_name = sklearn_digits.SklearnDigits.name
  if ev.metrics == 'digits' and config.dataset.name.split(':')[0] != digits_name:
    problems['eval.metrics'] = (
      f'eval.metrics="digits" scores only {digits_name!r}, but dataset.name is '
      f'{config.dataset.name!r}; use eval.metrics="inception".'
    )
  if ev.metrics == 'inception' and not ev.inception_path:
    problems['eval.inception_path'] = _INCEPTION_HELP.format(
      name=fid.PYTORCH_FID_WEIGHTS, url=fid.PYTORCH_FID_WEIGHTS_URL
    )
  minimum = MIN_EVAL_SAMPLES[ev.metrics]
  for name in ('num_samples', 'in_loop_num_samples'):
    if _is_int(ev[name]) and ev[name] < minimum:
      problems[f'eval.{name}'] = (
        f'eval.{name}={ev[name]} is too small: {ev.metrics} metrics need at least {minimum} '
        f'samples; set --config.eval.{name}={minimum} or more.'
      )
  fields = ('eval.batch_size', 'eval.nll_num_examples', 'eval.reference_num_examples')
  return {**problems, **_range_problems(config, fields)}


def check_splits(builder: tfds.core.DatasetBuilder, splits: dict[str, str | None]) -> None:
  """A SetupError naming the config field if a split (``'train'``, ``'test[:16]'``; None: not
  used) is not one of the prepared data set's, before any sampling or training starts."""
  available = sorted(builder.info.splits)
  for field, split in splits.items():
    if split is None:
      continue
    try:
      builder.info.splits[split]
    except (KeyError, ValueError):
      raise SetupError(
        f'{field}={split!r} is not a split of {builder.info.full_name}, which has {available}; '
        f'set --config.{field} to one of them (a slice such as "train[:1000]" works too).'
      ) from None


# ----------------------------------------------------------------------------- the parts


def _range_problems(
  config: ml_collections.ConfigDict, fields: tuple[str, ...] | None = None
) -> Problems:
  """Numeric fields out of their range (all of ``_RANGES``, or those named in ``fields``)."""
  problems = {}
  defaults = config_defaults.get_config()
  for field, rule, meaning in _RANGES:
    if fields is not None and field not in fields:
      continue
    value = _get(config, field)
    if value is _MISSING:
      problems[field] = _missing(field)
      continue
    if value is None and rule == 'optional count':
      continue
    bound, test, integer = _RULES[rule]
    number = _is_int(value) or (not integer and isinstance(value, float))
    if not number or not test(value):
      example = _get(defaults, field)
      example = '' if example in (None, _MISSING) else f' (e.g. {example})'
      problems[field] = (
        f'{field}={value!r} must be {bound}: it is {meaning}; '
        f'set --config.{field}={"N" if integer else "X"}{example}.'
      )
  return problems


def _choice_problems(
  config: ml_collections.ConfigDict, fields: tuple[str, ...] | None = None
) -> Problems:
  """Enumerated fields set to none of their choices, and a dtype that is not a float type."""
  problems = {}
  for field, choices in _CHOICES:
    value = _get(config, field)
    if (fields is not None and field not in fields) or value in choices:
      continue
    near = difflib.get_close_matches(str(value), choices, n=1) or [choices[0]]
    problems[field] = (
      _missing(field)
      if value is _MISSING
      else f'{field}={value!r} is not one of {", ".join(choices)}; set --config.{field}={near[0]}.'
    )
  if fields is None:
    dtype = _get(config, 'model.dtype')
    try:
      models.compute_dtype(dtype)
    except (TypeError, ValueError):
      problems['model.dtype'] = (
        f'model.dtype={dtype!r} is not a floating dtype name; set --config.model.dtype=float32 '
        '(or bfloat16 on TPU).'
      )
  return problems


def _sample_problems(config: ml_collections.ConfigDict) -> Problems:
  """A sampler step count outside 2..T (respacing keeps the first and the last step)."""
  steps, total = _get(config, 'sample.num_steps'), _get(config, 'diffusion.num_diffusion_timesteps')
  if not (_is_int(steps) and _is_int(total)) or 2 <= steps <= total:
    return {}
  fix = f'set --config.sample.num_steps=N, e.g. {min(50, total)}, or None for all steps.'
  return {'sample.num_steps': f'sample.num_steps={steps} must be in 2..T={total}; {fix}'}


def _beta_problems(config: ml_collections.ConfigDict) -> Problems:
  """beta_start and beta_end outside 0 < beta_start <= beta_end <= 1, for schedules using them."""
  schedule = _get(config, 'diffusion.beta_schedule')
  used = _SCHEDULE_BETAS.get(schedule, ()) if isinstance(schedule, str) else ()
  values = [config.diffusion[name] for name in used]
  numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
  chain = [*values, 1]
  if not used or (numbers and values[0] > 0 and all(a <= b for a, b in zip(chain, chain[1:]))):
    return {}
  given = ', '.join(f'diffusion.{name}={value!r}' for name, value in zip(used, values))
  overrides = ' and '.join(f'--config.diffusion.{name}' for name in used)
  return {
    f'diffusion.{used[0]}': (
      f'{given}: the {schedule} schedule needs 0 < {" <= ".join([*used, "1"])}; set '
      f'{overrides} (the paper: beta_start=0.0001, beta_end=0.02 for T=1000).'
    )
  }


def _model_problems(config: ml_collections.ConfigDict) -> Problems:
  """The U-Net against the images: GroupNorm widths, levels against the size, attention sizes."""
  m, size = config.model, _get(config, 'dataset.image_size')
  ch, mult = m.ch, m.ch_mult
  attn = m.attn_resolutions
  attn = tuple(attn) if isinstance(attn, (tuple, list)) else (attn,)
  if not isinstance(mult, (tuple, list)) or not mult or not all(_is_int(k) and k > 0 for k in mult):
    return {
      'model.ch_mult': f'model.ch_mult={mult!r} must list a positive integer per level; set e.g. '
      '--config.model.ch_mult=(1,2,2,2).'
    }
  problems, groups = {}, models.NUM_GROUPS
  if not _is_int(ch) or ch < 1 or ch % groups:
    widths = [ch * k for k in mult] if _is_int(ch) else []
    suggestion = max(groups, round(ch / groups) * groups) if _is_int(ch) else groups
    problems['model.ch'] = (
      f'model.ch={ch!r} must be a positive multiple of {groups}: GroupNorm splits the channels '
      f'of every level (ch * ch_mult = {widths}) into {groups} groups; set '
      f'--config.model.ch={suggestion}.'
    )
  if not _is_int(size) or size < 1:
    return problems
  levels = len(mult)
  if size % 2 ** (levels - 1):
    fit = max(n for n in range(1, levels + 1) if size % 2 ** (n - 1) == 0)
    problems['model.ch_mult'] = (
      f'model.ch_mult={tuple(mult)} has {levels} levels, which halve the image {levels - 1} '
      f'times, but dataset.image_size={size} is not divisible by {2 ** (levels - 1)}; use at most '
      f'{fit} levels for {size}x{size} images, e.g. --config.model.ch_mult={_flag(mult[:fit])}.'
    )
  sizes = [size // 2**i for i in range(levels) if size // 2**i]
  wrong = [r for r in attn if r not in sizes]
  if wrong:
    kept = tuple(r for r in attn if r in sizes) or (sizes[len(sizes) // 2],)
    problems['model.attn_resolutions'] = (
      f'model.attn_resolutions={attn}: {", ".join(map(str, wrong))} is not a feature-map '
      f'size of this U-Net ({size}x{size} images over {levels} levels: {sizes}), so no layer '
      f'would attend there; set --config.model.attn_resolutions={_flag(kept)} (or () for none).'
    )
  return problems


def _dataset_problems(config: ml_collections.ConfigDict) -> Problems:
  """A data set name TFDS does not know (a registered builder, or one prepared in the data dir)."""
  name = _get(config, 'dataset.name')
  try:
    parsed, kwargs = naming.parse_builder_name_kwargs(name)
  except (AttributeError, TypeError, ValueError):
    return {
      'dataset.name': f'dataset.name={name!r} is not a TFDS name such as cifar10 or lsun/bedroom; '
      'set --config.dataset.name.'
    }
  if parsed.namespace:
    return {}
  try:
    builder_cls = tfds.builder_cls(parsed.name)
  except tfds.core.registered.DatasetNotFoundError:
    data_dir = config.dataset.data_dir or tfds.core.constants.DATA_DIR
    if (epath.Path(data_dir) / parsed.name).exists():
      return {}  # prepared by a builder that is not registered here: TFDS reads its files
    known = tfds.list_builders(with_community_datasets=False)
    near = difflib.get_close_matches(parsed.name, known, n=3)
    hint = f'did you mean {", ".join(near)}? ' if near else ''
    return {
      'dataset.name': f'dataset.name={name!r} is not a data set TFDS knows and is not prepared in '
      f'{data_dir}; {hint}set --config.dataset.name (this project adds sklearn_digits and '
      'lsun_lmdb/<category>; see docs/datasets.md).'
    }
  configs = getattr(builder_cls, 'builder_configs', None) or {}
  if 'config' in kwargs and configs and kwargs['config'] not in configs:
    return {
      'dataset.name': f'dataset.name={name!r}: {parsed.name} has no config '
      f'{kwargs["config"]!r}; choose one of {", ".join(configs)}.'
    }
  return {}


# ----------------------------------------------------------------------------- helpers


def _raise(problems: Problems) -> None:
  """A SetupError of ``problems``: the one line, or a count and a line each."""
  lines = list(problems.values())
  if len(lines) == 1:
    raise SetupError(lines[0])
  if lines:
    raise SetupError(
      f'the config has {len(lines)} problems:\n' + '\n'.join(f'  {x}' for x in lines)
    )


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
  """The value of the dotted ``field``, or ``_MISSING``."""
  node = config
  for part in field.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return _MISSING
    node = node[part]
  return node


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _missing(field: str) -> str:
  return f'the config has no field {field}; add it (defaults: diffusion_jax/config_defaults.py).'


def _flag(values: Any) -> str:
  """A sequence as a tuple flag value without spaces: ``(1,2)``, ``(4,)``, ``()``."""
  values = tuple(values)
  return f'({",".join(map(str, values))}{"," if len(values) == 1 else ""})'
