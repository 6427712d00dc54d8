"""Named numpy arrays in ``.npz`` files on any ``epath`` (local or gs://): read whole, and written
atomically (a temporary sibling, then a rename) so a reader never sees a partial file."""

import io
import os
import uuid
from collections.abc import Mapping

import numpy as np
from etils import epath


def write(path: epath.PathLike, arrays: Mapping[str, np.typing.ArrayLike]) -> None:
  """Writes ``arrays`` to ``path`` (creating its folder) through a temporary sibling."""
  path = epath.Path(path)
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f'.{path.name}.tmp{os.getpid()}-{uuid.uuid4().hex[:8]}'
  try:
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)
  finally:
    if tmp.exists():
      tmp.unlink()


def read(path: epath.PathLike) -> dict[str, np.ndarray]:
  """Every array of the ``.npz`` at ``path`` (FileNotFoundError if there is none)."""
  with np.load(io.BytesIO(epath.Path(path).read_bytes())) as f:
    return {name: f[name] for name in f.files}
