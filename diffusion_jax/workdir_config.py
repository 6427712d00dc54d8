"""What a workdir holds: the config its run was trained with (``config.json``, written by training
at step 0 and by ``diffusion_jax.convert``), compared with the config of a new command before
anything is built; and the check that the workdir is a folder this process can write."""

import json
import os
import pathlib
import uuid
from typing import Any

import ml_collections
from absl import logging
from etils import epath

from diffusion_jax.errors import SetupError

FILE_NAME = 'config.json'
# What makes the trained model and its diffusion process: changing them is an error unless allowed.
MODEL_SECTIONS = ('model', 'diffusion')
MODEL_FIELDS = ('dataset.image_size', 'dataset.num_channels')
COMPUTE_ONLY = ('model.remat', 'model.dtype')  # how the same model computes: always allowed
ALLOW_FLAG = '--allow_config_change'


def write(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> None:
  """Records ``config`` as the config of the run in ``workdir``."""
  (epath.Path(workdir) / FILE_NAME).write_text(config.to_json_best_effort(indent=2))


def check(
  config: ml_collections.ConfigDict, workdir: epath.PathLike, *, allow_change: bool
) -> None:
  """A SetupError naming every field of the model or the diffusion process in which ``config``
  differs from the run in ``workdir`` (nothing to compare without its ``config.json``), unless
  ``allow_change``. Other differences (periods, sizes of evaluation, paths) are logged."""
  path = epath.Path(workdir) / FILE_NAME
  if not path.exists():
    return
  try:
    saved = json.loads(path.read_text())
    if not isinstance(saved, dict):
      raise ValueError('not a JSON object')
  except (ValueError, UnicodeDecodeError) as e:
    if allow_change:
      logging.warning('Cannot read %s (%s); not comparing the config with it.', path, e)
      return
    raise SetupError(
      f'{path} is not the config a run writes ({e}), so the config cannot be compared with the '
      f"run's: restore or delete that file, or pass {ALLOW_FLAG} to run without the comparison."
    ) from None
  saved, asked = flatten(saved), flatten(json.loads(config.to_json_best_effort()))
  changed = {k: (saved[k], asked[k]) for k in sorted(saved.keys() & asked.keys())}
  changed = {k: values for k, values in changed.items() if values[0] != values[1]}
  model = {k: values for k, values in changed.items() if _makes_the_model(k)}
  others = {k: values for k, values in changed.items() if k not in model}
  if others:
    logging.info(
      'The config differs from %s in settings a run may change: %s.',
      path,
      '; '.join(f'{k}: {_shown(old)} -> {_shown(new)}' for k, (old, new) in others.items()),
    )
  if not model:
    return
  lines = [
    f'{k}: the run in {workdir} was trained with {_shown(old)}, the config asks for {_shown(new)}'
    for k, (old, new) in model.items()
  ]
  if allow_change:
    logging.warning('As %s allows, the config changes the run: %s.', ALLOW_FLAG, '; '.join(lines))
    return
  same = ' '.join(f'--config.{k}={_flag(old)}' for k, (old, _) in model.items())
  raise SetupError(
    f'the config changes the model or the diffusion process of the run in {workdir} (its '
    f'{FILE_NAME}):\n'
    + '\n'.join(f'  {line}' for line in lines)
    + f"\nUse the run's settings ({same}), another --workdir, or {ALLOW_FLAG} if you mean the "
    'change (a different model cannot restore the checkpoints of this one).'
  )


def check_writable(workdir: str, *, create: bool) -> None:
  """A SetupError unless ``workdir`` is a folder this process can write, or (``create``) one it
  can make; an absent workdir is left absent without ``create``. gs:// paths are not probed."""
  if '://' in workdir:
    return
  path = pathlib.Path(os.path.abspath(workdir))
  try:
    if path.exists() and not path.is_dir():
      raise SetupError(
        f'--workdir={workdir} is a file, not a folder; pass the folder of a run (a new one is '
        'created).'
      )
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
      raise SetupError(
        f'--workdir={workdir} cannot be created: {existing} is a file; pass a path under a folder.'
      )
    if not path.exists() and not create:
      return
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f'.write_check_{uuid.uuid4().hex}'
    probe.write_text('')
    probe.unlink()
  except OSError as e:
    raise SetupError(
      f'--workdir={workdir} cannot be written ({e.strerror}: {e.filename}); pass a folder this '
      'user can write, or change its permissions.'
    ) from None


def flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  """``{'model.ch': 32, ...}`` of a nested dict; sequences as lists."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = list(value) if isinstance(value, (list, tuple)) else value
  return flat


def _makes_the_model(field: str) -> bool:
  if field in COMPUTE_ONLY:
    return False
  return field.split('.')[0] in MODEL_SECTIONS or field in MODEL_FIELDS


def _flag(value: Any) -> str:
  """``value`` as a --config override writes it: ``(1,2)`` for a list."""
  if isinstance(value, list):
    return f'({",".join(map(str, value))}{"," if len(value) == 1 else ""})'
  return str(value)


def _shown(value: Any) -> str:
  """``value`` as the config writes it: a list as a tuple."""
  return repr(tuple(value) if isinstance(value, list) else value)
