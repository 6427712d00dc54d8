"""Samples for the sample evaluators: a compiled sampler drawn in chunks, gathered to every host.

Chunk c is drawn with ``fold_in(rng, c)`` and only the first ``num_samples`` rows are scored, so
the scored samples depend on the key, the chunk size and the device count, not on the evaluator.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np

from diffusion_jax import parallel, sampling

# (sample chunks in [-1, 1], how many of their rows to score) -> named metrics.
ScoreFn = Callable[[Iterable[jax.Array], int], dict[str, Any]]


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of ``multiple`` that is >= ``n``."""
  return -(-n // multiple) * multiple


def chunk_size(batch_size: int, num_samples: int, num_devices: int) -> int:
  """Samples per sampling call: ``batch_size``, or fewer if ``num_samples`` needs fewer, rounded
  up to a multiple of the device count."""
  return min(round_up(batch_size, num_devices), round_up(num_samples, num_devices))


@dataclasses.dataclass(frozen=True)
class ChunkedSampler:
  """A compiled ``sample(params, rng)`` of ``chunk_size`` samples, called once per chunk."""

  sample_fn: sampling.SampleFn
  chunk_size: int

  def chunks(self, params: Any, rng: jax.Array, num_samples: int) -> Iterator[jax.Array]:
    """Sharded [-1, 1] chunks of at least ``num_samples`` rows, chunk c from ``fold_in(rng, c)``."""
    for c in range(-(-num_samples // self.chunk_size)):
      yield self.sample_fn(params, jax.random.fold_in(rng, c))


def gathered_rows(chunks: Iterable[Any], num_rows: int) -> Iterator[Any]:
  """Each chunk (a pytree of global arrays with a leading row axis) as numpy on every host,
  trimmed so that exactly the first ``num_rows`` rows come out; stops pulling chunks after that."""
  remaining = num_rows
  for chunk in chunks:
    rows = jax.tree.map(lambda x, n=remaining: parallel.gather(x)[:n], chunk)
    remaining -= len(jax.tree.leaves(rows)[0])
    yield rows
    if remaining <= 0:
      return


def peek_images(
  chunks: Iterator[jax.Array], num_images: int
) -> tuple[np.ndarray, Iterator[jax.Array]]:
  """The first chunk's first ``num_images`` as uint8 on every host, and all chunks, unchanged."""
  first = next(chunks)
  return sampling.gather_images(first, num_images), itertools.chain([first], chunks)
