"""Checks of a config against what a run can do, before anything heavy is built."""

import jax
import ml_collections
import tensorflow_datasets as tfds

from diffusion_jax import fid
from diffusion_jax.datasets import sklearn_digits
from diffusion_jax.errors import SetupError
from diffusion_jax.evaluators import inception

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


def check_train(config: ml_collections.ConfigDict) -> None:
  """SetupErrors for train settings the loop cannot run on this many devices."""
  k = config.train.steps_per_call
  if k < 1:
    raise SetupError(f'train.steps_per_call must be >= 1, got {k}.')
  periods = {
    f'train.{name}': config.train[name]
    for name in (
      'num_train_steps',
      'checkpoint_every_steps',
      'log_every_steps',
      'sample_every_steps',
    )
  }
  periods['eval.every_steps'] = config.eval.every_steps
  for name, value in periods.items():
    if value % k:
      raise SetupError(f'{name}={value} must be a multiple of train.steps_per_call={k}.')
  if config.train.batch_size % jax.device_count():
    raise SetupError(
      f'train.batch_size={config.train.batch_size} must be divisible by the '
      f'{jax.device_count()} devices; change --config.train.batch_size.'
    )
  if config.optim.grad_clip_mode not in GRAD_CLIP_MODES:
    raise SetupError(
      f'Unknown optim.grad_clip_mode {config.optim.grad_clip_mode!r}; choose one of '
      f'{GRAD_CLIP_MODES}.'
    )


def check_eval(config: ml_collections.ConfigDict) -> None:
  """SetupErrors for eval settings that cannot run."""
  if 'eval' not in config:
    raise SetupError(
      'The config has no `eval` section; add the eval.* fields of '
      'diffusion_jax/config_defaults.py (see docs/evaluation.md).'
    )
  ev = config.eval
  if ev.metrics not in EVAL_METRICS:
    raise SetupError(f'Unknown eval.metrics {ev.metrics!r}; choose one of {EVAL_METRICS}.')
  digits_name = sklearn_digits.SklearnDigits.name
  if ev.metrics == 'digits' and config.dataset.name.split(':')[0] != digits_name:
    raise SetupError(
      f'eval.metrics="digits" scores only {digits_name!r}, but dataset.name is '
      f'{config.dataset.name!r}; use eval.metrics="inception".'
    )
  if ev.metrics == 'inception' and not ev.inception_path:
    raise SetupError(
      _INCEPTION_HELP.format(name=fid.PYTORCH_FID_WEIGHTS, url=fid.PYTORCH_FID_WEIGHTS_URL)
    )
  minimum = MIN_EVAL_SAMPLES[ev.metrics]
  for name in ('num_samples', 'in_loop_num_samples'):
    if ev[name] < minimum:
      raise SetupError(
        f'eval.{name}={ev[name]} is too small: {ev.metrics} metrics need at least {minimum} '
        'samples.'
      )
  if ev.batch_size < 1:
    raise SetupError(f'eval.batch_size must be >= 1, got {ev.batch_size}.')
  for name in ('nll_num_examples', 'reference_num_examples'):
    if ev[name] is not None and ev[name] < 1:
      raise SetupError(f'eval.{name} must be None (the whole split) or >= 1, got {ev[name]}.')


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
