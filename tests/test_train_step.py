"""The train step's calls: k steps per call, metrics merged on device, and remat equivalence."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import parallel, train_step
from diffusion_jax.models import UNet

from conftest import fixed_batch, setup

SMALL = dict(ch=32, out_ch=1, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))


def test_one_call_of_k_steps_equals_k_calls_merged_on_device(tiny_config):
  tiny_config.model.dropout = 0.1  # the dropout keys must follow the step, not the call
  images = fixed_batch(tiny_config, 3)
  mesh, state, step = setup(tiny_config)
  scanned, scanned_metrics = step(state, parallel.shard_steps(mesh, images))

  mesh, state, step = setup(tiny_config)
  running = train_step.empty_metrics(mesh)
  for k in range(3):
    state, running = step(state, parallel.shard_steps(mesh, images[k : k + 1]), running)

  assert int(scanned.step) == int(state.step) == 3
  trees = [jax.device_get((s.params, s.ema_params, s.opt_state)) for s in (scanned, state)]
  # XLA fuses the scanned steps differently: float32 reordering, magnified by Adam's 1/√v on the
  # near-zero-initialized layers (as in the sharded-step test of test_train.py).
  chex.assert_trees_all_close(*trees, rtol=1e-4, atol=6e-5)
  chex.assert_trees_all_close(scanned_metrics.compute(), running.compute(), rtol=1e-5)
  assert int(running.loss.count) == int(scanned_metrics.loss.count) == 3
  assert int(running.first_nonfinite_step.compute()) == train_step.NO_STEP


def test_metrics_stay_on_device_and_the_trace_does_not_grow_with_k(tiny_config):
  mesh, state, step = setup(tiny_config)
  running = train_step.empty_metrics(mesh)
  lines = {}
  for k in (2, 5):
    images = parallel.shard_steps(mesh, fixed_batch(tiny_config, k))
    lines[k] = str(step.trace(state, images, running).jaxpr).count('\n')
  assert lines[2] == lines[5], lines  # one scan merges the steps' metrics: no unrolled loop

  state, running = step(state, images, running)
  leaves = jax.tree.leaves(running)
  assert leaves and all(isinstance(leaf, jax.Array) for leaf in leaves)
  assert all(leaf.sharding.is_fully_replicated for leaf in leaves)
  assert all(leaf.committed for leaf in leaves)  # results of the step, not host values
  assert int(running.loss.count) == 5
  state, running = step(state, images, running)  # the merged metrics feed the next call
  assert int(running.loss.count) == 10 and int(state.step) == 10


def test_empty_metrics_merge_as_nothing(tiny_config):
  mesh, state, step = setup(tiny_config)
  images = parallel.shard_steps(mesh, fixed_batch(tiny_config, 1))
  _, alone = step(state, images)
  mesh, state, step = setup(tiny_config)
  _, merged = step(state, images, train_step.empty_metrics(mesh))
  chex.assert_trees_all_close(alone.compute(), merged.compute(), rtol=0)
  assert jax.tree.structure(alone) == jax.tree.structure(train_step.empty_metrics(mesh))


@pytest.fixture(scope='module')
def remat_pair():
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 1), minval=-1.0, maxval=1.0)
  t = jnp.array([3, 999], jnp.int32)
  models = [UNet(**SMALL, dropout=0.1, remat=remat) for remat in (False, True)]
  params = [jax.jit(m.init)(jax.random.key(0, impl='rbg'), x, t)['params'] for m in models]
  return models, params, x, t


def test_remat_keeps_the_parameter_tree_and_values(remat_pair):
  _, (plain, remat), _, _ = remat_pair
  assert jax.tree.structure(plain) == jax.tree.structure(remat)
  chex.assert_trees_all_equal(plain, remat)  # same names, shapes, dtypes and initial values


def test_remat_gives_the_same_outputs_and_gradients(remat_pair):
  (plain_model, remat_model), (params, _), x, t = remat_pair
  key = jax.random.key(2)

  def loss_and_grad(model):
    def loss(p):
      out = model.apply({'params': p}, x, t, train=True, rngs={'dropout': key})
      return jnp.mean(out**2), out

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (plain_loss, plain_out), plain_grads = loss_and_grad(plain_model)
  (remat_loss, remat_out), remat_grads = loss_and_grad(remat_model)
  np.testing.assert_array_equal(np.asarray(plain_out), np.asarray(remat_out))  # same dropout
  np.testing.assert_allclose(float(plain_loss), float(remat_loss), rtol=1e-6)
  chex.assert_trees_all_close(plain_grads, remat_grads, rtol=1e-4, atol=1e-9)


def test_remat_train_step_matches(tiny_config):
  results = []
  for remat in (False, True):
    tiny_config.model.remat = remat
    mesh, state, step = setup(tiny_config)
    state, metrics = step(state, parallel.shard_steps(mesh, fixed_batch(tiny_config, 1)))
    results.append((jax.device_get(state.params), metrics.compute()))
  (plain, plain_metrics), (remat, remat_metrics) = results
  np.testing.assert_allclose(plain_metrics['loss'], remat_metrics['loss'], rtol=1e-6)
  chex.assert_trees_all_close(plain, remat, rtol=1e-4, atol=6e-5)


def test_labels_dropped_always_are_the_null_class_and_never_are_the_labels(tiny_config):
  """``train.p_uncond`` = 1 trains the unconditional model alone; 0 the conditional one alone."""
  tiny_config.model.num_classes = 10
  images = fixed_batch(tiny_config, 1)
  labels = np.arange(images.shape[1], dtype=np.int32)[None] % 10
  states = {}
  for p_uncond, given in ((1.0, labels), (0.0, np.full_like(labels, 10)), (0.0, labels)):
    tiny_config.train.p_uncond = p_uncond
    mesh, state, step = setup(tiny_config)
    shard = parallel.shard_steps
    state, _ = step(state, shard(mesh, images), None, shard(mesh, given))
    states[p_uncond, int(given[0, 1])] = jax.device_get(state.opt_state)  # lr is 0 at step 0
  chex.assert_trees_all_equal(states[1.0, 1], states[0.0, 10])  # every label dropped: all null
  with pytest.raises(AssertionError):
    chex.assert_trees_all_equal(states[0.0, 1], states[0.0, 10])  # the labels matter
