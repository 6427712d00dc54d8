"""Evaluation end to end on 8 CPU devices: --mode=eval of a checkpoint (report, samples, bound
files, TensorBoard scalars, the eval keys), the train loop's evaluator, and clear set-up errors."""

import io
import json
import pathlib
import re
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from diffusion_jax import (
  diffusion,
  evaluate,
  images,
  input_pipeline,
  parallel,
  sampling,
  train_state,
)
from diffusion_jax.errors import SetupError
from diffusion_jax.evaluators import bound

from conftest import load_config


@pytest.fixture(scope='module')
def mesh():
  return parallel.make_mesh()


@pytest.fixture(scope='module')
def checkpointed_run(data_dir, mesh, tmp_path_factory):
  """configs/digits.py:tiny and a workdir holding its initial train state saved as step 7."""
  config = load_config('digits.py:tiny', data_dir)
  workdir = tmp_path_factory.mktemp('run')
  state = train_state.StateFactory.from_config(config).create(mesh)
  manager = train_state.checkpoint_manager(workdir)
  train_state.save(manager, state.replace(step=jnp.asarray(7, jnp.int32)), force=True)
  manager.wait_until_finished()
  manager.close()
  return config, workdir, state


def build(config, workdir, mesh, **kwargs) -> evaluate.Evaluator:
  """``evaluate.build_evaluator`` of ``config``'s model and process."""
  factory = train_state.StateFactory.from_config(config)
  return evaluate.build_evaluator(
    config,
    workdir,
    input_pipeline.get_builder(config.dataset),
    factory.model,
    diffusion.GaussianDiffusion.from_config(config.diffusion),
    mesh,
    image_shape=factory.image_shape,
    **kwargs,
  )


def event_scalars(workdir: pathlib.Path) -> dict[str, float]:
  """Every scalar in the TensorBoard event files of ``workdir``, by tag."""
  scalars = {}
  for path in workdir.glob('events.out.tfevents.*'):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        scalars[value.tag] = float(tf.make_ndarray(value.tensor))
  return scalars


def test_first_examples_cuts_a_split():
  assert evaluate.first_examples('test', None) == 'test'
  assert evaluate.first_examples('train', 50_000) == 'train[:50000]'


def test_evaluate_checkpoint_writes_the_digits_report(checkpointed_run, mesh):
  config, workdir, state = checkpointed_run
  report = evaluate.evaluate_checkpoint(config, str(workdir), config_name='configs/digits.py:tiny')
  out = workdir / 'eval' / 'step_7'
  assert json.loads((out / 'report.json').read_text()) == report
  assert {k: v for k, v in report.items() if k != 'metrics'} == {
    'config': 'configs/digits.py:tiny',
    'dataset': 'sklearn_digits',
    'step': 7,
    'metrics_kind': 'digits',
    'sampler': {'method': 'ancestral', 'num_steps': None, 'eta': 0.0, 'clip_denoised': True},
    'num_samples': 20,
    'reference_split': 'train',
    'reference_count': 1497,
    'nll_split': 'test[:16]',
    'nll_num_examples': 16,
  }
  metrics = report['metrics']
  for name in ('digits_fd', 'digits_confident_fraction', 'bpd', 'bpd_prior', 'bpd_decoder'):
    assert np.isfinite(metrics[name]), name
  assert len(metrics['digits_class_histogram']) == 10 and metrics['bpd'] > 0
  np.testing.assert_allclose(sum(metrics['digits_class_histogram']), 1.0)

  # The same numbers and files as the evaluator on the saved EMA params.
  result = build(config, workdir, mesh, num_samples=20, nll_split='test[:16]')(
    state.ema_params, num_grid=evaluate.NUM_GRID_IMAGES
  )
  chex.assert_trees_all_close(metrics, {**result.metrics, **result.nll.summary()}, rtol=1e-6)
  for name, data in bound.nll_files(result.nll).items():
    assert (out / name).read_bytes() == data, name
  terms = np.genfromtxt(out / 'nll_terms.csv', delimiter=',', names=True)
  assert len(terms) == config.diffusion.num_diffusion_timesteps
  np.testing.assert_allclose(
    terms['term_bpd'].sum() + metrics['bpd_prior'], metrics['bpd'], rtol=1e-5
  )

  # samples.png: the first chunk (16 of the 20 samples), drawn from the eval stream's key.
  sample_fn = sampling.make_sample_fn(
    train_state.StateFactory.from_config(config).model,
    diffusion.GaussianDiffusion.from_config(config.diffusion),
    mesh,
    image_shape=(8, 8, 1),
    num_samples=16,
  )
  eval_key = jax.random.PRNGKey(config.seed + 3)
  first = sampling.gather_images(
    sample_fn(state.ema_params, jax.random.fold_in(jax.random.fold_in(eval_key, 0), 0)), 16
  )
  np.testing.assert_array_equal(result.grid, first)
  png = np.asarray(Image.open(io.BytesIO((out / 'samples.png').read_bytes())))
  grid = images.image_grid(first)[..., 0]
  scale = png.shape[0] // grid.shape[0]
  assert png.shape == (grid.shape[0] * scale, grid.shape[1] * scale) and scale > 1
  np.testing.assert_array_equal(png[::scale, ::scale], grid)

  scalars = event_scalars(workdir)
  assert set(scalars) == set(result.scalars())
  np.testing.assert_allclose(scalars['eval/bpd'], metrics['bpd'], rtol=1e-6)
  np.testing.assert_allclose(scalars['eval/digits_fd'], metrics['digits_fd'], rtol=1e-6)


