"""The notebook's install cell as functions: which runtime Colab gave, what the pinned stack
replaces of Colab's preinstalled packages, and whether the kernel must restart afterwards.

Standard library only: it runs before anything is installed. ``colab_tpu.ipynb`` calls
``install``; ``tests/test_notebook.py`` checks ``plan`` against the package lists of Colab's
images. pip resolves the package with the lock file as constraints (``pip install -c LOCK -e
REPO``), so only what the package needs is installed, each at its pinned version, and Colab's own
IPython and ipykernel stay.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

# Preinstalled distributions that hold the import package of a pinned one of another name: pip
# would write one over the other, so they are uninstalled first.
SAME_MODULE = {'tensorflow-cpu': ('tensorflow',)}
# JAX's CUDA plugins (Colab's GPU image) load only beside the jaxlib of their own version.
JAX_PLUGIN = re.compile(r'jax-cuda\d+-(plugin|pjrt)')
RESOLVER_NOTE = (
  "pip may end with a red 'ERROR: pip's dependency resolver does not currently take into account "
  "all the packages that are installed' and a list of Colab packages (e.g. tensorflow-text, "
  'torch-xla) that ask for the versions replaced above: expected, and harmless here; this '
  'notebook does not use them.'
)


def normalize(name: str) -> str:
  """A distribution name as pip compares (PEP 503), ``Orbax_Checkpoint`` -> ``orbax-checkpoint``"""
  return re.sub(r'[-_.]+', '-', name).lower()


def lock_file(repo: Path, version: tuple[int, int] = sys.version_info[:2]) -> Path:
  """The lock of this Python: ``requirements.txt`` (3.12, 3.13) or ``requirements-py311.txt``."""
  if not (3, 11) <= tuple(version) <= (3, 13):
    raise RuntimeError(
      f'Python {version[0]}.{version[1]} is not supported (3.11, 3.12 and 3.13 are): choose a '
      'Colab runtime version with one of them (Runtime -> Change runtime type).'
    )
  return repo / ('requirements-py311.txt' if tuple(version) == (3, 11) else 'requirements.txt')


def read_freeze(lines: Iterable[str]) -> dict[str, str]:
  """``pip freeze`` lines -> {name: version}; ``name @ URL`` lines get the version ``'@'``."""
  installed = {}
  for line in lines:
    name, sep, version = line.strip().partition('==')
    if not sep:
      name, sep, _ = line.strip().partition(' @ ')
      version = '@'
    if sep and not name.startswith('#'):
      installed[normalize(name)] = version
  return installed


def installed_versions() -> dict[str, str]:
  """{name: version} of every distribution installed in this Python."""
  return {normalize(d.metadata['Name']): d.version for d in importlib.metadata.distributions()}


@dataclasses.dataclass(frozen=True)
class Plan:
  """What an install changes: versions replaced, distributions added and removed, and the
  imported modules whose code it changes (the kernel must restart to load the new code)."""

  replace: dict[str, tuple[str, str]]  # name -> (installed version, pinned version)
  add: dict[str, str]
  remove: tuple[str, ...]  # uninstalled before the install
  restart_for: tuple[str, ...]

  def describe(self) -> str:
    """What a person reads before pip runs."""
    lines = [f'The pinned stack adds {len(self.add)} packages and replaces {len(self.replace)}:']
    lines += [f'  {name} {old} -> {new}' for name, (old, new) in sorted(self.replace.items())]
    if self.remove:
      lines.append(f'  removed first: {", ".join(self.remove)}')
    if self.replace or self.remove:
      lines.append(RESOLVER_NOTE)
    return '\n'.join(lines)


def module_names(files: Iterable[str]) -> set[str]:
  """The importable modules of a distribution's files: ``google/protobuf/__init__.py`` ->
  ``google.protobuf``, ``numpy/_core/_multiarray_umath.cpython-313-x86_64-linux-gnu.so`` ->
  ``numpy._core._multiarray_umath``."""
  modules = set()
  for file in files:
    parts = str(file).split('/')
    stem, dot, suffix = parts[-1].partition('.')
    if not dot or suffix.rsplit('.', 1)[-1] not in ('py', 'so', 'pyd') or '-' in parts[0]:
      continue  # data, scripts, and the .dist-info folder
    parts = parts[:-1] if stem == '__init__' else [*parts[:-1], stem]
    if parts and all(part.isidentifier() for part in parts):
      modules.add('.'.join(parts))
  return modules


def installed_modules(distribution: str) -> set[str]:
  """The modules of an installed distribution (none if it is not installed)."""
  try:
    return module_names(importlib.metadata.files(distribution) or ())
  except importlib.metadata.PackageNotFoundError:
    return set()


def plan(
  installed: Mapping[str, str],
  to_install: Mapping[str, str],
  imported: Iterable[str],
  modules_of: Callable[[str], set[str]] = installed_modules,
) -> Plan:
  """The changes of installing ``to_install`` ({name: version}, what pip resolved) over
  ``installed``, given the ``imported`` module names (``sys.modules``) and the modules of each
  installed distribution."""
  installed = {normalize(k): v for k, v in installed.items()}
  to_install = {normalize(k): v for k, v in to_install.items()}
  replace = {
    name: (installed[name], version)
    for name, version in to_install.items()
    if name in installed and installed[name] != version
  }
  add = {name: version for name, version in to_install.items() if name not in installed}
  remove = [old for new in to_install for old in SAME_MODULE.get(new, ()) if old in installed]
  jax = to_install.get('jax', installed.get('jax'))
  remove += [n for n, v in installed.items() if JAX_PLUGIN.fullmatch(n) and v != jax]
  changed = set().union(*(modules_of(name) for name in [*replace, *remove]))
  restart_for = sorted(changed.intersection(imported))
  return Plan(replace, add, tuple(sorted(remove)), tuple(restart_for))


def pip_args(repo: Path, runtime: str) -> list[str]:
  """``install`` arguments of pip: the package (with the TPU runtime on a TPU) under the lock."""
  target = f'{repo}[tpu]' if runtime == 'tpu' else str(repo)
  return ['-c', str(lock_file(repo)), '-e', target]


def resolve(args: list[str], run: Callable = subprocess.run) -> dict[str, str]:
  """{name: version} of what ``pip install ARGS`` would install here (pip's dry-run report)."""
  pip = [sys.executable, '-m', 'pip', 'install', '--dry-run', '--quiet', '--report', '-', *args]
  report = json.loads(run(pip, check=True, capture_output=True, text=True).stdout)
  return {normalize(i['metadata']['name']): i['metadata']['version'] for i in report['install']}


def describe_runtime(runtime: str, chips: list[str]) -> str:
  """One line on the runtime this notebook found, and what it runs on there."""
  if runtime == 'tpu':
    return f'TPU runtime ({", ".join(chips) or "a TPU host"}): JAX runs on the TPU.'
  if runtime == 'gpu':
    return (
      'GPU runtime: this notebook runs JAX on the CPU there (the pinned stack is the CPU and TPU '
      'build; JAX_PLATFORMS=cpu). Choose a TPU runtime for speed (Runtime -> Change runtime type).'
    )
  return 'CPU runtime: JAX runs on the CPU (a TPU runtime trains the digits default in ~1 minute).'


def install(repo: Path, runtime: str, run: Callable = subprocess.run) -> Plan:
  """Installs the package under the lock, removing what it replaces under another name first,
  and restarts the kernel (Colab starts a new one) if a loaded module's code changed."""
  args = pip_args(repo, runtime)
  before = plan(installed_versions(), resolve(args, run), sys.modules)
  print(before.describe())
  pip = [sys.executable, '-m', 'pip']
  if before.remove:
    run([*pip, 'uninstall', '--quiet', '--yes', *before.remove], check=True)
  run([*pip, 'install', '--quiet', *args], check=True)
  if before.restart_for:
    loaded = ', '.join(before.restart_for[:8]) + ', ...' * (len(before.restart_for) > 8)
    print(
      f'The install replaced the code of loaded modules ({loaded}): restarting the runtime. '
      'Run all cells again (the install is then a quick no-op).'
    )
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)
  return before
