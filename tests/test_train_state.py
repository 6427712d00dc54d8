"""The train state: creation, the optimizer step with its EMA, checkpoints of earlier layouts."""

import hashlib
import json
import shutil

import chex
import jax
import numpy as np
import optax
import pytest

from diffusion_jax import parallel, train_state, train_step
from diffusion_jax.run import Run

from conftest import REPO, load_config

pytestmark = pytest.mark.stack  # the subset CI runs on every supported Python

# Written by the first layout (before train_state.py existed): a tiny digits U-Net after one
# train step on 2 devices, saved as step 1, with a SHA-256 of every leaf of the saved state.
OLD_CHECKPOINT = REPO / 'tests' / 'data' / 'old_layout_checkpoint'


def old_layout_config():
  """The config that wrote OLD_CHECKPOINT."""
  config = load_config('digits.py')
  config.model.update(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=())
  config.diffusion.num_diffusion_timesteps = 20
  return config


def leaf_digests(state) -> dict[str, dict]:
  """Path -> shape, dtype and SHA-256 of every leaf, as state_leaves.json records them."""
  return {
    jax.tree_util.keystr(path): {
      'shape': list(np.shape(leaf)),
      'dtype': str(np.asarray(leaf).dtype),
      'sha256': hashlib.sha256(np.ascontiguousarray(leaf).tobytes()).hexdigest(),
    }
    for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(state))
  }


def restore_old_checkpoint(tmp_path) -> train_state.TrainState:
  workdir = tmp_path / 'run'
  shutil.copytree(OLD_CHECKPOINT, workdir)
  return Run.create(old_layout_config(), workdir).restore_latest()


def test_checkpoint_of_the_first_layout_restores_bit_for_bit(tmp_path):
  state = restore_old_checkpoint(tmp_path)
  expected = json.loads((OLD_CHECKPOINT / 'state_leaves.json').read_text())
  assert int(state.step) == 1
  assert leaf_digests(state) == expected  # the same tree paths, shapes, dtypes and bytes


def test_one_step_of_this_layout_reproduces_the_first_layouts_state(tmp_path):
  """Init, per-example draws, per-device clipping, Adam and EMA are unchanged: the first layout's
  train step, on its 2 devices and batch, gives its checkpoint. The init and the step's draws
  are bit for bit; the gradient sums only to float32 rounding, whose order XLA:CPU chooses by
  CPU and release (a checkpoint written elsewhere differs in the last bits of Adam's moments)."""
  config = old_layout_config()
  run = Run.create(config, devices=jax.devices()[:2])
  step = train_step.make_train_step(run)
  images = np.random.default_rng(0).uniform(-1, 1, (1, 8, 8, 8, 1)).astype(np.float32)
  # The first layout drew the train stream from PRNGKey(seed); today's streams fold the name in.
  initial = run.initial_state().replace(rng=jax.random.PRNGKey(config.seed))
  state, _ = step(initial, parallel.shard_steps(run.mesh, images))
  old = restore_old_checkpoint(tmp_path)
  state, old = jax.device_get((state, old))
  assert int(state.step) == int(old.step) == 1
  np.testing.assert_array_equal(state.rng, old.rng)
  chex.assert_trees_all_equal(state.params, old.params)  # lr is 0 at the first step (warm-up)
  chex.assert_trees_all_equal(state.ema_params, old.ema_params)
  chex.assert_trees_all_close(state.opt_state, old.opt_state, rtol=1e-4, atol=1e-9)


def test_create_copies_params_into_the_ema_and_starts_at_step_0():
  params = {'w': np.arange(3.0, dtype=np.float32)}
  tx = optax.sgd(0.5)
  state = train_state.TrainState.create(
    params=params, tx=tx, ema_decay=0.9, rng=jax.random.PRNGKey(0)
  )
  assert int(state.step) == 0
  chex.assert_trees_all_equal(state.ema_params, params)
  chex.assert_trees_all_equal(state.opt_state, tx.init(params))


def test_apply_gradients_steps_the_optimizer_then_the_ema():
  params = {'w': np.array([1.0, -2.0], np.float32)}
  state = train_state.TrainState.create(
    params=params, tx=optax.sgd(0.5), ema_decay=0.9, rng=jax.random.PRNGKey(0)
  )
  state = state.apply_gradients({'w': np.array([2.0, 2.0], np.float32)})
  new = np.array([0.0, -3.0], np.float32)  # w - 0.5 * g
  assert int(state.step) == 1
  np.testing.assert_allclose(state.params['w'], new)
  np.testing.assert_allclose(state.ema_params['w'], 0.9 * params['w'] + 0.1 * new, rtol=1e-6)


def test_the_optimizer_and_ema_decay_are_not_part_of_the_checkpointed_tree():
  abstract = Run.create(old_layout_config()).abstract_state()
  tops = {
    jax.tree_util.keystr(path[:1]) for path, _ in jax.tree_util.tree_leaves_with_path(abstract)
  }
  assert tops == {'.step', '.params', '.ema_params', '.opt_state', '.rng'}
