"""Auxiliary losses from a model (the ``"aux_losses"`` collection) and DSelect-k's entropy
regulariser that uses them.

Evidence: the value of DSelect-k's term against ``λ · -Σ r log(r + 1e-6)`` of the selectors the
gate returns (the authors' ``EntropyRegularizer``), its gradient against ``jax.grad`` of the
sown values (it reaches the gates and, through the gate input, the trunk; not the heads), on
both paths of :func:`mtjax.train.step.task_terms` (encoder and general), and one SGD step whose
update is ``lr · (Σ_t w_t ∇L_t + ∇ aux)``: the term is added after the task weighting.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtjax import models, weighting
from mtjax.models import experts, labels
from mtjax.models.multitask import AUX_LOSSES
from mtjax.train import step as step_lib
from mtjax.train.trainer import make_trainer
from tests.helpers import scenes, tiny_tasks

TASKS = ("segmentation", "depth")
SIZE, BATCH = 16, 4
KW = dict(width=4, output_stride=4, stem="small", head_hidden=4)
REG = 0.05  # large enough to move the selectors in a few steps


def _dselect_k(entropy_reg=REG):
  tasks = tiny_tasks(TASKS)
  return models.build("resnet_tiny", tasks, architecture="dselect_k", entropy_reg=entropy_reg,
                      **KW), tasks


def _batch():
  return {k: jnp.asarray(v) for k, v in scenes(BATCH, SIZE).items()}


def _variables(model, batch):
  return model.init(jax.random.PRNGKey(1), batch["image"], train=False)


def _sown_sum(model, params, batch_stats, images):
  """``Σ`` of what a training pass sows into ``"aux_losses"``: the reference for its gradient."""
  _, updates = model.apply({"params": params, "batch_stats": batch_stats}, images, True,
                           mutable=["batch_stats", AUX_LOSSES])
  return sum(jnp.sum(v) for v in jax.tree_util.tree_leaves(updates[AUX_LOSSES]))


def _check_grad(got, want):
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()) + 1e-12)


def test_dselect_k_entropy_value_and_gradient():
  model, tasks = _dselect_k()
  batch = _batch()
  variables = _variables(model, batch)
  off, _ = _dselect_k(0.0)

  @jax.jit
  def run(variables, batch):
    params, stats = variables["params"], variables["batch_stats"]
    terms = step_lib.task_terms(model, tasks, params, stats, batch)
    _, inter = model.apply(variables, batch["image"], True,
                           mutable=["batch_stats", "intermediates"],
                           capture_intermediates=lambda m, _: isinstance(m, experts.DSelectKGate))
    want_grad = jax.grad(_sown_sum, argnums=1)(model, params, stats, batch["image"])
    evaluation = step_lib.task_terms(model, tasks, params, stats, batch, train=False)
    unregularised = step_lib.task_terms(off, tasks, params, stats, batch)
    assert evaluation.aux_losses == {} and unregularised.aux_grad is None
    return terms.aux_losses, terms.aux_grad(), inter["intermediates"], want_grad

  aux_losses, grad, inter, want_grad = jax.device_get(run(variables, batch))
  assert set(aux_losses) == {f"dselect_k/{t}/entropy" for t in TASKS}

  # The value: λ · -Σ r log(r + 1e-6) over (B, k, E) of each task's gate output, in float64.
  for t in TASKS:
    (_, extras), = inter[f"gates_{t}"]["__call__"]
    r = np.asarray(extras["selectors"], np.float64)
    assert r.shape == (BATCH, 2, 4)
    want = REG * -np.sum(r * np.log(r + 1e-6))
    assert want > 0.05 * REG  # near-uniform selectors at initialisation: far from 0
    np.testing.assert_allclose(float(aux_losses[f"dselect_k/{t}/entropy"]), want, rtol=1e-5)

  # The gradient: that of the sown sum, everywhere; it reaches each gate and the trunk (the
  # gate input), and not the heads (the entropy does not depend on them). Evaluation passes
  # (checked in `run`) add nothing; entropy_reg=0 sows nothing and costs nothing.
  _check_grad(grad, want_grad)
  for t in TASKS:
    assert np.abs(grad[f"gates_{t}"]["z_logits"]["kernel"]).max() > 0, t
    assert np.abs(grad[f"heads_{t}"]["Conv_0"]["kernel"]).max() == 0, t
  assert max(np.abs(x).max() for x in jax.tree_util.tree_leaves(grad["trunk"])) > 0


class _Penalised(nn.Module):
  """A hard-sharing model behind a plain ``__call__`` (the general path: no ``encode``) that
  sows ``c · Σ w²`` of its stem's kernel as an auxiliary loss."""

  inner: nn.Module
  c: float

  @nn.compact
  def __call__(self, images, train: bool = False):
    out = self.inner(images, train)
    kernel = self.inner.variables["params"]["backbone"]["Conv_0"]["kernel"]
    self.sow(AUX_LOSSES, "stem_l2", self.c * jnp.sum(kernel**2))
    return out

  def param_label(self, path):
    return self.inner.param_label(path[1:])


