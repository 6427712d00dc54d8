"""Evaluation on 8 CPU devices: the sharded bound against its closed form and against the unsharded
one, padding, the CSV and plot, the digits and Inception sample metrics, and --mode=eval end to end."""

import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax.traverse_util import unflatten_dict
from gaussian_reference import MU, S, expected_bound_bits, optimal_eps_fn

from configs import digits
from diffusion_jax import diffusion, evaluate, fid, input_pipeline, sampling, train

BETAS = diffusion.get_beta_schedule(
  'linear', beta_start=1e-4, beta_end=0.02, num_diffusion_timesteps=1000
)
NUM_EXAMPLES, DIM = 240, 16
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


@pytest.fixture(scope='module')
def mesh():
  return sampling.make_mesh()


# ----------------------------------------------------------------------------- bits/dim, Gaussian data


@pytest.fixture(scope='module')
def gaussian():
  """The fixedsmall process, the analytic-optimal ε-model and 8-bit N(0.2, 0.3²) data [240, 16]."""
  d = diffusion.GaussianDiffusion(BETAS, 'eps', 'fixedsmall', 'mse')
  eps_fn = optimal_eps_fn(np.cumprod(1 - BETAS))
  x0 = np.random.default_rng(7).normal(MU, S, (NUM_EXAMPLES, DIM))
  x0 = (np.clip(np.round((x0 + 1) * 127.5), 0, 255) / 127.5 - 1).astype(np.float32)
  return d, (lambda params, x, t: eps_fn(x, t)), x0


def batched(x: np.ndarray, batch_size: int) -> list[dict[str, np.ndarray]]:
  """Batches of `batch_size` rows; the last one padded with NaN rows of mask 0."""
  batches = []
  for start in range(0, len(x), batch_size):
    rows = x[start : start + batch_size]
    pad = batch_size - len(rows)
    batches.append(
      {
        'image': np.concatenate([rows, np.full((pad, *x.shape[1:]), np.nan, x.dtype)]),
        'mask': np.concatenate([np.ones(len(rows)), np.zeros(pad)]).astype(np.float32),
      }
    )
  return batches


@pytest.fixture(scope='module')
def padded_run(gaussian, mesh):
  """bpd_fn, per-example bounds and the NllResult of 240 examples in 2 batches of 128 (16 padded)."""
  d, apply_fn, x0 = gaussian
  bpd_fn = evaluate.make_bpd_fn(apply_fn, d, mesh, clip_denoised=False)
  rng = jax.random.PRNGKey(8)
  batches = batched(x0, 128)
  per_example = np.concatenate(
    [
      np.asarray(bpd_fn(None, jnp.asarray(b['image']), jnp.asarray(b['mask']), 128 * i, rng)[0])
      for i, b in enumerate(batches)
    ]
  )
  result = evaluate.nll_bits_per_dim(bpd_fn, None, batches, mesh, rng)
  return per_example[:NUM_EXAMPLES], result, rng


def test_sharded_bound_is_the_unsharded_one_and_matches_the_closed_form(gaussian, padded_run):
  d, _, x0 = gaussian
  per_example, result, rng = padded_run
  eps_fn = optimal_eps_fn(np.cumprod(1 - BETAS))
  unsharded = jax.jit(
    lambda x, key: d.calc_bpd_loop(eps_fn, x, key, clip_denoised=False)['total_bpd']
  )
  for i in (0, 17, 100, 130, 239):  # several devices of both batches
    np.testing.assert_allclose(
      per_example[i], unsharded(x0[i : i + 1], jax.random.fold_in(rng, i))[0], rtol=1e-5
    )
  assert result.num_examples == NUM_EXAMPLES
  np.testing.assert_allclose(result.total_bpd, per_example.mean(), rtol=1e-5)
  se = per_example.std() / math.sqrt(NUM_EXAMPLES)
  assert abs(result.total_bpd - expected_bound_bits(BETAS, MU, S)) < 4 * se + 0.01


def test_masked_padding_does_not_change_the_average(gaussian, padded_run, mesh):
  d, apply_fn, x0 = gaussian
  _, padded, rng = padded_run
  bpd_fn = evaluate.make_bpd_fn(apply_fn, d, mesh, clip_denoised=False)
  unpadded = evaluate.nll_bits_per_dim(
    bpd_fn, None, batched(x0, 120), mesh, rng
  )  # same example ids
  assert unpadded.num_examples == padded.num_examples == NUM_EXAMPLES
  np.testing.assert_allclose(padded.total_bpd, unpadded.total_bpd, rtol=1e-5)
  np.testing.assert_allclose(padded.prior_bpd, unpadded.prior_bpd, rtol=1e-5)
  np.testing.assert_allclose(padded.terms_bpd, unpadded.terms_bpd, rtol=1e-4, atol=1e-7)


