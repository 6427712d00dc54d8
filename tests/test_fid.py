"""Tests of the FID Inception-v3, its pytorch-fid weight converter and the FID / IS statistics
(``feature_metrics``, re-exported by ``fid``)."""

import os
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from etils import epath
from flax.traverse_util import flatten_dict

from diffusion_jax import feature_metrics, fid

# pytorch-fid's FID Inception: 94 BasicConv2d (conv.weight + 4 BatchNorm tensors each) and fc.
NUM_PYTORCH_FID_TENSORS = 472


def _torchvision_convs() -> list[tuple[str, int, int, int, int]]:
  """(name, in, out, kh, kw) of every BasicConv2d of torchvision's Inception3 without AuxLogits."""
  convs = [
    ('Conv2d_1a_3x3', 3, 32, 3, 3),
    ('Conv2d_2a_3x3', 32, 32, 3, 3),
    ('Conv2d_2b_3x3', 32, 64, 3, 3),
    ('Conv2d_3b_1x1', 64, 80, 1, 1),
    ('Conv2d_4a_3x3', 80, 192, 3, 3),
  ]
  for name, cin, pool in (('Mixed_5b', 192, 32), ('Mixed_5c', 256, 64), ('Mixed_5d', 288, 64)):
    convs += [
      (f'{name}.branch1x1', cin, 64, 1, 1),
      (f'{name}.branch5x5_1', cin, 48, 1, 1),
      (f'{name}.branch5x5_2', 48, 64, 5, 5),
      (f'{name}.branch3x3dbl_1', cin, 64, 1, 1),
      (f'{name}.branch3x3dbl_2', 64, 96, 3, 3),
      (f'{name}.branch3x3dbl_3', 96, 96, 3, 3),
      (f'{name}.branch_pool', cin, pool, 1, 1),
    ]
  convs += [
    ('Mixed_6a.branch3x3', 288, 384, 3, 3),
    ('Mixed_6a.branch3x3dbl_1', 288, 64, 1, 1),
    ('Mixed_6a.branch3x3dbl_2', 64, 96, 3, 3),
    ('Mixed_6a.branch3x3dbl_3', 96, 96, 3, 3),
  ]
  for name, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
    convs += [
      (f'{name}.branch1x1', 768, 192, 1, 1),
      (f'{name}.branch7x7_1', 768, c7, 1, 1),
      (f'{name}.branch7x7_2', c7, c7, 1, 7),
      (f'{name}.branch7x7_3', c7, 192, 7, 1),
      (f'{name}.branch7x7dbl_1', 768, c7, 1, 1),
      (f'{name}.branch7x7dbl_2', c7, c7, 7, 1),
      (f'{name}.branch7x7dbl_3', c7, c7, 1, 7),
      (f'{name}.branch7x7dbl_4', c7, c7, 7, 1),
      (f'{name}.branch7x7dbl_5', c7, 192, 1, 7),
      (f'{name}.branch_pool', 768, 192, 1, 1),
    ]
  convs += [
    ('Mixed_7a.branch3x3_1', 768, 192, 1, 1),
    ('Mixed_7a.branch3x3_2', 192, 320, 3, 3),
    ('Mixed_7a.branch7x7x3_1', 768, 192, 1, 1),
    ('Mixed_7a.branch7x7x3_2', 192, 192, 1, 7),
    ('Mixed_7a.branch7x7x3_3', 192, 192, 7, 1),
    ('Mixed_7a.branch7x7x3_4', 192, 192, 3, 3),
  ]
  for name, cin in (('Mixed_7b', 1280), ('Mixed_7c', 2048)):
    convs += [
      (f'{name}.branch1x1', cin, 320, 1, 1),
      (f'{name}.branch3x3_1', cin, 384, 1, 1),
      (f'{name}.branch3x3_2a', 384, 384, 1, 3),
      (f'{name}.branch3x3_2b', 384, 384, 3, 1),
      (f'{name}.branch3x3dbl_1', cin, 448, 1, 1),
      (f'{name}.branch3x3dbl_2', 448, 384, 3, 3),
      (f'{name}.branch3x3dbl_3a', 384, 384, 1, 3),
      (f'{name}.branch3x3dbl_3b', 384, 384, 3, 1),
      (f'{name}.branch_pool', cin, 192, 1, 1),
    ]
  return convs


