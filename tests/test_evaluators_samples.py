"""Sample chunks for the evaluators on 8 CPU devices: chunk sizes, the chunks' keys, gathering
exactly N rows (and no more chunks than needed), and peeking at the first images."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from diffusion_jax import images, parallel, sampling
from diffusion_jax.evaluators import samples


@pytest.fixture(scope='module')
def mesh():
  return parallel.make_mesh()


@pytest.mark.parametrize(
  'batch_size, num_samples, expected',
  [(16, 20, 16), (100, 20, 24), (5, 100, 8), (256, 50_000, 256), (250, 50_000, 256)],
)
def test_chunk_size_is_the_smaller_rounded_up_to_the_devices(batch_size, num_samples, expected):
  assert sampling.chunk_size(batch_size, num_samples, 8) == expected


def fake_sample_fn(mesh, chunk_size):
  """``sample(params, rng, first_row)``: noise of the key plus the first row's index,
  [chunk_size, 2, 2, 1] on the mesh."""
  sharding = NamedSharding(mesh, P(parallel.DATA_AXIS))

  def sample(params, rng, first_row):
    return params * jax.random.uniform(rng, (chunk_size, 2, 2, 1), minval=-1) + first_row

  return jax.jit(sample, out_shardings=sharding)


def test_chunks_cover_the_samples_each_with_its_own_key(mesh):
  sampler = sampling.ChunkedSampler(fake_sample_fn(mesh, 8), 8)
  rng = jax.random.PRNGKey(3)
  chunks = list(sampler.chunks(1.0, rng, 20))
  assert len(chunks) == 3
  expected = [sampler.sample_fn(1.0, jax.random.fold_in(rng, c), 8 * c) for c in range(3)]
  chex.assert_trees_all_equal(chunks, expected)


def test_gathered_rows_are_exactly_n_and_stop_pulling(mesh):
  sharding = NamedSharding(mesh, P(parallel.DATA_AXIS))
  pulled = []

  def chunks():
    for c in range(5):
      pulled.append(c)
      rows = np.arange(8 * c, 8 * c + 8)
      yield {'a': jax.device_put(rows, sharding), 'b': jax.device_put(-rows, sharding)}

  out = list(samples.gathered_rows(chunks(), 19))
  assert pulled == [0, 1, 2]  # the 4th chunk is never drawn
  assert [len(rows['a']) for rows in out] == [8, 8, 3]
  gathered = jax.tree.map(lambda *xs: np.concatenate(xs), *out)
  chex.assert_trees_all_equal(gathered, {'a': np.arange(19), 'b': -np.arange(19)})


def test_peek_images_returns_the_first_as_uint8_and_every_chunk(mesh):
  sampler = sampling.ChunkedSampler(fake_sample_fn(mesh, 8), 8)
  rng = jax.random.PRNGKey(0)
  first, chunks = samples.peek_images(sampler.chunks(1.0, rng, 16), 5)
  chunks = list(chunks)
  assert len(chunks) == 2
  chex.assert_trees_all_equal(chunks, list(sampler.chunks(1.0, rng, 16)))
  np.testing.assert_array_equal(first, images.to_uint8(parallel.gather(chunks[0])[:5]))
  assert first.dtype == np.uint8 and first.shape == (5, 2, 2, 1)


def test_class_labels_spread_the_classes_or_cycle_the_given_ones():
  rows = np.arange(7)
  np.testing.assert_array_equal(sampling.class_labels((), 3, rows), [0, 1, 2, 0, 1, 2, 0])
  np.testing.assert_array_equal(sampling.class_labels((4,), 10, rows), [4] * 7)
  np.testing.assert_array_equal(sampling.class_labels((1, 5), 10, rows), [1, 5, 1, 5, 1, 5, 1])
  on_device = sampling.class_labels((1, 5), 10, jnp.arange(7))
  np.testing.assert_array_equal(on_device, [1, 5, 1, 5, 1, 5, 1])


def test_a_class_conditional_grid_has_one_row_per_class(mesh, tmp_path):
  """Samples spread over 3 classes (row i: class i mod 3), drawn as 3 rows of their class."""
  sampler = sampling.ChunkedSampler(fake_sample_fn(mesh, 8), 8)
  labels = sampling.class_labels((), 3, np.arange(12))
  samples = sampling.write_sample_grid(
    sampler, 1.0, jax.random.PRNGKey(0), num_samples=12, path=tmp_path / 'g.png', labels=labels
  )
  order = np.argsort(labels, kind='stable')
  expected = images.image_grid(samples[order], columns=4)
  np.testing.assert_array_equal(
    images.image_grid(samples[labels == 0], columns=4)[:6], expected[:6]
  )
  png = np.asarray(Image.open(tmp_path / 'g.png'))
  scale = png.shape[0] // expected.shape[0]
  np.testing.assert_array_equal(png[::scale, ::scale], expected[..., 0])
