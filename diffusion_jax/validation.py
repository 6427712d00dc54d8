"""Checks of a config against what a run can do, before anything heavy is built.

``validate`` collects every problem of a config into one SetupError, a line per problem naming
the field, its value and the fix. Each setting's owner states its rules: the run's ranges and
choices are here, the U-Net's are ``models.problems``, each evaluator's are its type's
``problems`` (``evaluators.registry``). ``check_train`` is the part the train loop calls.
"""

import difflib

import jax
import ml_collections
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import naming

from diffusion_jax import config_defaults, config_rules, diffusion, models, runtime, sampling
from diffusion_jax.config_rules import Problems, get, is_int
from diffusion_jax.datasets import sklearn_digits  # noqa: F401  (importing registers the builder)
from diffusion_jax.evaluators.registry import TYPES

MODES = ('train', 'sample', 'eval', 'figures')
GRAD_CLIP_MODES = ('per_device', 'global')

# The run's numeric fields: (field, rule, what it is).
_RANGES = (
  ('train.num_train_steps', 'count', 'how many optimizer steps the run trains'),
  ('train.steps_per_call', 'optional count', 'the optimizer steps per host call (None: auto)'),
  ('train.log_every_steps', 'count', 'the period of metric logs'),
  ('train.checkpoint_every_steps', 'count', 'the period of checkpoint saves'),
  ('train.sample_every_steps', 'count', 'the period of sample grids'),
  ('train.keep_checkpoints', 'count', 'how many checkpoints are kept (0 would delete each one)'),
  ('train.checkpoint_every_minutes', 'optional non-negative', 'the wall time between checkpoints'),
  ('train.batch_size', 'count', 'the global batch size'),
  ('train.num_sample_images', 'count', 'the number of images in a sample grid'),
  ('train.profile_steps', 'non-negative count', 'the steps traced for the profiler, 0 = none'),
  ('dataset.image_size', 'count', 'the side of the square images'),
  ('dataset.num_channels', 'count', 'the channels of the images'),
  ('dataset.shuffle_buffer_size', 'count', 'the number of examples the input shuffles'),
  ('dataset.prefetch', 'count', 'the number of batches prepared ahead'),
  ('diffusion.num_diffusion_timesteps', 'count', 'T, the steps of the diffusion process'),
  ('num_cpu_devices', 'optional count', 'the JAX devices a CPU host is split into'),
  ('optim.learning_rate', 'positive', "Adam's learning rate"),
  ('optim.eps', 'positive', "Adam's epsilon"),
  ('optim.b1', 'fraction', "Adam's first-moment decay"),
  ('optim.b2', 'fraction', "Adam's second-moment decay"),
  ('optim.grad_clip', 'non-negative', 'the gradient norm clip, 0 = none'),
  ('optim.warmup_steps', 'non-negative count', 'the steps of learning-rate warm-up'),
  ('optim.ema_decay', 'fraction', 'the decay of the EMA params'),
  ('sample.num_steps', 'optional count', 'the sampler steps (None: all T)'),
  ('sample.eta', 'non-negative', "DDIM's eta (0: deterministic, 1: ancestral-like)"),
  ('sample.guidance', 'non-negative', 'the classifier-free guidance weight w'),
  ('train.p_uncond', 'fraction', 'the fraction of examples trained without their class'),
)
_CHOICES = (
  ('diffusion.beta_schedule', diffusion.BETA_SCHEDULES),
  ('diffusion.model_mean_type', diffusion.MEAN_TYPES),
  ('diffusion.model_var_type', diffusion.VAR_TYPES),
  ('diffusion.loss_type', diffusion.LOSS_TYPES),
  ('optim.grad_clip_mode', GRAD_CLIP_MODES),
  ('sample.method', sampling.SAMPLE_METHODS),
)
# The betas each schedule uses ('jsd' and 'cosine' use neither).
_BOTH_BETAS = ('beta_start', 'beta_end')
_SCHEDULE_BETAS = {**dict.fromkeys(('linear', 'quad', 'warmup10', 'warmup50'), _BOTH_BETAS)}
_SCHEDULE_BETAS['const'] = ('beta_end',)


def validate(config: ml_collections.ConfigDict, *, mode: str) -> None:
  """One SetupError listing every problem of ``config`` for ``mode`` ('train', 'sample', 'eval',
  'figures'): ranges, choices, the model against the images, the data set's name, the train
  settings and the evaluators where they run. Needs the JAX runtime started."""
  if mode not in MODES:
    raise ValueError(f'Unknown mode {mode!r}; choose one of {MODES}.')
  parts = [_range_problems, _choice_problems, _beta_problems, _model_problems, _dataset_problems]
  parts += [_sample_problems, _class_problems]
  if mode == 'train':
    parts.append(train_problems)
  if mode in ('train', 'eval'):
    parts.append(lambda c: eval_problems(c, in_loop_only=mode == 'train'))
  problems: Problems = {}
  for part in parts:
    for field, message in part(config).items():
      problems.setdefault(field, message)
  config_rules.raise_problems(problems)


def check_train(config: ml_collections.ConfigDict) -> None:
  """A SetupError for train settings the loop cannot run on this many devices."""
  config_rules.raise_problems(train_problems(config))