def test_csv_rows_sum_to_the_total_and_plot_is_a_png(padded_run, tmp_path):
  _, result, _ = padded_run
  evaluate.write_nll_csv(tmp_path / 'nll.csv', result)
  evaluate.plot_nll(tmp_path / 'nll.png', result)
  assert (tmp_path / 'nll.csv').read_text().splitlines()[0] == (
    't,term_bpd,cumulative_rate_bpd,distortion_rmse'
  )
  table = np.genfromtxt(tmp_path / 'nll.csv', delimiter=',', names=True)
  assert len(table) == len(BETAS)
  np.testing.assert_array_equal(table['t'], np.arange(len(BETAS)))
  np.testing.assert_allclose(
    table['term_bpd'].sum() + result.prior_bpd, result.total_bpd, rtol=1e-6
  )
  np.testing.assert_allclose(table['cumulative_rate_bpd'][0], result.total_bpd, rtol=1e-6)
  assert table['distortion_rmse'][0] == 0 and np.all(np.diff(table['cumulative_rate_bpd']) <= 1e-6)
  assert (tmp_path / 'nll.png').read_bytes()[:8] == PNG_MAGIC


# ----------------------------------------------------------------------------- a tiny digits model


def eval_section(**overrides) -> ml_collections.ConfigDict:
  """The eval.* fields of configs/default.py at test sizes."""
  section = ml_collections.ConfigDict(
    dict(
      metrics='digits',
      num_samples=20,
      batch_size=16,
      every_steps=0,
      in_loop_num_samples=16,
      inception_path=None,
      reference_split='train',
      reference_dir=None,
      nll_split='test',
      nll_num_examples=16,
    )
  )
  section.update(overrides)
  return section


def tiny_config(data_dir: str, **eval_overrides) -> ml_collections.ConfigDict:
  """configs/digits.py with a one-level U-Net and 10 diffusion steps."""
  config = digits.get_config()
  config.dataset.data_dir = data_dir
  config.model.update(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=())
  config.diffusion.num_diffusion_timesteps = 10
  config.eval = eval_section(**eval_overrides)
  return config


@pytest.fixture(scope='module')
def checkpointed_run(data_dir, mesh, tmp_path_factory):
  """A workdir holding a freshly initialized train state saved as step 7."""
  config = tiny_config(data_dir)
  workdir = tmp_path_factory.mktemp('run')
  model = train.create_model(config)
  state = train.init_train_state(config, model, train.create_optimizer(config), mesh)
  manager = train.checkpoint_manager(workdir, config)
  manager.save(7, args=ocp.args.StandardSave(state.replace(step=jnp.asarray(7, jnp.int32))))
  manager.wait_until_finished()
  manager.close()
  return config, workdir, state


def test_evaluate_checkpoint_writes_the_digits_report(checkpointed_run):
  config, workdir, _ = checkpointed_run
  report = evaluate.evaluate_checkpoint(config, str(workdir), config_name='configs/digits.py')
  out = workdir / 'eval' / 'step_7'
  assert json.loads((out / 'report.json').read_text()) == report
  assert (
    report['step'] == 7 and report['num_samples'] == 20 and report['config'] == 'configs/digits.py'
  )
  assert (report['reference_split'], report['reference_count']) == ('train', 1497)
  assert (report['nll_split'], report['nll_num_examples']) == ('test[:16]', 16)
  metrics = report['metrics']
  for name in ('digits_fd', 'digits_confident_fraction', 'bpd', 'bpd_prior', 'bpd_decoder'):
    assert np.isfinite(metrics[name]), name
  assert len(metrics['digits_class_histogram']) == 10 and metrics['bpd'] > 0
  terms = np.genfromtxt(out / 'nll_terms.csv', delimiter=',', names=True)
  assert len(terms) == config.diffusion.num_diffusion_timesteps
  np.testing.assert_allclose(
    terms['term_bpd'].sum() + metrics['bpd_prior'], metrics['bpd'], rtol=1e-5
  )
  for png in ('samples.png', 'nll_terms.png'):
    assert (out / png).read_bytes()[:8] == PNG_MAGIC
  assert list(workdir.glob('events.out.tfevents.*'))