@pytest.mark.parametrize('nll_num_examples', [None, 16])
def test_in_loop_evaluator_writes_the_same_scalars_at_every_step(
  checkpointed_run, mesh, nll_num_examples
):
  config, workdir, state = checkpointed_run
  config = load_config('digits.py:tiny', config.dataset.data_dir)
  config.eval.nll_num_examples = nll_num_examples
  factory = train_state.StateFactory.from_config(config)
  evaluate_fn = evaluate.make_in_loop_evaluator(
    config,
    workdir,
    input_pipeline.get_builder(config.dataset),
    factory.model,
    diffusion.GaussianDiffusion.from_config(config.diffusion),
    mesh,
  )

  class Recorder:
    def __init__(self):
      self.written = []

    def write_scalars(self, step, scalars):
      self.written.append((step, scalars))

  writer = Recorder()
  scalars = evaluate_fn(3, state.ema_params, writer)
  assert writer.written == [(3, scalars)]
  expected = {
    'eval/digits_fd',
    'eval/digits_confident_fraction',
    'eval/digits_min_class_fraction',
    'eval/digits_max_class_fraction',
  }
  if nll_num_examples:
    expected |= {'eval/bpd', 'eval/bpd_prior', 'eval/bpd_decoder'}
  assert set(scalars) == expected  # no histogram: it is not a scalar
  chex.assert_trees_all_equal(evaluate_fn(5, state.ema_params, writer), scalars)  # same noise


def test_missing_checkpoint_is_a_clear_error(tiny_config, tmp_path):
  with pytest.raises(SetupError, match='No checkpoints in .*--mode=train'):
    evaluate.evaluate_checkpoint(tiny_config, str(tmp_path))
  (tmp_path / 'checkpoints').mkdir()
  with pytest.raises(SetupError, match='No complete checkpoint'):
    evaluate.evaluate_checkpoint(tiny_config, str(tmp_path))


def test_inception_without_weights_names_the_field_and_the_conversion(tiny_config, tmp_path, mesh):
  config = tiny_config
  config.eval.metrics = 'inception'
  with pytest.raises(
    SetupError,
    match=r'config\.eval\.inception_path(.|\n)*python -m diffusion_jax\.fid --pytorch_fid_weights=',
  ):
    evaluate.evaluate_checkpoint(config, str(tmp_path))
  config.eval.inception_path = str(tmp_path / 'missing.npz')
  with pytest.raises(SetupError, match=r'config\.eval\.inception_path(.|\n)*diffusion_jax\.fid'):
    evaluate.make_score_fn(
      config,
      tmp_path,
      input_pipeline.get_builder(config.dataset),
      mesh,
      reference_split='train',
      batch_size=16,
    )


def test_a_data_set_without_held_out_split_evaluates_samples_and_says_why_no_bound(
  checkpointed_run, tmp_path
):
  """As for CelebA-HQ (train only): no bits/dim, and the report says why."""
  config, workdir, _ = checkpointed_run
  config = config.copy_and_resolve_references()
  config.dataset.eval_split = None
  run = tmp_path / 'run'
  (run / 'checkpoints').mkdir(parents=True)
  for step in (workdir / 'checkpoints').iterdir():
    if step.name.isdigit():
      shutil.copytree(step, run / 'checkpoints' / step.name)
  report = evaluate.evaluate_checkpoint(config, str(run))
  assert report['nll_split'] is None and 'no held-out split' in report['nll_skipped']
  assert 'bpd' not in report['metrics'] and 'digits_fd' in report['metrics']
  assert sorted(p.name for p in (run / 'eval' / 'step_7').iterdir()) == [
    'report.json',
    'samples.png',
  ]


@pytest.mark.parametrize(
  'field,split', [('nll_split', 'validation'), ('reference_split', 'train[2000:]')]
)
def test_a_split_the_data_set_lacks_fails_before_sampling(
  checkpointed_run, monkeypatch, field, split
):
  config, workdir, _ = checkpointed_run
  config = config.copy_and_resolve_references()
  config.eval[field] = split

  def no_restore(*args, **kwargs):
    raise AssertionError('restored a checkpoint (and would sample) before checking the splits')

  monkeypatch.setattr(sampling, 'restore_inference', no_restore)
  with pytest.raises(
    SetupError, match=rf"eval.{field}='{re.escape(split)}(\[:16\])?' is not a split"
  ):
    evaluate.evaluate_checkpoint(config, str(workdir))


@pytest.mark.parametrize(
  'config_file,eval_split',
  [
    ('lsun_bedroom.py', 'validation'),
    ('lsun_church.py', 'validation'),
    ('lsun_cat.py', None),
    ('celebahq.py', None),
    ('cifar10.py', 'test'),
  ],
)
def test_paper_configs_take_the_bound_on_a_split_their_data_set_has(config_file, eval_split):
  """LSUN scenes have train and validation; LSUN cat and CelebA-HQ only train; CIFAR10 test."""
  assert evaluate.bound_split(load_config(config_file)) == eval_split