def train_problems(config: ml_collections.ConfigDict) -> Problems:
  """Steps per call against the periods, the batch against the devices, the clipping mode."""
  problems = config_rules.range_problems(
    config, [r for r in _RANGES if r[0] == 'train.steps_per_call']
  )
  k = runtime.steps_per_call(config.train)
  periods = ('num_train_steps', 'checkpoint_every_steps', 'log_every_steps', 'sample_every_steps')
  fields = [f'train.{p}' for p in periods]
  fields += [f'evals.{name}.every_steps' for name in config.get('evals', {})]
  for name in fields:
    value = get(config, name)
    if 'train.steps_per_call' not in problems and is_int(value) and value % k:
      problems[name] = (
        f'{name}={value} must be a multiple of train.steps_per_call={k}; set --config.{name} '
        f'to a multiple of {k} (or --config.train.steps_per_call=1).'
      )
  batch, devices = config.train.batch_size, jax.device_count()
  if is_int(batch) and batch % devices:
    problems['train.batch_size'] = (
      f'train.batch_size={batch} must be divisible by the {devices} devices; change '
      f'--config.train.batch_size (e.g. to {max(devices, batch // devices * devices)}).'
    )
  problem = config_rules.choice_problem(
    'optim.grad_clip_mode', get(config, 'optim.grad_clip_mode'), GRAD_CLIP_MODES
  )
  if problem:
    problems['optim.grad_clip_mode'] = problem
  return problems


def eval_problems(config: ml_collections.ConfigDict, *, in_loop_only: bool = False) -> Problems:
  """Each evaluator's (or, ``in_loop_only``, each one with a period): a known type, then its
  type's rules; at most one evaluator per type (their metrics share the ``eval/`` names)."""
  evals = config.get('evals')
  if not isinstance(evals, ml_collections.ConfigDict):
    return {'evals': 'the config has no `evals` section; add it (docs/evaluation.md).'}
  problems, seen = {}, {}
  for name, settings in evals.items():
    kind = settings.get('type')
    problem = config_rules.choice_problem(f'evals.{name}.type', kind, tuple(TYPES))
    if problem:
      problems[f'evals.{name}.type'] = problem
      continue
    if kind in seen:
      problems[f'evals.{name}.type'] = (
        f'evals.{name} and evals.{seen[kind]} are both of type {kind!r}: their metrics would '
        f'share the names eval/*; keep one of them.'
      )
    seen[kind] = name
    if in_loop_only and not settings.get('every_steps'):
      continue
    problems.update(TYPES[kind].problems(name, settings, config))
  return problems


# ----------------------------------------------------------------------------- the parts


def _range_problems(config: ml_collections.ConfigDict) -> Problems:
  return config_rules.range_problems(config, _RANGES, config_defaults.get_config())


def _choice_problems(config: ml_collections.ConfigDict) -> Problems:
  """Enumerated fields set to none of their choices."""
  problems = {}
  for field, choices in _CHOICES:
    problem = config_rules.choice_problem(field, get(config, field), choices)
    if problem:
      problems[field] = problem
  return problems


def _sample_problems(config: ml_collections.ConfigDict) -> Problems:
  """A sampler step count outside 2..T (respacing keeps the first and the last step)."""
  steps, total = get(config, 'sample.num_steps'), get(config, 'diffusion.num_diffusion_timesteps')
  if not (is_int(steps) and is_int(total)) or 2 <= steps <= total:
    return {}
  fix = f'set --config.sample.num_steps=N, e.g. {min(50, total)}, or None for all steps.'
  return {'sample.num_steps': f'sample.num_steps={steps} must be in 2..T={total}; {fix}'}


def _class_problems(config: ml_collections.ConfigDict) -> Problems:
  """Guidance and classes only for a class-conditional model, and classes it has."""
  classes, labels = get(config, 'model.num_classes'), get(config, 'sample.labels')
  guidance = get(config, 'sample.guidance')
  labels = tuple(labels) if isinstance(labels, tuple | list) else labels
  if classes is None:
    if guidance or labels:
      return {
        'sample.guidance' if guidance else 'sample.labels': (
          f'sample.guidance={guidance!r} and sample.labels={labels!r} are for a class-conditional '
          'model, but model.num_classes is None; set --config.model.num_classes (e.g. 10) to '
          'train one, or leave both at 0 and ().'
        )
      }
    return {}
  if not isinstance(labels, tuple) or not all(is_int(c) and 0 <= c < classes for c in labels):
    return {
      'sample.labels': f'sample.labels={labels!r} must list classes in 0..{classes - 1} (or be '
      f'() for all classes evenly); set e.g. --config.sample.labels=(3,).'
    }
  return {}


def _beta_problems(config: ml_collections.ConfigDict) -> Problems:
  """beta_start and beta_end outside 0 < beta_start <= beta_end <= 1, for schedules using them."""
  schedule = get(config, 'diffusion.beta_schedule')
  used = _SCHEDULE_BETAS.get(schedule, ()) if isinstance(schedule, str) else ()
  values = [config.diffusion[name] for name in used]
  numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
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
  """The U-Net's own rules (``models.problems``) against the config's images."""
  m = config.model
  size = get(config, 'dataset.image_size')
  return models.problems(
    ch=m.get('ch'),
    ch_mult=m.get('ch_mult'),
    num_res_blocks=m.get('num_res_blocks'),
    attn_resolutions=m.get('attn_resolutions'),
    dropout=m.get('dropout'),
    dtype=m.get('dtype'),
    num_classes=m.get('num_classes'),
    image_size=size if is_int(size) else None,
    prefix='model.',
    set_prefix='--config.model.',
  )


def _dataset_problems(config: ml_collections.ConfigDict) -> Problems:
  """A data set name TFDS does not know (a registered builder, or one prepared in the data dir)."""
  name = get(config, 'dataset.name')
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
