"""Evaluation end to end on 8 CPU devices: --mode=eval of a checkpoint (report, each evaluator's
files, TensorBoard scalars, the eval keys), the in-loop evaluators, evaluator types plugged in by
config, and clear set-up errors."""

import io
import json
import pathlib
import re
import shutil
import types
import zlib

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from diffusion_jax import evaluate, images, rngs, sampling, train_state, validation
from diffusion_jax.errors import SetupError
from diffusion_jax.evaluators import base, bound, registry
from diffusion_jax.run import Run

from conftest import load_config


@pytest.fixture(scope='module')
def checkpointed_run(data_dir, tmp_path_factory):
  """configs/digits.py:tiny and a workdir holding its initial train state saved as step 7."""
  config = load_config('digits.py:tiny', data_dir)
  run = Run.create(config, tmp_path_factory.mktemp('run'))
  state = run.initial_state()
  manager = train_state.checkpoint_manager(run.workdir)
  train_state.save(manager, state.replace(step=jnp.asarray(7, jnp.int32)), force=True)
  manager.wait_until_finished()
  manager.close()
  return run, state


def event_scalars(workdir: pathlib.Path) -> dict[str, float]:
  """Every scalar in the TensorBoard event files of ``workdir``, by tag."""
  scalars = {}
  for path in workdir.glob('events.out.tfevents.*'):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        scalars[value.tag] = float(tf.make_ndarray(value.tensor))
  return scalars


def test_evaluate_checkpoint_writes_the_report_and_each_evaluators_files(checkpointed_run):
  run, state = checkpointed_run
  report = evaluate.evaluate_checkpoint(run, config_name='configs/digits.py:tiny')
  out = run.workdir / 'eval' / 'step_7'
  assert json.loads((out / 'report.json').read_text()) == report
  assert {k: report[k] for k in ('config', 'dataset', 'step', 'sampler')} == {
    'config': 'configs/digits.py:tiny',
    'dataset': 'sklearn_digits',
    'step': 7,
    'sampler': {
      'method': 'ancestral',
      'num_steps': None,
      'eta': 0.0,
      'clip_denoised': True,
      'guidance': 0.0,
      'labels': [],
    },
  }
  digits, bpd = report['evals']['digits'], report['evals']['bpd']
  assert {k: digits[k] for k in ('num_samples', 'reference_split', 'reference_count')} == {
    'num_samples': 20,
    'reference_split': 'train',
    'reference_count': 1497,
  }
  assert (bpd['split'], bpd['num_examples'], bpd['settings']['type']) == ('test[:16]', 16, 'bound')
  metrics = report['metrics']
  assert metrics == digits['metrics'] | bpd['metrics']
  for name in ('digits_fd', 'digits_confident_fraction', 'bpd', 'bpd_prior', 'bpd_decoder'):
    assert np.isfinite(metrics[name]), name
  assert len(digits['digits_class_histogram']) == 10 and metrics['bpd'] > 0
  np.testing.assert_allclose(sum(digits['digits_class_histogram']), 1.0)

  # The same numbers and files as the evaluators on the saved EMA params, with their own keys.
  evaluators = evaluate.build(run, in_loop=False)
  results = {
    n: ev(state.ema_params, evaluate.evaluator_key(run, n)) for n, ev in evaluators.items()
  }
  chex.assert_trees_all_close(metrics, results['digits'].scalars | results['bpd'].scalars)
  for name, result in results.items():
    for file, data in result.files.items():
      assert (out / name / file).read_bytes() == data, (name, file)
  assert sorted(p.name for p in out.iterdir()) == ['bpd', 'digits', 'report.json']
  terms = np.genfromtxt(out / 'bpd' / 'nll_terms.csv', delimiter=',', names=True)
  assert len(terms) == run.config.diffusion.num_diffusion_timesteps
  np.testing.assert_allclose(
    terms['term_bpd'].sum() + metrics['bpd_prior'], metrics['bpd'], rtol=1e-5
  )

  # digits/samples.png: the first chunk (16 of the 20 samples), drawn from the evaluator's key:
  # the eval stream's key with the evaluator's name folded in.
  eval_key = jax.random.fold_in(jax.random.PRNGKey(0), zlib.crc32(b'eval'))
  np.testing.assert_array_equal(eval_key, rngs.key(run.config.seed, 'eval'))
  key = jax.random.fold_in(eval_key, zlib.crc32(b'digits'))
  first = sampling.gather_images(
    run.sample_fn(16)(state.ema_params, jax.random.fold_in(key, 0), 0), 16
  )
  png = np.asarray(Image.open(io.BytesIO((out / 'digits' / 'samples.png').read_bytes())))
  grid = images.image_grid(first)[..., 0]
  scale = png.shape[0] // grid.shape[0]
  assert png.shape == (grid.shape[0] * scale, grid.shape[1] * scale) and scale > 1
  np.testing.assert_array_equal(png[::scale, ::scale], grid)

  scalars = event_scalars(run.workdir)
  assert set(scalars) == {f'eval/{k}' for k in metrics}
  np.testing.assert_allclose(scalars['eval/bpd'], metrics['bpd'], rtol=1e-6)
  np.testing.assert_allclose(scalars['eval/digits_fd'], metrics['digits_fd'], rtol=1e-6)


