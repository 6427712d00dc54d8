"""Recovery: a diverging run stops before saving NaNs, an unreadable latest checkpoint gives way to
the previous one (renamed aside, never deleted), stale temporaries of killed saves are removed,
and a checkpoint of another model is a clear error."""

import json

import jax
import numpy as np
import pytest

from diffusion_jax import draw, errors, train
from diffusion_jax.errors import DivergedError, SetupError
from diffusion_jax.run import Run

from conftest import run_main, tiny_flags


def steps_in(workdir) -> list[int]:
  return sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())


def latest_state(config, workdir):
  return Run.create(config, workdir).restore_latest()


def test_a_diverging_run_stops_at_the_first_non_finite_step_without_saving_it(
  tiny_config, tmp_path
):
  tiny_config.optim.update(learning_rate=1e6, warmup_steps=1, grad_clip=0.0)
  tiny_config.train.update(num_train_steps=8, checkpoint_every_steps=1, log_every_steps=4)
  with pytest.raises(DivergedError, match=r'not finite from step (\d+) on') as error:
    train.train_and_evaluate(Run.create(tiny_config, tmp_path))
  first_bad = int(error.value.args[0].split('from step ')[1].split()[0])
  saved = steps_in(tmp_path)
  assert saved and max(saved) < first_bad  # the last good step is the latest checkpoint
  state = latest_state(tiny_config, tmp_path)
  for leaf in jax.tree.leaves(jax.device_get((state.params, state.ema_params, state.opt_state))):
    assert np.isfinite(leaf).all()
  assert not (tmp_path / 'samples').exists()  # no NaN grid either


def test_an_unreadable_latest_checkpoint_is_renamed_aside_and_the_previous_one_resumes(
  tiny_config, tmp_path
):
  tiny_config.train.update(num_train_steps=3, checkpoint_every_steps=1)
  train.train_and_evaluate(Run.create(tiny_config, tmp_path))
  assert steps_in(tmp_path) == [1, 2, 3]
  metadata = tmp_path / 'checkpoints' / '3' / 'default' / '_METADATA'
  metadata.write_text(metadata.read_text()[:40])  # truncated, as a full disk leaves it
  previous = latest_state(tiny_config, tmp_path)  # --mode=sample and eval read the previous one
  assert int(previous.step) == 2
  tiny_config.train.num_train_steps = 4
  resumed = train.train_and_evaluate(Run.create(tiny_config, tmp_path))
  assert int(resumed.step) == 4
  assert steps_in(tmp_path) == [2, 3, 4]  # resumed from 2: step 3 trained and saved anew
  aside = tmp_path / 'checkpoints' / '3.unreadable'
  assert (aside / 'default' / '_METADATA').read_text() == metadata.read_text()[:40]


def test_no_readable_checkpoint_at_all_is_a_clear_error(tiny_config, tmp_path):
  tiny_config.train.update(num_train_steps=1, checkpoint_every_steps=1)
  train.train_and_evaluate(Run.create(tiny_config, tmp_path))
  (tmp_path / 'checkpoints' / '1' / 'default' / '_METADATA').write_text('{')
  with pytest.raises(SetupError, match=r'No checkpoint .* can be read \(tried steps \[1\]'):
    draw.sample_from_checkpoint(Run.create(tiny_config, tmp_path), num_samples=2)


def test_leftovers_of_killed_saves_and_deletions_are_cleared_on_start(tiny_config, tmp_path):
  tiny_config.train.update(num_train_steps=1, checkpoint_every_steps=1)
  stale = tmp_path / 'checkpoints' / '7.orbax-checkpoint-tmp-1764489600'
  (stale / 'default').mkdir(parents=True)
  (stale / 'default' / 'half_written').write_bytes(b'\0' * 10)
  half_deleted = tmp_path / 'checkpoints' / '0'  # what a kill during Orbax's deletion leaves
  (half_deleted / 'default').mkdir(parents=True)
  train.train_and_evaluate(Run.create(tiny_config, tmp_path))
  assert not stale.exists() and steps_in(tmp_path) == [1]
  assert (tmp_path / 'checkpoints' / '0.incomplete' / 'default').is_dir()  # moved, not deleted


def test_a_retention_deletion_cut_short_is_finished_on_start(tiny_config, tmp_path):
  tiny_config.train.update(num_train_steps=3, checkpoint_every_steps=1, keep_checkpoints=2)
  train.train_and_evaluate(Run.create(tiny_config, tmp_path))
  assert steps_in(tmp_path) == [2, 3]
  half_deleted = tmp_path / 'checkpoints' / '1'  # Orbax deletes 1 only once 2 and 3 are complete
  (half_deleted / 'default').mkdir(parents=True)
  tiny_config.train.num_train_steps = 4
  train.train_and_evaluate(Run.create(tiny_config, tmp_path))
  assert steps_in(tmp_path) == [3, 4]
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['3', '4']


def test_a_checkpoint_of_another_model_is_a_clear_error(tiny_config, tmp_path):
  tiny_config.train.update(num_train_steps=1, checkpoint_every_steps=1)
  train.train_and_evaluate(Run.create(tiny_config, tmp_path))
  wider = tiny_config.copy_and_resolve_references()
  wider.model.ch = 64
  with pytest.raises(SetupError, match='holds another model than the config describes'):
    latest_state(wider, tmp_path)
  assert steps_in(tmp_path) == [1]  # nothing renamed or lost
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['model']['ch'] == 32


@pytest.mark.slow
def test_a_diverging_run_through_the_cli_is_one_clear_error(data_dir, tmp_path):
  """With its own exit status (3), not a setting's (2): scripts and the TPU watcher tell them
  apart."""
  flags = tiny_flags(data_dir, tmp_path / 'run', 8)
  proc = run_main(*flags, '--config.optim.learning_rate=1e6', '--config.optim.grad_clip=0')
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == errors.DIVERGED_EXIT_STATUS == 3, out[-3000:]
  assert 'error: Training diverged: the loss or the gradients are not finite from step' in out
  assert 'Traceback' not in out and 'Lower --config.optim.learning_rate' in out