def _pytorch_fid_shapes() -> dict[str, tuple[int, ...]]:
  """Keys and shapes of pytorch-fid's pt_inception-2015-12-05 state dict (without
  num_batches_tracked)."""
  shapes = {}
  for name, cin, cout, kh, kw in _torchvision_convs():
    shapes[f'{name}.conv.weight'] = (cout, cin, kh, kw)
    for leaf in ('weight', 'bias', 'running_mean', 'running_var'):
      shapes[f'{name}.bn.{leaf}'] = (cout,)
  shapes['fc.weight'] = (1008, 2048)
  shapes['fc.bias'] = (1008,)
  return shapes


def _flax_path(torch_key: str) -> tuple[str, ...]:
  """Flax param path of a torch key, written independently of the module's mapping."""
  *path, leaf = torch_key.split('.')
  if path[-1] == 'bn':
    leaf = {'weight': 'scale', 'bias': 'bias', 'running_mean': 'mean', 'running_var': 'var'}[leaf]
  else:
    leaf = {'weight': 'kernel', 'bias': 'bias'}[leaf]
  return (*path, leaf)


@pytest.fixture(scope='module')
def state_dict() -> dict[str, np.ndarray]:
  """A random state dict with pytorch-fid's keys and shapes, scaled so a forward pass stays tame."""
  rng = np.random.default_rng(0)
  sd = {}
  for key, shape in _pytorch_fid_shapes().items():
    if key.endswith('conv.weight') or key == 'fc.weight':
      value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
    elif key.endswith('running_var'):
      value = rng.uniform(0.5, 1.5, shape)
    else:
      value = 0.1 * rng.standard_normal(shape)
    sd[key] = value.astype(np.float32)
    if key.endswith('.bn.weight'):
      sd[key.replace('weight', 'num_batches_tracked')] = np.array(0, np.int64)
  return sd


@pytest.fixture(scope='module')
def params(state_dict):
  """Flax params converted from the random state dict."""
  return fid.params_from_pytorch_fid(state_dict)


def test_params_are_torchvision_inception3_in_flax_layout():
  want = {}
  for key, shape in _pytorch_fid_shapes().items():
    if len(shape) == 4:  # OIHW -> HWIO
      shape = (shape[2], shape[3], shape[1], shape[0])
    want['/'.join(_flax_path(key))] = tuple(reversed(shape)) if len(shape) == 2 else shape
  assert fid.param_shapes() == want
  assert len(want) == NUM_PYTORCH_FID_TENSORS


def test_converter_uses_every_key_once(state_dict, params):
  flat = flatten_dict(params)
  assert {'/'.join(k): v.shape for k, v in flat.items()} == fid.param_shapes()
  used = set()
  for key, value in state_dict.items():
    if key.endswith('num_batches_tracked'):
      continue
    got = flat[_flax_path(key)]
    torch_layout = got.transpose(3, 2, 0, 1) if got.ndim == 4 else got.T
    np.testing.assert_array_equal(torch_layout, value, err_msg=key)
    used.add(_flax_path(key))
  assert used == set(flat)