def test_in_loop_evaluators_are_those_with_a_period_and_repeat_their_noise(checkpointed_run):
  run, state = checkpointed_run
  config = run.config.copy_and_resolve_references()
  config.evals.digits.every_steps = 2
  config.evals.bpd.every_steps = 4
  looped = Run.create(config, run.workdir)
  evaluators = evaluate.build(looped, in_loop=True)
  assert set(evaluators) == {'digits', 'bpd'}
  digits = evaluators['digits'](state.ema_params, evaluate.evaluator_key(looped, 'digits'))
  assert digits.files == {}  # no grid in the loop: scalars only
  assert set(digits.scalars) == {
    'digits_fd',
    'digits_confident_fraction',
    'digits_min_class_fraction',
    'digits_max_class_fraction',
  }
  assert digits.details['num_samples'] == config.evals.digits.in_loop_num_samples
  again = evaluators['digits'](state.ema_params, evaluate.evaluator_key(looped, 'digits'))
  assert again.scalars == digits.scalars  # same key, same samples, at any step
  config.evals.bpd.every_steps = 0
  assert set(evaluate.build(Run.create(config, run.workdir), in_loop=True)) == {'digits'}


class CountEvaluator:
  """A minimal evaluator type, as a user would add one: the number of parameters, and a file."""

  LABELS = {'num_params': 'parameters'}

  @staticmethod
  def problems(name, settings, config):
    del config
    return {} if settings.every_steps >= 0 else {f'evals.{name}.every_steps': 'negative'}

  @staticmethod
  def create(name, settings, run, *, in_loop):
    def evaluator(params, rng):
      count = sum(leaf.size for leaf in jax.tree.leaves(params))
      return base.Result({'num_params': float(count)}, {'name': name}, {'count.txt': b'%d' % count})

    return evaluator


def test_a_new_evaluator_type_is_one_module_and_one_registry_line(
  checkpointed_run, tmp_path, monkeypatch
):
  run, _ = checkpointed_run
  monkeypatch.setitem(registry.TYPES, 'count', CountEvaluator)
  config = run.config.copy_and_resolve_references()
  config.evals.size = ml_collections.ConfigDict({'type': 'count', 'every_steps': 2})
  validation.validate(config, mode='eval')
  workdir = tmp_path / 'run'
  shutil.copytree(run.workdir / 'checkpoints', workdir / 'checkpoints')
  report = evaluate.evaluate_checkpoint(Run.create(config, workdir))
  assert report['metrics']['num_params'] == sum(
    leaf.size for leaf in jax.tree.leaves(run.abstract_state().params)
  )
  assert report['evals']['size']['name'] == 'size'
  assert (workdir / 'eval' / 'step_7' / 'size' / 'count.txt').exists()
  assert 'parameters' in evaluate.describe({'eval/num_params': 1.0})
  config.evals.size.type = 'counts'
  with pytest.raises(SetupError, match="evals.size.type='counts' is not one of .*count"):
    validation.validate(config, mode='eval')


def test_missing_checkpoint_is_a_clear_error(tiny_config, tmp_path):
  with pytest.raises(SetupError, match='No checkpoints in .*--mode=train'):
    evaluate.evaluate_checkpoint(Run.create(tiny_config, tmp_path))
  (tmp_path / 'checkpoints').mkdir()
  with pytest.raises(SetupError, match='No complete checkpoint'):
    evaluate.evaluate_checkpoint(Run.create(tiny_config, tmp_path))