def test_general_path_aux_loss_and_its_gradient():
  tasks = tiny_tasks(TASKS)
  model = _Penalised(models.build("resnet_tiny", tasks, **KW), 0.3)
  assert not step_lib.has_shared_encoder(model)
  batch = _batch()
  variables = _variables(model, batch)

  @jax.jit
  def run(params, stats, batch):
    terms = step_lib.task_terms(model, tasks, params, stats, batch)
    task_grads, _ = terms.per_task()
    return (terms.aux_losses, terms.aux_grad(), task_grads,
            labels.split(model, terms.combine(jnp.ones(2)))["shared"])

  aux_losses, grad, task_grads, combined = jax.device_get(
      run(variables["params"], variables["batch_stats"], batch))
  kernel = variables["params"]["inner"]["backbone"]["Conv_0"]["kernel"]
  np.testing.assert_allclose(float(aux_losses["stem_l2"]), 0.3 * np.sum(kernel**2), rtol=1e-5)
  np.testing.assert_allclose(grad["inner"]["backbone"]["Conv_0"]["kernel"], 0.6 * kernel,
                             rtol=1e-5)
  rest = [x for path, x in jax.tree_util.tree_leaves_with_path(grad)
          if "Conv_0" not in jax.tree_util.keystr(path[:3])]
  assert rest and all(np.all(x == 0) for x in rest)
  # The task terms do not see it: the per-task gradients are those of the task losses.
  _check_grad(jax.tree_util.tree_map(lambda g: g.sum(0), task_grads), combined)


def _sgd_update(model, tasks, state, batch, weights, lr):
  """The aux losses and ``params - lr · (Σ_t w_t ∇L_t + ∇ aux)`` (a plain SGD step)."""
  terms = step_lib.task_terms(model, tasks, state.params, state.batch_stats, batch)
  direction = jax.tree_util.tree_map(jnp.add, terms.combine(weights), terms.aux_grad())
  return terms.aux_losses, jax.tree_util.tree_map(lambda p, g: p - lr * g, state.params,
                                                  direction)


def test_step_adds_the_aux_gradient_after_the_weighting_and_dselect_k_trains():
  """One SGD step's update is ``lr · (Σ_t w_t ∇L_t + ∇ aux)`` with the method's weights (UW's
  are not all 1), ``loss/aux/<name>`` is logged; then the objective and the entropy fall."""
  model, tasks = _dselect_k()
  batch = _batch()
  lr = 0.05
  method = weighting.get("uw")  # learned log-variances: weights ≠ 1 after the first step
  trainer = make_trainer(model, tasks, method, optax.sgd(lr), image_shape=(SIZE, SIZE, 3),
                         batch_size=BATCH, mesh=step_lib.make_mesh(jax.devices()[:1]))
  state = jax.device_get(trainer.init(jax.random.PRNGKey(0)))
  history = []
  for i in range(6):
    before = state
    state, metrics = trainer.step(state, batch)
    state, metrics = jax.device_get(state), jax.device_get(metrics)
    history.append(metrics)
    if i == 1:
      weights = jnp.asarray([metrics[f"weight/{t}"] for t in TASKS])
      aux_losses, want = jax.device_get(jax.jit(
          functools.partial(_sgd_update, model, tasks))(before, batch, weights, lr))
      assert not np.allclose(weights, 1.0), weights
      for t in TASKS:
        np.testing.assert_allclose(metrics[f"loss/aux/dselect_k/{t}/entropy"],
                                   aux_losses[f"dselect_k/{t}/entropy"], rtol=1e-5)
      _check_grad(state.params, want)
  entropy = [sum(float(m[f"loss/aux/dselect_k/{t}/entropy"]) for t in TASKS) for m in history]
  objective = [float(m["loss"]) + e for m, e in zip(history, entropy, strict=True)]
  assert objective[-1] < objective[0], objective
  assert entropy[-1] < entropy[0], entropy
