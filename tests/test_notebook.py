"""The Colab notebook ``notebooks/colab_tpu.ipynb``: stored without outputs; its install cell
issues the Colab commands (checked with the commands recorded, nothing installed); and executed top
to bottom on the CPU in smoke mode (``DIFFUSION_JAX_SMOKE=1``: no install, the tiny digits config, a
few samples, tiny diffusers-format CIFAR10-shaped weights written here) with every section showing
its result.

The kernel is this interpreter (the venv's Python, through a kernel spec written for the test), so
the notebook imports the checkout under test with the pinned stack; it runs in a temporary folder
(its workdirs go there) on the session's TFDS data dir, with no network.
"""

import json
import os
import pathlib
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from diffusion_jax import accelerator

from conftest import REPO, cli_env
from test_convert import small_config, small_config_json, source_weights, write_diffusers

pytestmark = pytest.mark.stack  # the subset CI runs on every supported Python

NOTEBOOK = REPO / 'notebooks' / 'colab_tpu.ipynb'
KERNEL = 'diffusion_jax_test'


def code_cells(notebook) -> dict:
  """The notebook's code cells by id."""
  return {cell.id: cell for cell in notebook.cells if cell.cell_type == 'code'}


def text(cell) -> str:
  """Everything a cell printed or returned as text."""
  parts = []
  for output in cell.outputs:
    if output.output_type == 'stream':
      parts.append(output.text)
    elif 'data' in output:
      parts.append(output.data.get('text/plain', ''))
  return ''.join(parts)


def has_image(cell) -> bool:
  return any('image/png' in output.get('data', {}) for output in cell.outputs)


def test_stored_notebook_is_valid_and_has_no_outputs():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(notebook)
  dirty = [
    cell.id for cell in code_cells(notebook).values() if cell.outputs or cell.execution_count
  ]
  assert not dirty, f'clear the outputs and execution counts of cells {dirty} before committing'
  assert notebook.metadata.get('accelerator') == 'TPU'  # Colab opens it on a TPU runtime
  settings = code_cells(notebook)['settings'].source
  # Colab shows both as a form the user fills in; the install cell says so if they are empty.
  assert "REPO_URL = ''  # @param" in settings and "COMMIT = ''  # @param" in settings
  assert 'OWNER' not in NOTEBOOK.read_text() + (REPO / 'README.md').read_text()


def run_install_cells(monkeypatch, tmp_path, run, **settings):
  """The settings and install cells outside smoke mode, ``subprocess.run`` replaced by ``run``
  and the settings form filled in with ``settings``; returns the cells' namespace."""
  monkeypatch.setattr(subprocess, 'run', run)
  monkeypatch.setattr(sys, 'path', list(sys.path))
  monkeypatch.delitem(sys.modules, 'colab_install', raising=False)  # imported anew from the clone
  monkeypatch.delenv('DIFFUSION_JAX_SMOKE', raising=False)
  monkeypatch.chdir(tmp_path)
  cells = code_cells(nbformat.read(NOTEBOOK, as_version=4))
  namespace = {}
  exec(compile(cells['settings'].source, 'settings', 'exec'), namespace)
  namespace.update(settings)
  exec(compile(cells['install'].source, 'install', 'exec'), namespace)
  return namespace


def test_install_cell_asks_for_the_repository_and_commit_first(tmp_path, monkeypatch):
  def run(args, **_):
    raise AssertionError(f'nothing may run before the form is filled in: {args}')

  with pytest.raises(ValueError, match='Fill in the form at the top first: REPO_URL.*COMMIT'):
    run_install_cells(monkeypatch, tmp_path, run)
  with pytest.raises(ValueError, match='Fill in the form'):
    run_install_cells(monkeypatch, tmp_path, run, REPO_URL='https://example.com/d.git')