def test_inception_without_weights_names_the_field_and_the_conversion(tiny_config, tmp_path):
  config = tiny_config
  config.evals.fid = load_config('cifar10.py').evals.fid
  del config.evals['digits']
  with pytest.raises(
    SetupError,
    match=r'evals\.fid\.inception_path(.|\n)*python -m diffusion_jax\.fid --pytorch_fid_weights=',
  ):
    validation.validate(config, mode='eval')
  config.evals.fid.inception_path = str(tmp_path / 'missing.npz')
  with pytest.raises(SetupError, match=r'evals\.fid\.inception_path(.|\n)*diffusion_jax\.fid'):
    evaluate.build(Run.create(config, tmp_path), in_loop=False)


def test_a_data_set_without_held_out_split_needs_a_split_for_the_bound(tiny_config):
  """As for CelebA-HQ (train only): the bound names the missing split and the fix."""
  tiny_config.dataset.eval_split = None
  with pytest.raises(SetupError, match=r'no held-out split.*--config\.evals\.bpd\.split'):
    validation.validate(tiny_config, mode='eval')
  del tiny_config.evals['bpd']
  validation.validate(tiny_config, mode='eval')


@pytest.mark.parametrize(
  'evaluator,field,split',
  [('bpd', 'split', 'validation'), ('digits', 'reference_split', 'train[2000:]')],
)
def test_a_split_the_data_set_lacks_fails_before_restoring(
  checkpointed_run, monkeypatch, evaluator, field, split
):
  run, _ = checkpointed_run
  config = run.config.copy_and_resolve_references()
  config.evals[evaluator][field] = split

  def no_restore(*args, **kwargs):
    raise AssertionError('restored a checkpoint (and would sample) before checking the splits')

  monkeypatch.setattr(Run, 'restore_latest', no_restore)
  with pytest.raises(
    SetupError, match=rf"evals.{evaluator}.{field}='{re.escape(split)}(\[:16\])?' is not a split"
  ):
    evaluate.evaluate_checkpoint(Run.create(config, run.workdir))


@pytest.mark.parametrize(
  'config_file,split',
  [
    ('lsun_bedroom.py', 'validation'),
    ('lsun_church.py', 'validation'),
    ('lsun_cat.py', None),
    ('celebahq.py', None),
    ('cifar10.py', 'test'),
  ],
)
def test_paper_configs_take_the_bound_on_a_split_their_data_set_has(config_file, split):
  """LSUN scenes have train and validation; LSUN cat and CelebA-HQ only train (no bound, as the
  paper reports none); CIFAR10 test."""
  config = load_config(config_file)
  bounds = [settings for settings in config.evals.values() if settings.type == 'bound']
  assert [bound.split_of(b, config) for b in bounds] == ([split] if split else [])


def test_the_old_eval_section_still_works_with_a_deprecation_line(tiny_config, caplog):
  from diffusion_jax import config_compat

  config = tiny_config
  config.eval.every_steps = 4
  config.eval.num_samples = 40
  config.eval.nll_num_examples = 8
  config.train.clip_denoised = False
  lines = config_compat.translate(config)
  assert len(lines) == 2 and 'sample.clip_denoised' in lines[0] and 'config.eval' in lines[1]
  assert '--config.evals.digits.every_steps=4' in lines[1]
  assert (config.evals.digits.every_steps, config.evals.digits.num_samples) == (4, 40)
  assert (config.evals.bpd.every_steps, config.evals.bpd.num_examples) == (4, 8)
  assert config.sample.clip_denoised is False and config.train.clip_denoised is None
  assert all(config.eval[name] is None for name in config.eval)
  assert config_compat.translate(config) == []  # moved once
  config.eval.metrics = 'inception'
  config.eval.inception_path = 'w.npz'
  (line,) = config_compat.translate(config)
  assert set(config.evals) == {'fid', 'bpd'} and config.evals.fid.inception_path == 'w.npz'


def test_every_evaluator_type_is_a_module_with_labels_rules_and_a_builder():
  for name, kind in registry.TYPES.items():
    assert isinstance(kind, types.ModuleType) and kind.__name__.endswith(name), name
    assert kind.LABELS and callable(kind.problems) and callable(kind.create), name
  labels = [label for kind in registry.TYPES.values() for label in kind.LABELS]
  assert len(labels) == len(set(labels))  # the metric names are unique across types
