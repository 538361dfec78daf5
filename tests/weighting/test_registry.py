"""Every registered method: the contract, adversarial inputs, and one real train step each.

A method added to the registry is covered here without a line of test code; its own file
checks its paper's equations.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtjax import weighting
from mtjax.train import step as step_lib
from tests.helpers import scenes, tiny_trainer

NAMES = weighting.names()
GRAD_METHODS = [n for n in NAMES if weighting.get(n).level == "gradient"]

ADVERSARIAL = {
    "conflicting": np.array([[1.0, 0.2, 0.0], [-1.0, 0.3, 0.1]]),
    "one_100x": np.array([[100.0, 0.0, 1.0], [0.0, 1.0, 0.5]]),
    "identical": np.array([[0.3, -0.2, 1.0], [0.3, -0.2, 1.0]]),
    "one_zero": np.array([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]]),
    "all_zero": np.zeros((3, 3)),
    "tiny": 1e-20 * np.array([[1.0, 2.0, 0.0], [-1.0, 0.5, 3.0]]),
    "single_task": np.array([[0.5, -1.0, 2.0]]),
}


def test_every_method_has_a_level_and_defaults():
  assert len(NAMES) >= 22
  for name in NAMES:
    method = weighting.get(name)
    assert method.level in weighting.LEVELS, name
  with pytest.raises(ValueError, match=r"unknown weighting method 'nope'.*'pcgrad'"):
    weighting.get("nope")
  with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['c'\]"):
    weighting.get("pcgrad", c=0.5)


@pytest.mark.parametrize("name", [n for n in NAMES if weighting.get(n).level != "meta"])
def test_contract_on_adversarial_inputs(name):
  method = weighting.get(name)
  update = jax.jit(method.update)
  for case, grads in ADVERSARIAL.items():
    grads = jnp.asarray(grads, jnp.float32)
    num_tasks = grads.shape[0]
    tree = {"w": grads[:, :2].reshape(num_tasks, 1, 2), "b": grads[:, 2:]}
    grads_like = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape[1:]), tree)
    state = method.init(num_tasks, grads_like)
    losses = jnp.linspace(1.0, 2.0, num_tasks)
    for _ in range(2):  # stateful methods: the second call uses the updated state
      combined, state, weights = update(tree, state, losses=losses, key=jax.random.PRNGKey(3))
      assert weights.shape == (num_tasks,), (name, case)
      assert jax.tree_util.tree_structure(combined) == jax.tree_util.tree_structure(grads_like)
      for leaf in jax.tree_util.tree_leaves((combined, state)):
        assert np.all(np.isfinite(np.asarray(leaf, np.float32))), (name, case)
      if method.level == "loss":
        assert update(None, state, losses=losses, key=jax.random.PRNGKey(3))[0] is None


@pytest.mark.parametrize("name", NAMES)
def test_one_train_step_per_method(name):
  """Each method drives a real step: finite loss, finite weights (GradDrop: NaN by design)."""
  tasks = ("segmentation", "depth", "normals")
  method = weighting.get(name)
  level = "representation" if method.level == "gradient" else "parameter"
  trainer, state, mesh = tiny_trainer(method, level, jax.devices()[:2], tasks, batch=4, size=16,
                                      optimizer=optax.adam(1e-3), lookahead_lr=1e-3)
  batch = step_lib.shard_batch(scenes(4, size=16), mesh)
  new_state, metrics = trainer.step(state, batch, batch if method.level == "meta" else None)
  assert int(new_state.step) == 1
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  weights = np.array([float(metrics[f"weight/{t}"]) for t in tasks])
  assert np.all(np.isfinite(weights)) or name in ("graddrop", "db_mtl")
