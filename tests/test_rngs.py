"""The run's random streams: distinct within a seed and across seeds."""

import itertools

import numpy as np
import pytest

from diffusion_jax import rngs

pytestmark = pytest.mark.stack  # the subset CI runs on every supported Python


def test_no_stream_of_one_seed_is_a_stream_of_another():
  keys = {
    (seed, stream): tuple(np.asarray(rngs.key(seed, stream)).tolist())
    for seed in range(4)
    for stream in rngs.STREAMS
  }
  assert len(set(keys.values())) == len(keys)  # seed s's sample_grid is not seed s+1's train
  for seed, (a, b) in itertools.product(range(3), itertools.combinations(rngs.STREAMS, 2)):
    assert keys[seed, a] != keys[seed + 1, b] and keys[seed, b] != keys[seed + 1, a]


def test_an_unknown_stream_is_named():
  with pytest.raises(ValueError, match="Unknown random stream 'grid'"):
    rngs.key(0, 'grid')