@pytest.mark.parametrize(
  'change, message',
  [
    (
      lambda sd: sd.pop('Mixed_6c.branch7x7dbl_3.bn.running_var'),
      r'missing \(1\):\n    Mixed_6c\.branch7x7dbl_3\.bn\.running_var \[160\]',
    ),
    (
      lambda sd: sd.update({'AuxLogits.fc.weight': np.zeros((1008, 768))}),
      r'unexpected \(1\):\n    AuxLogits\.fc\.weight \[1008, 768\]',
    ),
    (
      lambda sd: sd.update({'fc.weight': np.zeros((1000, 2048))}),
      r'mis-shaped \(1\):\n    fc\.weight: stored \[1000, 2048\], needs \[1008, 2048\] '
      r'for fc/kernel',
    ),
    (
      lambda sd: sd.update({'Mixed_5b.num_batches_tracked': np.array(0)}),
      r'unexpected \(1\):\n    Mixed_5b\.num_batches_tracked \[\]',
    ),
  ],
)
def test_converter_is_strict(state_dict, change, message):
  broken = dict(state_dict)
  change(broken)
  with pytest.raises(ValueError, match=message) as error:
    fid.params_from_pytorch_fid(broken)
  assert "pytorch-fid's pt_inception-2015-12-05-6726825d.pth naming" in str(error.value)


def test_params_npz_round_trip(tmp_path, params):
  path = tmp_path / 'inception_fid.npz'
  fid.save_params(path, params)
  chex.assert_trees_all_equal(fid.load_params(str(path)), params)
  with np.load(path) as f:
    assert 'Mixed_7c/branch3x3dbl_3b/bn/var' in f.files
    np.savez(tmp_path / 'partial.npz', **{k: f[k] for k in f.files if k != 'fc/bias'})
  with pytest.raises(ValueError, match=r'missing \(1\):\n    fc/bias \[1008\]'):
    fid.load_params(tmp_path / 'partial.npz')


def test_load_params_missing_file_says_how_to_convert(tmp_path):
  expected = r'pt_inception-2015-12-05-6726825d\.pth.*python -m diffusion_jax\.fid'
  with pytest.raises(FileNotFoundError, match=expected):
    fid.load_params(tmp_path / 'nope.npz')


