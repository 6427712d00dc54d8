"""The run's random streams, all derived from ``config.seed`` here and nowhere else.

A stream's key is the seed's key with the stream's name folded in, so no stream of one seed is a
stream of another seed (``PRNGKey(seed + offset)``, the first layout's rule, made seed s's
``sample_grid`` stream seed s+1's ``train`` stream). A checkpoint keeps the ``train`` key it was
started with, so a resumed run draws what it drew before.
"""

import zlib

import jax
import numpy as np

STREAMS = ('train', 'sample_grid', 'sample', 'eval', 'figures')


def key(seed: int, stream: str) -> jax.Array:
  """The key of a named stream: ``fold_in(PRNGKey(seed), crc32(stream))``.

  ``train``: per-step timesteps, noise and dropout; ``sample_grid``: the loop's sample grids;
  ``sample``: ``--mode=sample``; ``eval``: evaluation samples and the bound's noise;
  ``figures``: ``--mode=figures``.
  """
  if stream not in STREAMS:
    raise ValueError(f'Unknown random stream {stream!r}; choose one of {STREAMS}.')
  return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(stream.encode()))


def params_key(seed: int) -> jax.Array:
  """The key of the initial parameters: 'rbg', as XLA:CPU compiles a threefry-keyed init slowly."""
  return jax.random.key(seed, impl='rbg')


def data_seed(seed: int, process_index: int) -> np.ndarray:
  """The input pipeline's stateless TF seed (2 x int64) for this (seed, process)."""
  return np.random.SeedSequence((seed, process_index)).generate_state(2).astype(np.int64)