def test_in_loop_evaluator_writes_sample_scalars(checkpointed_run, mesh):
  config, workdir, state = checkpointed_run
  config = tiny_config(config.dataset.data_dir, nll_num_examples=None)
  model = train.create_model(config)
  diffusion_process = diffusion.GaussianDiffusion.from_config(config.diffusion)
  evaluate_fn = evaluate.make_in_loop_evaluator(config, workdir, model, diffusion_process, mesh)

  class Recorder:
    def write_scalars(self, step, scalars):
      self.written = (step, scalars)

  writer = Recorder()
  scalars = evaluate_fn(3, state.ema_params, writer)
  assert writer.written == (3, scalars)
  assert {'eval/digits_fd', 'eval/digits_confident_fraction'} <= set(scalars)
  assert not any(name.startswith('eval/bpd') for name in scalars)  # no eval.nll_num_examples


def test_missing_checkpoint_is_a_clear_error(data_dir, tmp_path):
  config = tiny_config(data_dir)
  with pytest.raises(train.SetupError, match='No checkpoints in .*--mode=train'):
    evaluate.evaluate_checkpoint(config, str(tmp_path))
  (tmp_path / 'checkpoints').mkdir()
  with pytest.raises(train.SetupError, match='No complete checkpoint'):
    evaluate.evaluate_checkpoint(config, str(tmp_path))


def test_inception_without_weights_names_the_field_and_the_conversion(data_dir, tmp_path, mesh):
  config = tiny_config(data_dir, metrics='inception')
  with pytest.raises(
    train.SetupError,
    match=r'config\.eval\.inception_path(.|\n)*'
    r'python -m diffusion_jax\.fid --pytorch_fid_weights=',
  ):
    evaluate.evaluate_checkpoint(config, str(tmp_path))
  config.eval.inception_path = str(tmp_path / 'missing.npz')
  with pytest.raises(
    train.SetupError, match=r'config\.eval\.inception_path(.|\n)*diffusion_jax\.fid'
  ):
    evaluate.make_scorer(config, tmp_path, mesh)


# ----------------------------------------------------------------------------- random Inception


@pytest.fixture(scope='module')
def random_inception(tmp_path_factory) -> str:
  """An .npz of random FID Inception weights (He-scaled kernels, identity BatchNorm)."""
  rng = np.random.default_rng(0)
  flat = {}
  for name, shape in fid.param_shapes().items():
    leaf = name.rsplit('/', 1)[1]
    if leaf == 'kernel':
      flat[name] = rng.standard_normal(shape) * math.sqrt(2 / np.prod(shape[:-1]))
    else:
      flat[name] = (np.ones if leaf in ('scale', 'var') else np.zeros)(shape)
  path = tmp_path_factory.mktemp('inception') / 'inception_random.npz'
  fid.save_params(path, unflatten_dict({k: v.astype(np.float32) for k, v in flat.items()}, sep='/'))
  return str(path)


@pytest.mark.filterwarnings('ignore:Matrix is singular')  # 10 samples in 2048 dimensions
def test_inception_metrics_with_cached_reference(
  data_dir, random_inception, mesh, tmp_path, monkeypatch
):
  config = tiny_config(
    data_dir,
    metrics='inception',
    inception_path=random_inception,
    reference_split='test[:8]',
    reference_dir=str(tmp_path / 'stats'),
    num_samples=10,
    batch_size=8,
  )
  model = train.create_model(config)
  state = train.init_train_state(config, model, train.create_optimizer(config), mesh)
  evaluator = evaluate.build_evaluator(
    config,
    tmp_path,
    model,
    diffusion.GaussianDiffusion.from_config(config.diffusion),
    mesh,
    num_samples=10,
    nll_split=None,
  )
  size = config.dataset.image_size
  assert [p.name for p in (tmp_path / 'stats').iterdir()] == [
    f'sklearn_digits_{size}px_test_8_8.npz'
  ]
  assert (evaluator.scorer.reference_split, evaluator.scorer.reference_count) == ('test[:8]', 8)
  metrics = evaluator(state.ema_params).metrics
  assert np.isfinite(metrics['fid']) and metrics['fid'] >= 0
  assert np.isfinite(metrics['is']) and metrics['is'] >= 1

  def no_recompute(*args, **kwargs):
    raise AssertionError('reference statistics recomputed instead of read from the cache')

  monkeypatch.setattr(input_pipeline, 'create_eval_dataset', no_recompute)
  assert evaluate.make_scorer(config, tmp_path, mesh).reference_count == 8