def test_command_line_without_torch_says_so(tmp_path):
  code = (
    'import runpy, sys; sys.modules["torch"] = None; '
    f'sys.argv = ["fid", "--pytorch_fid_weights={tmp_path}/w.pth", "--output={tmp_path}/o.npz"]; '
    'runpy.run_module("diffusion_jax.fid", run_name="__main__")'
  )
  result = subprocess.run(
    [sys.executable, '-c', code],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=pathlib.Path(__file__).parents[1],
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  assert result.returncode != 0
  assert 'needs PyTorch' in result.stderr


@pytest.mark.parametrize('size', [32, 256])
def test_output_shapes(params, size):
  images = jax.ShapeDtypeStruct((4, size, size, 3), jnp.float32)
  pool3, logits = jax.eval_shape(fid.inception_outputs, params, images)
  assert pool3.shape == (4, 2048) and logits.shape == (4, 1008)


def test_forward_is_per_image(params):
  images = np.random.default_rng(1).uniform(size=(3, 32, 32, 3)).astype(np.float32)
  pool3, logits = jax.device_get(fid.inception_outputs(params, images[:2]))
  assert pool3.shape == (2, 2048) and logits.shape == (2, 1008)
  assert np.isfinite(pool3).all() and np.isfinite(logits).all()
  assert (pool3 >= 0).all() and pool3.std() > 0  # an average of ReLU outputs
  # An image's outputs do not depend on the other images of its batch (inference BatchNorm).
  other = jax.device_get(fid.inception_outputs(params, np.stack([images[0], images[2]])))
  np.testing.assert_allclose(other[0][0], pool3[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(other[1][0], logits[0], rtol=1e-5, atol=1e-5)


def test_the_statistics_old_names_in_fid_still_work_with_a_deprecation_warning():
  mu, sigma = np.zeros(3), np.eye(3)
  with pytest.warns(DeprecationWarning, match='use diffusion_jax.feature_metrics.frechet_distance'):
    distance = fid.frechet_distance(mu, sigma, mu, sigma)
  assert distance == feature_metrics.frechet_distance(mu, sigma, mu, sigma)
  with pytest.raises(AttributeError):
    fid.no_such_name  # noqa: B018


def _torch_bilinear(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """numpy F.interpolate(mode='bilinear', align_corners=False) on NHWC, in float64."""

  def taps(in_size: int, out_size: int):
    src = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    return i0, i1, src - i0

  y0, y1, wy = taps(x.shape[1], out_h)
  x0, x1, wx = taps(x.shape[2], out_w)
  x = x.astype(np.float64)
  rows = x[:, y0] * (1 - wy)[None, :, None, None] + x[:, y1] * wy[None, :, None, None]
  return rows[:, :, x0] * (1 - wx)[None, None, :, None] + rows[:, :, x1] * wx[None, None, :, None]


@pytest.mark.parametrize('shape', [(32, 32), (17, 40), (400, 512)])
def test_resize_matches_torch_align_corners_false(shape):
  images = np.random.default_rng(2).uniform(size=(2, *shape, 3)).astype(np.float32)
  got = np.asarray(fid.preprocess(images))
  assert got.shape == (2, 299, 299, 3)
  # Both jax and torch place samples in float32: weights are off by ~ input size * 2^-24 per axis.
  atol = 8 * max(shape) * 2.0**-24
  np.testing.assert_allclose(got, 2 * _torch_bilinear(images, 299, 299) - 1, rtol=0, atol=atol)


def test_pools_ignore_padding():
  x = -np.random.default_rng(3).uniform(1, 2, size=(1, 5, 6, 2)).astype(np.float32)  # all negative
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=np.nan)
  windows = np.stack([padded[:, i : i + 5, j : j + 6] for i in range(3) for j in range(3)])
  np.testing.assert_allclose(fid._avg_pool_3x3(x), np.nanmean(windows, axis=0), rtol=1e-6)
  np.testing.assert_allclose(fid._max_pool_3x3(x), np.nanmax(windows, axis=0))


def test_frechet_distance_diagonal_closed_form():
  rng = np.random.default_rng(4)
  mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
  s1, s2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
  want = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
  np.testing.assert_allclose(
    feature_metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)), want, rtol=1e-10
  )


def test_frechet_distance_non_commuting():
  rng = np.random.default_rng(5)
  a, b = rng.standard_normal((2, 8, 8))
  s1, s2 = a @ a.T + 0.1 * np.eye(8), b @ b.T + 0.1 * np.eye(8)
  assert np.abs(s1 @ s2 - s2 @ s1).max() > 0.1
  w, v = np.linalg.eigh(s1)
  # Tr sqrtm(s1 s2) = Tr sqrtm(s1^1/2 s2 s1^1/2), a symmetric PSD matrix.
  root1 = (v * np.sqrt(w)) @ v.T
  tr_covmean = np.sum(np.sqrt(np.linalg.eigvalsh(root1 @ s2 @ root1)))
  mu1, mu2 = rng.standard_normal((2, 8))
  want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
  np.testing.assert_allclose(feature_metrics.frechet_distance(mu1, s1, mu2, s2), want, rtol=1e-9)


def test_frechet_distance_of_features_with_themselves_is_zero():
  features = np.random.default_rng(6).standard_normal((500, 32)) * 2 + 1
  mu, sigma = features.mean(0), np.cov(features, rowvar=False)
  assert abs(feature_metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_frechet_distance_retries_with_eps(monkeypatch):
  real_sqrtm = scipy.linalg.sqrtm
  calls = []

  def flaky_sqrtm(a):
    calls.append(a)
    return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

  monkeypatch.setattr(scipy.linalg, 'sqrtm', flaky_sqrtm)
  s1, s2 = np.diag([1.0, 2.0]), np.diag([3.0, 4.0])
  got = feature_metrics.frechet_distance(np.zeros(2), s1, np.zeros(2), s2, eps=1e-3)
  np.testing.assert_allclose(calls[1], (s1 + 1e-3 * np.eye(2)) @ (s2 + 1e-3 * np.eye(2)))
  want = 10.0 - 2 * (np.sqrt(1.001 * 3.001) + np.sqrt(2.001 * 4.001))
  np.testing.assert_allclose(got, want, rtol=1e-12)


def test_frechet_distance_rejects_large_imaginary_part():
  with pytest.raises(ValueError, match='imaginary'):
    feature_metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([-1.0, 1.0]))


def test_feature_stats_match_numpy_in_uneven_batches():
  # A large offset, a small spread.
  data = np.random.default_rng(7).standard_normal((1000, 24)) * 0.5 + 100.0
  stats = feature_metrics.FeatureStats(dim=24)
  for lo, hi in [(0, 1), (1, 1), (1, 8), (8, 308), (308, 1000)]:
    stats.update(data[lo:hi])
  mu, cov = stats.mean_cov()
  assert stats.num == 1000
  np.testing.assert_allclose(mu, data.mean(axis=0), rtol=1e-12)
  np.testing.assert_allclose(cov, np.cov(data, rowvar=False), rtol=1e-9, atol=1e-12)
  with pytest.raises(ValueError, match=r'shape \(n, 24\)'):
    stats.update(data[:, :3])
  with pytest.raises(ValueError, match='at least 2'):
    feature_metrics.FeatureStats(dim=24).mean_cov()


def test_inception_score_uniform_is_one():
  mean, std = feature_metrics.inception_score(np.zeros((100, 1008)))
  np.testing.assert_allclose([mean, std], [1.0, 0.0], atol=1e-12)


def test_inception_score_confident_balanced_is_num_classes():
  k = 10
  labels = np.tile(np.arange(k), 100)  # each of the 10 splits uses the k classes equally
  logits = 50.0 * np.eye(1008)[labels]
  mean, std = feature_metrics.inception_score(logits, num_splits=10)
  np.testing.assert_allclose(mean, k, rtol=1e-9)
  assert std < 1e-9


def test_stats_npz_round_trip(tmp_path):
  rng = np.random.default_rng(8)
  mu, sigma = rng.standard_normal(5), np.eye(5)
  path = epath.Path(tmp_path) / 'new_dir' / 'ref.npz'  # folders are made as needed
  feature_metrics.save_stats(path, mu, sigma, 50000)
  got_mu, got_sigma, n = feature_metrics.load_stats(path)
  np.testing.assert_array_equal(got_mu, mu)
  np.testing.assert_array_equal(got_sigma, sigma)
  assert n == 50000 and got_mu.dtype == got_sigma.dtype == np.float64
  np.savez(tmp_path / 'ttur.npz', mu=mu, sigma=sigma)
  assert feature_metrics.load_stats(str(tmp_path / 'ttur.npz'))[2] is None
  with pytest.raises(FileNotFoundError, match='FeatureStats'):
    feature_metrics.load_stats(tmp_path / 'missing.npz')
  np.savez(tmp_path / 'other.npz', images=np.zeros(3))
  with pytest.raises(ValueError, match='needs mu and sigma'):
    feature_metrics.load_stats(tmp_path / 'other.npz')


def test_save_stats_is_atomic(tmp_path, monkeypatch):
  path = epath.Path(tmp_path) / 'ref.npz'
  feature_metrics.save_stats(path, np.zeros(3), np.eye(3), 10)

  def interrupted(self, data):  # a writer that dies half-way
    with open(self, 'wb') as f:
      f.write(data[: len(data) // 2])
    raise OSError('disk full')

  monkeypatch.setattr(type(path), 'write_bytes', interrupted)
  with pytest.raises(OSError, match='disk full'):
    feature_metrics.save_stats(path, np.ones(3), 2 * np.eye(3), 20)
  mu, sigma, n = feature_metrics.load_stats(path)  # the old file, whole
  np.testing.assert_array_equal(mu, np.zeros(3))
  assert n == 10
  assert sorted(p.name for p in path.parent.iterdir()) == ['ref.npz']  # no temporary left over
