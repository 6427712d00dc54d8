"""Entry point: ``python -m diffusion_jax.main --config=configs/cifar10.py --workdir=DIR``."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402
import ml_collections  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from diffusion_jax import (  # noqa: E402
  config_compat,
  console,
  draw,
  errors,
  evaluate,
  figures,
  flag_errors,
  preemption,
  runtime,
  train,
  validation,
  workdir_config,
)
from diffusion_jax.errors import DivergedError, SetupError  # noqa: E402
from diffusion_jax.run import Run  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and samples go (may be gs://).')
flags.DEFINE_enum(
  'mode',
  'train',
  ['train', 'sample', 'eval', 'figures'],
  "train: train or resume; sample: samples from the latest checkpoint's EMA params; eval: FID/IS "
  "(or the digits metric) and bits/dim of the latest checkpoint; figures: the paper's Figs. 5-8 "
  'from it, into workdir/figures.',
)
flags.DEFINE_integer('num_samples', 64, 'With --mode=sample: how many samples to draw.')
flags.DEFINE_bool(
  'distributed',
  False,
  'Call jax.distributed.initialize() first (multi-host TPU pod slices detect the arguments '
  'below themselves).',
)
flags.DEFINE_string('coordinator_address', None, 'With --distributed: host:port of process 0.')
flags.DEFINE_integer('num_processes', None, 'With --distributed: how many processes.')
flags.DEFINE_integer('process_id', None, "With --distributed: this process's index.")
flags.DEFINE_bool(
  'allow_config_change',
  False,
  'Run although the config changes the model or the diffusion process of the run in --workdir '
  '(its config.json), e.g. to sample a run with another number of diffusion steps on purpose.',
)
errors.define_debug_flag()
jax.config.config_with_absl()  # --jax_platforms, --jax_compilation_cache_dir (may be gs://), ...
config_flags.DEFINE_config_file(
  'config', None, 'A config file of configs/ (optionally file.py:variant).', lock_config=True
)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if not FLAGS['verbosity'].present:  # the console shows the run; --verbosity=0/1: library logs too
    logging.set_verbosity(logging.WARNING)
  tf.config.set_visible_devices([], 'GPU')  # TF only feeds data; keep accelerators for JAX.
  config = FLAGS.config
  try:
    if len(argv) > 1:
      raise SetupError(f'unexpected arguments {argv[1:]}: settings are --flag=value.')
    runtime.start(
      num_cpu_devices=config.num_cpu_devices,
      distributed=FLAGS.distributed,
      coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id,
    )
    check(config)
    with preemption.watching():
      run_mode(Run.create(config, FLAGS.workdir))
  except (SetupError, DivergedError) as e:
    errors.exit_with(e)


def run_mode(run: Run) -> None:
  """The work of ``--mode``; a preemption notice ends it at the next chunk with exit status 0
  (training: saved; the others: run the command again to do it)."""
  try:
    if FLAGS.mode == 'train':
      state = train.train_and_evaluate(run)
      if int(state.step) < run.config.train.num_train_steps:  # preempted: saved, exit at once
        runtime.exit_now(0)
    elif FLAGS.mode == 'figures':
      figures.make_figures(run)
    elif FLAGS.mode == 'sample':
      draw.sample_from_checkpoint(run, num_samples=FLAGS.num_samples)
    else:
      config_name = config_flags.get_config_filename(FLAGS['config'])
      evaluate.evaluate_checkpoint(run, config_name=config_name)
  except preemption.Preempted:
    console.say(
      'Preempted (SIGTERM) during --mode=%s: stopped; the same command does it again.', FLAGS.mode
    )
    runtime.exit_now(0)


def check(config: ml_collections.ConfigDict) -> None:
  """Every check of the command line before a data set, model or checkpoint is touched: the
  config (its deprecated fields moved first), ``--num_samples``, the workdir and the config of
  the run it holds."""
  config_compat.translate(config)
  validation.validate(config, mode=FLAGS.mode)
  if FLAGS.mode == 'sample' and FLAGS.num_samples < 1:
    raise SetupError(
      f'--num_samples={FLAGS.num_samples} must be >= 1: it is how many samples --mode=sample '
      'draws; pass e.g. --num_samples=64.'
    )
  workdir_config.check_writable(FLAGS.workdir, create=FLAGS.mode == 'train')
  workdir_config.check(config, FLAGS.workdir, allow_change=FLAGS.allow_config_change)


if __name__ == '__main__':
  app.run(main, flags_parser=flag_errors.parse_flags)
