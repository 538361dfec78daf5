"""The data-parallel train step and eval step (one ``jax.jit`` over a ``Mesh``).

Per-task gradients come from one forward pass: the shared features are computed once, each
task's loss is back-propagated through its own head only (its cotangent is one, or the task's
weight for loss-level methods), and the T feature cotangents are either combined by the method
(representation level, one backward through the backbone) or pushed through the backbone with
one ``jax.vmap`` over its VJP (parameter level). Heads get the gradient of ``Σ_t L_t`` under
gradient-level methods (each head sees only its own loss, as in LibMTL), and of ``Σ_t w_t L_t``
under loss-level ones.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mtjax.models.multitask import SHARED, head_scope, merge_params, split_params
from mtjax.train.state import TrainState

GRAD_LEVELS = ("parameter", "representation")


def make_mesh(devices=None) -> Mesh:
  """A one-axis mesh ``("data",)`` over ``devices`` (default: all)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), ("data",))


def shard_batch(batch, mesh: Mesh):
  """Places a host batch on ``mesh``, split along its leading axis."""
  return jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data")))


def replicate(tree, mesh: Mesh):
  """Copies ``tree`` onto every device of ``mesh``, one fresh buffer per leaf (donatable)."""
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.tree_util.tree_map(lambda x: jax.device_put(np.array(x), replicated), tree)


def _collection(variables, scope):
  return {scope: variables[scope]} if scope in variables else {}


def task_forward(model, tasks, params, batch_stats, batch):
  """Shared features and per-task VJPs of one forward pass (the first half of a train step).

  Returns ``(losses (T,), features, encode_vjp, head_vjps, new_batch_stats, outputs)``.
  """
  images = batch["image"]
  output_size = images.shape[1:3]
  shared, heads = split_params(params, tasks)

  def encode(p):
    variables = {"params": {SHARED: p}, "batch_stats": _collection(batch_stats, SHARED)}
    features, updates = model.apply(variables, images, True, method="encode",
                                    mutable=["batch_stats"])
    return features, updates["batch_stats"]

  features, encode_vjp, new_stats = jax.vjp(encode, shared, has_aux=True)
  new_stats = dict(new_stats)
  losses, head_vjps, outputs = [], [], {}
  for name, task in tasks.items():
    scope = head_scope(name)

    def head_loss(p, f, name=name, task=task, scope=scope):
      variables = {"params": {scope: p}, "batch_stats": _collection(batch_stats, scope)}
      out, updates = model.apply(variables, f, name, output_size, True, method="decode",
                                 mutable=["batch_stats"])
      return task.loss_fn(out, batch).astype(jnp.float32), (updates["batch_stats"], out)

    loss, head_vjp, (stats, out) = jax.vjp(head_loss, heads[name], features, has_aux=True)
    losses.append(loss)
    head_vjps.append(head_vjp)
    new_stats.update(stats)
    outputs[name] = out
  return jnp.stack(losses), features, encode_vjp, head_vjps, new_stats, outputs


def task_gradients(model, tasks, method, grad_level, state: TrainState, batch, key):
  """The combined gradient of all parameters, the new weighting state, losses and weights."""
  losses, _, encode_vjp, head_vjps, new_stats, _ = task_forward(
      model, tasks, state.params, state.batch_stats, batch)
  wstate = state.weighting_state
  if method.level == "loss":
    _, wstate, weights = method.update(None, wstate, losses=losses, key=key)
    cotangents = jax.lax.stop_gradient(weights).astype(losses.dtype)
  elif method.level == "gradient":
    cotangents = jnp.ones_like(losses)
  else:
    raise ValueError(f"weighting level {method.level!r} needs its own train step "
                     "(see mtjax.train.meta for 'meta')")
  head_grads, feature_grads = {}, []
  for i, (name, head_vjp) in enumerate(zip(tasks, head_vjps, strict=True)):
    head_grads[name], feature_grad = head_vjp(cotangents[i])
    feature_grads.append(feature_grad)
  if method.level == "loss":
    (shared_grads,) = encode_vjp(sum(feature_grads))
  elif grad_level == "representation":
    combined, wstate, weights = method.update(jnp.stack(feature_grads), wstate, losses=losses,
                                              key=key)
    (shared_grads,) = encode_vjp(combined)
  else:
    (per_task,) = jax.vmap(encode_vjp)(jnp.stack(feature_grads))
    shared_grads, wstate, weights = method.update(per_task, wstate, losses=losses, key=key)
  return merge_params(shared_grads, head_grads), wstate, new_stats, losses, weights


def make_train_step(model, tasks, method, optimizer, *, grad_level="parameter", mesh=None,
                    donate=True):
  """A jitted ``step(state, batch) -> (state, metrics)``, data-parallel over ``mesh``.

  ``tasks`` maps task names to :class:`mtjax.tasks.Task`; ``method`` is a weighting method;
  ``optimizer`` an optax ``GradientTransformation``. The batch is sharded on the mesh's
  ``"data"`` axis and everything else replicated; the state's buffers are donated.
  """
  if grad_level not in GRAD_LEVELS:
    raise ValueError(f"grad_level: expected one of {GRAD_LEVELS}, got {grad_level!r}")
  names = tuple(tasks)

  def step(state: TrainState, batch):
    key = jax.random.fold_in(state.key, state.step)
    grads, wstate, batch_stats, losses, weights = task_gradients(
        model, tasks, method, grad_level, state, batch, key)
    return apply_gradients(state, optimizer, names, grads, wstate, batch_stats, losses, weights)

  return jit_step(step, mesh, donate)


def apply_gradients(state: TrainState, optimizer, names, grads, weighting_state, batch_stats,
                    losses, weights):
  """The optimizer update that ends a train step, and the step's metrics."""
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": jnp.sum(losses), "grad_norm": optax.tree_utils.tree_norm(grads)}
  for i, name in enumerate(names):
    metrics[f"loss/{name}"] = losses[i]
    metrics[f"weight/{name}"] = weights[i]
  new_state = TrainState(state.step + 1, params, batch_stats, opt_state, weighting_state,
                         state.key)
  return new_state, metrics


def jit_step(step, mesh=None, donate=True):
  """``jax.jit`` of ``step(state, batch)``: state replicated, batch sharded on ``"data"``."""
  mesh = make_mesh() if mesh is None else mesh
  replicated = NamedSharding(mesh, PartitionSpec())
  data = NamedSharding(mesh, PartitionSpec("data"))
  return jax.jit(step, in_shardings=(replicated, data), out_shardings=replicated,
                 donate_argnums=(0,) if donate else ())


def make_eval_step(model, tasks, *, mesh=None):
  """A jitted ``eval_step(state, batch) -> {task: {metric: (sum, count)}}``."""
  def eval_step(state: TrainState, batch):
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    outputs = model.apply(variables, batch["image"], train=False)
    return {name: task.metrics_fn(outputs[name], batch) for name, task in tasks.items()}

  return jit_step(eval_step, mesh, donate=False)
