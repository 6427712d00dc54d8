"""The run's random streams, all derived from ``config.seed`` here and nowhere else.

The derivations are those of the first release, so a run resumed or re-evaluated under this
layout draws the same numbers as before.
"""

import jax
import numpy as np

# Stream name -> offset of its key PRNGKey(seed + offset).
_OFFSETS = {'train': 0, 'sample_grid': 1, 'sample': 2, 'eval': 3, 'figures': 4}
STREAMS = tuple(_OFFSETS)


def key(seed: int, stream: str) -> jax.Array:
  """The key of a named stream.

  ``train``: per-step timesteps, noise and dropout; ``sample_grid``: the loop's sample grids;
  ``sample``: ``--mode=sample``; ``eval``: evaluation samples and the bound's noise;
  ``figures``: ``--mode=figures``.
  """
  if stream not in _OFFSETS:
    raise ValueError(f'Unknown random stream {stream!r}; choose one of {STREAMS}.')
  return jax.random.PRNGKey(seed + _OFFSETS[stream])


def params_key(seed: int) -> jax.Array:
  """The key of the initial parameters: 'rbg', as XLA:CPU compiles a threefry-keyed init slowly."""
  return jax.random.key(seed, impl='rbg')


def data_seed(seed: int, process_index: int) -> np.ndarray:
  """The input pipeline's stateless TF seed (2 x int64) for this (seed, process)."""
  return np.random.SeedSequence((seed, process_index)).generate_state(2).astype(np.int64)
