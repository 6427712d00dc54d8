"""The benchmarks' JAX side runs: one alternating comparison end to end, on the digits model."""

import subprocess
import sys

import pytest

from conftest import REPO, cli_env


@pytest.mark.slow
def test_cpu_options_alternates_processes_and_prints_the_table():
  command = [
    sys.executable,
    '-m',
    'benchmarks.cpu_options',
    '--config=digits',
    '--batch=16',
    '--steps=2',
    '--repeats=1',
    '--variants=1 device,2 devices',
  ]
  run = subprocess.run(
    command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600
  )
  assert run.returncode == 0, run.stderr[-3000:]
  rows = [
    line
    for line in run.stdout.splitlines()
    if line.startswith('| 1 device') or line.startswith('| 2 devices')
  ]
  assert len(rows) == 2, run.stdout
  seconds = [float(row.split('|')[2]) for row in rows]
  assert all(0 < s < 60 for s in seconds), rows
  assert run.stdout.splitlines()[-1].startswith('Fastest: ')


@pytest.mark.slow
def test_step_profile_splits_the_step_into_its_convolutions_and_the_rest():
  command = [sys.executable, '-m', 'benchmarks.step_profile', '--config=digits', '--batch=16']
  run = subprocess.run(
    command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600
  )
  assert run.returncode == 0, run.stderr[-3000:]
  from benchmarks.step_profile import GROUPS

  rows = {
    cells[1].strip(): (float(cells[2]), float(cells[3].strip(' %')))
    for cells in (line.split('|') for line in run.stdout.splitlines())
    if len(cells) == 5 and cells[1].strip() in GROUPS
  }
  assert set(rows) == set(GROUPS), run.stdout
  for group in ('conv forward', 'conv input gradient', 'conv filter gradient'):
    assert rows[group][0] > 0, (group, run.stdout)
  assert sum(share for _, share in rows.values()) == pytest.approx(100, abs=0.5)
  assert run.stdout.splitlines()[-1].startswith('Largest: ')
