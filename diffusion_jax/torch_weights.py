"""PyTorch weights for Flax: torch tensor layouts, reading a ``.pth``/``.bin`` state dict, and the
strict match of stored tensors to parameters. ``fid`` (pytorch-fid's Inception) and ``convert``
(diffusers' UNet2DModel, the original TF release) import weights through these.

Strict means: every stored tensor but the ignored ones fills exactly one parameter, with the
right shape. ``match`` lists the missing, unexpected and mis-shaped names otherwise, and its
``report`` is the error message the importer raises.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Generic, TypeVar

import numpy as np
from etils import epath

Shape = tuple[int, ...]
K = TypeVar('K', bound=Hashable)
MAX_LISTED = 25  # entries listed per kind of problem; the rest are counted


# ----------------------------------------------------------------------------- layouts


def torch_shape(shape: Shape, *, conv_1x1: bool = False) -> Shape:
  """The torch shape of a Flax one: HWIO conv kernel -> OIHW, (in, out) dense kernel -> (out, in),
  or (out, in, 1, 1) with ``conv_1x1`` (a 1x1 conv that Flax stores as a dense kernel); others as
  they are."""
  shape = tuple(shape)
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if len(shape) == 2:
    return (shape[1], shape[0], 1, 1) if conv_1x1 else (shape[1], shape[0])
  return shape


def from_torch(array: np.ndarray, ndim: int | None = None) -> np.ndarray:
  """A torch-layout array in Flax layout (a view): OIHW -> HWIO, or (out, in, 1, 1) -> (in, out)
  if the Flax parameter has ``ndim`` 2; (out, in) -> (in, out); others as they are."""
  if array.ndim == 4:
    return array[:, :, 0, 0].T if ndim == 2 else array.transpose(2, 3, 1, 0)
  return array.T if array.ndim == 2 else array


# ----------------------------------------------------------------------------- files


class TorchMissingError(ImportError):
  """A PyTorch file is to be read where PyTorch is not installed."""


def read_state_dict(path: epath.PathLike, *, hint: str = '') -> dict[str, np.ndarray]:
  """A torch ``.pth``/``.bin`` state dict as numpy arrays, floating ones as float32.

  PyTorch is imported here only, so the JAX environment never needs it; without it a
  TorchMissingError says so, followed by ``hint`` (what to do instead).
  """
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise TorchMissingError(
      f'{path} is a PyTorch file and PyTorch is not installed here: reading it needs PyTorch '
      f'(its CPU build is enough). {hint}'.rstrip()
    ) from None
  with epath.Path(path).open('rb') as f:
    state_dict = torch.load(f, map_location='cpu', weights_only=True)
  return {
    name: (tensor.float() if tensor.is_floating_point() else tensor).detach().cpu().numpy()
    for name, tensor in state_dict.items()
  }


# ----------------------------------------------------------------------------- strict match


@dataclasses.dataclass(frozen=True)
class Wanted:
  """Where a parameter is stored: candidate names (preferred first) and the stored shape."""

  keys: tuple[str, ...]
  shape: Shape
  param: str = ''  # the parameter's own name, if it differs from the stored one


@dataclasses.dataclass(frozen=True)
class Match(Generic[K]):
  """The stored name filling each parameter (one dict per target), and every problem found."""

  found: list[dict[K, str]]
  missing: list[str]
  unexpected: list[str]
  misshaped: list[str]

  @property
  def ok(self) -> bool:
    return not (self.missing or self.unexpected or self.misshaped)

  def report(self, header: str) -> str:
    """``header``, then each kind of problem with its count and (up to MAX_LISTED) entries."""
    return '\n'.join(
      [
        header,
        *listing('missing', self.missing),
        *listing('unexpected', self.unexpected),
        *listing('mis-shaped', self.misshaped),
      ]
    )


def listing(title: str, items: Sequence[str]) -> list[str]:
  """``title (n):`` and up to MAX_LISTED indented items."""
  if not items:
    return []
  more = [f'    ... and {len(items) - MAX_LISTED} more'] if len(items) > MAX_LISTED else []
  return [f'  {title} ({len(items)}):', *(f'    {item}' for item in items[:MAX_LISTED]), *more]


def match(
  targets: Sequence[Mapping[K, Wanted]],
  shapes: Mapping[str, Shape],
  *,
  ignore: Callable[[str], bool] = lambda name: False,
) -> Match[K]:
  """Matches stored tensors (name -> shape) to the parameters of each target (e.g. params and
  EMA params read from one file). Tensors that fill nothing and are not ``ignore``d are
  unexpected; a parameter none of whose names is stored is missing."""
  shapes = {name: tuple(shape) for name, shape in shapes.items()}
  found, missing, misshaped = [], [], []
  for target in targets:
    keys = {}
    for param, wanted in target.items():
      key = next((k for k in wanted.keys if k in shapes), None)
      if key is None:
        missing.append(f'{" or ".join(wanted.keys)} {list(wanted.shape)}')
        continue
      if shapes[key] != tuple(wanted.shape):
        where = f' for {wanted.param}' if wanted.param and wanted.param != key else ''
        misshaped.append(f'{key}: stored {list(shapes[key])}, needs {list(wanted.shape)}{where}')
      keys[param] = key
    found.append(keys)
  used = {key for keys in found for key in keys.values()}
  unexpected = [
    f'{name} {list(shapes[name])}'
    for name in sorted(shapes)
    if name not in used and not ignore(name)
  ]
  return Match(found=found, missing=missing, unexpected=unexpected, misshaped=misshaped)
