"""Entry point: ``python -m diffusion_jax.main --config=configs/cifar10.py --workdir=DIR``."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from diffusion_jax import evaluate, runtime, sampling, train  # noqa: E402
from diffusion_jax.errors import SetupError  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and samples go (may be gs://).')
flags.DEFINE_enum(
  'mode',
  'train',
  ['train', 'sample', 'eval'],
  "train: train or resume; sample: samples from the latest checkpoint's EMA params; eval: FID/IS "
  '(or the digits metric) and bits/dim of the latest checkpoint.',
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
jax.config.config_with_absl()  # --jax_platforms, --jax_compilation_cache_dir (may be gs://), ...
config_flags.DEFINE_config_file(
  'config', None, 'A config file of configs/ (optionally file.py:variant).', lock_config=True
)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  tf.config.set_visible_devices([], 'GPU')  # TF only feeds data; keep accelerators for JAX.
  config = FLAGS.config
  try:
    runtime.start(
      num_cpu_devices=config.num_cpu_devices,
      distributed=FLAGS.distributed,
      coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id,
    )
    if FLAGS.mode == 'train':
      train.train_and_evaluate(config, FLAGS.workdir)
    elif FLAGS.mode == 'sample':
      sampling.sample_from_checkpoint(config, FLAGS.workdir, num_samples=FLAGS.num_samples)
    else:
      config_name = config_flags.get_config_filename(FLAGS['config'])
      evaluate.evaluate_checkpoint(config, FLAGS.workdir, config_name=config_name)
  except SetupError as e:
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  app.run(main)