def test_install_cell_installs_the_package_under_the_lock(tmp_path, monkeypatch):
  """Outside smoke mode, on a TPU runtime: clone, checkout, pip's dry run, the install of the
  package with its TPU runtime under the lock (commands recorded, nothing run)."""
  commands = []
  report = {'install': [{'metadata': {'name': 'diffusion-jax', 'version': '0.1.0'}}]}

  def run(args, **kwargs):
    assert kwargs.get('check')
    commands.append(args)
    if args[:2] == ['git', 'clone']:  # a checkout: what the cell imports from it
      for name in ('requirements.txt', 'notebooks/colab_install.py'):
        (pathlib.Path(args[-1]) / name).parent.mkdir(parents=True, exist_ok=True)
        (pathlib.Path(args[-1]) / name).write_text((REPO / name).read_text())
    return subprocess.CompletedProcess(args, 0, stdout=json.dumps(report))

  monkeypatch.setattr(accelerator, 'kind', lambda: 'tpu')
  monkeypatch.setattr(accelerator, 'tpu_chips', lambda: ['/dev/vfio/0'])
  monkeypatch.setattr(os, 'kill', lambda *_: pytest.fail('restarted with nothing replaced'))
  url, commit = 'https://example.com/diffusion_jax.git', '0123abc'
  namespace = run_install_cells(monkeypatch, tmp_path, run, REPO_URL=url, COMMIT=commit)

  repo = tmp_path / 'diffusion_jax'
  lock = repo / (
    'requirements-py311.txt' if sys.version_info[:2] == (3, 11) else 'requirements.txt'
  )
  pip = [sys.executable, '-m', 'pip', 'install']
  target = ['-c', str(lock), '-e', f'{repo}[tpu]']
  assert commands == [
    ['git', 'clone', '--quiet', url, str(repo)],
    ['git', '-C', str(repo), 'checkout', '--quiet', commit],
    [*pip, '--dry-run', '--quiet', '--report', '-', *target],
    [*pip, '--quiet', *target],
  ]
  assert namespace['RUNTIME'] == 'tpu' and sys.path[:2] == [str(repo), str(repo / 'notebooks')]


@pytest.fixture
def smoke_weights(tmp_path):
  """A google/ddpm-*-style folder of the small U-Net the notebook's smoke mode configures
  (test_convert's small config: 16x16, ch 32, ch_mult (1, 2), attention at 8x8)."""
  state_dict, _ = source_weights(small_config(), seed=0)
  return write_diffusers(tmp_path / 'ddpm-tiny', state_dict, small_config_json())


@pytest.fixture
def kernel_spec_dir(tmp_path, monkeypatch):
  """A kernel spec running this interpreter, found through JUPYTER_PATH."""
  folder = tmp_path / 'jupyter'
  spec = folder / 'kernels' / KERNEL / 'kernel.json'
  spec.parent.mkdir(parents=True)
  argv = [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}']
  spec.write_text(
    json.dumps({'argv': argv, 'display_name': 'diffusion_jax test', 'language': 'python'})
  )
  monkeypatch.setenv('JUPYTER_PATH', str(folder))
  return folder


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_in_smoke_mode(
  tmp_path, data_dir, smoke_weights, kernel_spec_dir
):
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  run_dir = tmp_path / 'run'
  run_dir.mkdir()
  # The notebook chooses its own CPU device count (config.num_cpu_devices), as the CLI does.
  env = {k: v for k, v in cli_env().items() if k != 'MPLBACKEND'}
  env.update(
    DIFFUSION_JAX_SMOKE='1',
    DIFFUSION_JAX_REPO=str(REPO),
    DIFFUSION_JAX_SMOKE_WEIGHTS=str(smoke_weights),
    TFDS_DATA_DIR=data_dir,
    JUPYTER_PATH=str(kernel_spec_dir),
  )
  client = NotebookClient(
    notebook,
    kernel_name=KERNEL,
    timeout=900,
    startup_timeout=180,
    resources={'metadata': {'path': str(run_dir)}},
  )
  try:
    client.execute(env=env)  # raises CellExecutionError on the first cell that fails
  finally:
    nbformat.write(notebook, tmp_path / 'executed.ipynb')  # for a look after a failure

  cells = code_cells(notebook)
  assert f'diffusion_jax from {REPO}' in text(cells['install'])
  assert 'CpuDevice' in text(cells['devices'])
  for name in ('train-digits', 'progressive', 'cifar10-samples'):
    assert has_image(cells[name]), f'cell {name!r} showed no image'
  metric = text(cells['digits-metric'])
  for line in (
    'confidently classified (p > 0.9): ',
    'FD to the ',
    'class histogram: 0:',
    'bits/dim',
  ):
    assert line in metric
  assert 'skipped' not in text(cells['cifar10-weights']) + text(cells['cifar10-samples'])
  assert (run_dir / 'workdirs' / 'cifar10_ema' / 'checkpoints').is_dir()  # converted
  short = text(cells['short-train'])
  assert 'events.out.tfevents.' in short and 'TensorBoard not started' in short
