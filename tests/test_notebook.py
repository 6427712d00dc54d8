"""The Colab notebook ``notebooks/colab_tpu.ipynb``: stored without outputs; its install cell
issues the Colab commands (checked with the commands recorded, nothing installed); and executed top
to bottom on the CPU in smoke mode (``DIFFUSION_JAX_SMOKE=1``: no install, the tiny digits config, a
few samples, tiny diffusers-format CIFAR10-shaped weights written here) with every section showing
its result.

The kernel is this interpreter (the venv's Python, through a kernel spec written for the test), so
the notebook imports the checkout under test with the pinned stack; it runs in a temporary folder
(its workdirs go there) on the session's TFDS data dir, with no network.
"""

import glob
import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO
from test_convert import small_config, small_config_json, source_weights, write_diffusers

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
  assert "REPO_URL = 'https://github.com/OWNER/diffusion_jax'" in settings
  assert 'COMMIT = ' in settings


def test_install_cell_installs_the_pinned_stack_at_the_commit(tmp_path, monkeypatch):
  """Outside smoke mode, on a TPU runtime: clone, checkout, the pins less the developer tools,
  jax[tpu] at the jax pin, the package (the commands recorded, not run)."""
  commands = []

  def run(args, check):
    assert check
    commands.append(args)
    if args[:2] == ['git', 'clone']:  # the clone: a checkout holding requirements.txt
      pathlib.Path(args[-1]).mkdir()
      (pathlib.Path(args[-1]) / 'requirements.txt').write_text(requirements)

  def kill(pid, signal):
    raise AssertionError('the install cell restarted the kernel although no loaded module changed')

  requirements = (REPO / 'requirements.txt').read_text()
  monkeypatch.setattr(subprocess, 'run', run)
  monkeypatch.setattr(os, 'kill', kill)
  monkeypatch.setattr(glob, 'glob', lambda pattern: ['/dev/accel0'] if 'accel' in pattern else [])
  monkeypatch.setattr(sys, 'path', list(sys.path))
  monkeypatch.delenv('DIFFUSION_JAX_SMOKE', raising=False)
  monkeypatch.chdir(tmp_path)
  cells = code_cells(nbformat.read(NOTEBOOK, as_version=4))
  namespace = {}
  for name in ('settings', 'install'):
    exec(compile(cells[name].source, name, 'exec'), namespace)

  repo = str(tmp_path / 'diffusion_jax')
  pins = [line for line in requirements.splitlines() if line[:1].isalpha()]
  dev_tools = ('pytest==', 'ruff==', 'nbclient==', 'nbformat==', 'ipykernel==')
  jax_version = next(pin for pin in pins if pin.startswith('jax==')).split('==')[1]
  pip = [sys.executable, '-m', 'pip', 'install', '--quiet']
  try:  # Colab's TensorFlow (the distribution `tensorflow`) would be removed first
    importlib.metadata.version('tensorflow')
    uninstall = [[sys.executable, '-m', 'pip', 'uninstall', '--quiet', '--yes', 'tensorflow']]
  except importlib.metadata.PackageNotFoundError:
    uninstall = []
  assert commands == [
    ['git', 'clone', '--quiet', namespace['REPO_URL'], repo],
    ['git', '-C', repo, 'checkout', '--quiet', namespace['COMMIT']],
    *uninstall,
    [*pip, *[pin for pin in pins if not pin.startswith(dev_tools)]],
    [*pip, f'jax[tpu]=={jax_version}'],
    [*pip, '--no-deps', '-e', repo],
  ]
  installed = commands[len(uninstall) + 2]
  assert 'huggingface-hub==2.4.0' in installed and 'tensorflow-cpu==2.21.0' in installed
  assert sys.path[0] == repo  # importable in this kernel, before any restart


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
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'MPLBACKEND')}
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
