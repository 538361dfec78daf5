"""The weighting-method contract and the tree helpers every method shares.

A method is a pair of pure functions, in the style of an optax ``GradientTransformation``:

    state = method.init(num_tasks, grads_like=None)
    combined, state, weights = method.update(task_grads, state, *, losses, key)

``task_grads`` is any pytree whose leaves carry a leading task axis ``T`` (a plain ``(T, D)``
Jacobian works), or ``None`` for loss-level methods called by the train step, in which case
``combined`` is ``None`` and the train step back-propagates ``Σ_t weights_t L_t``.
``weights`` has shape ``(T,)``: the effective task weights, for logging (NaN where a method has
none). ``grads_like`` is an optional pytree shaped like one task's gradient (no task axis); the
train step always passes it, and methods that keep per-task gradient statistics (MoCo, DB-MTL)
need it. ``level`` is one of ``"loss"``, ``"gradient"``, ``"meta"``.

A meta-level method also carries a :class:`MetaSpec` (``method.meta``): what it learns, how
that gives the task weights of the lower-level step, and its upper-level objective. The train
step (:mod:`mtjax.train.meta`) computes the meta information the spec asks for and hands it to
``update`` as ``task_grads``; ``update`` returns ``combined = None`` (the model's gradient is
``∇ Σ_t weights_t L_t`` on the train batch) or a :class:`MetaDirection`.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

LEVELS = ("loss", "gradient", "meta")


META_KINDS = ("lookahead", "value_function")


class MetaSpec(NamedTuple):
  """What a meta-level method learns and which meta information its ``update`` receives.

  * ``learned(state) -> pytree``: the upper-level variables (Auto-Lambda: the weights λ;
    weight_net: the network's parameters φ; MOML, FORUM: the logits α).
  * ``weights(learned, state, losses) -> (T,)``: the task weights of the lower-level (train
    batch) objective ``Σ_t weights_t L_t``, a pure function of ``learned``; ``losses`` are the
    train-batch losses at the current parameters (constants: no gradient flows into them).
  * ``objective(state, meta_losses) -> scalar or (K,)``: the upper-level loss from the meta
    batch's ``(T,)`` task losses (Auto-Lambda: the primary tasks' sum; MOML: all ``T`` of them).
  * ``kind``: ``"lookahead"``: ``update`` receives the exact derivative of ``objective`` after
    one virtual SGD step ``θ' = θ − α ∇_θ Σ_t weights_t L_t`` with respect to ``learned`` (a
    pytree like ``learned``, with a leading ``K`` axis when ``objective`` returns ``(K,)``);
    ``"value_function"``: first-order information for a value-function reformulation
    (:class:`ValueFunctionInfo`, FORUM), no derivative through the lookahead.
  * ``lookahead_lr``: the virtual step's learning rate α; ``None``: the trainer's
    ``lookahead_lr`` (the optimizer's current learning rate).
  * ``inner_steps``: the number of virtual SGD steps (``"value_function"`` only; ``"lookahead"``
    takes one).
  * ``trains_on_meta``: ``update`` returns a :class:`MetaDirection`, so the model's weights move
    along the meta batch's gradients too (FORUM). The train step then takes the lower-level
    and the meta batch as the two halves of one train batch (LibMTL's ``train_bilevel``), no
    meta batch is drawn, and ``config.meta_split="validation"`` is refused (it would train the
    model on the validation set).
  """

  learned: Callable[[Any], Any]
  weights: Callable[[Any, Any, jax.Array], jax.Array]
  objective: Callable[[Any, jax.Array], jax.Array]
  kind: str = "lookahead"
  lookahead_lr: float | None = None
  inner_steps: int = 1
  trains_on_meta: bool = False


class ValueFunctionInfo(NamedTuple):
  """First-order information of one step for a value-function method (FORUM), all float32.

  With ``f(α, ω) = Σ_t weights_t(α) L_t(ω; train)``, ``ω`` every model parameter and ``ω^K``
  ``inner_steps`` SGD steps on ``f(α, ·)`` from ``ω``; ``F_t(ω) = L_t(ω; meta batch)``:
  """

  losses: jax.Array        # (T,) L_t(ω) on the train batch
  inner_losses: jax.Array  # (T,) L_t(ω^K) on the train batch
  meta_gram: jax.Array     # (T, T) <∇_ω F_i, ∇_ω F_j>
  cross: jax.Array         # (T,) <∇_ω F_t, ∇_ω f>
  inner_sq: jax.Array      # () |∇_ω f|²


class MetaDirection(NamedTuple):
  """The model's gradient of a meta-level step as loss coefficients:
  ``∇ (Σ_t train_t L_t(θ; train batch) + Σ_t meta_t L_t(θ; meta batch))``."""

  train: jax.Array
  meta: jax.Array


class Method(NamedTuple):
  """A task-balancing method: pure ``init``/``update``, the information ``level`` it needs,
  for a meta-level method its :class:`MetaSpec` (``None`` otherwise), and for a gradient-level
  method whose direction is ``Σ_t w_t g_t`` with ``w`` a function of the Gram matrix only, that
  function ``from_gram(gram, state, *, losses, key) -> (weights, state)`` (``None`` otherwise;
  ``update`` is then :func:`gram_update` of it, and the train step may compute the Gram matrix
  in chunks of tasks instead of stacking every task's gradient, see ``config.task_chunk``).
  ``double_sampling`` (a ``from_gram`` method only): the train step hands ``from_gram`` the
  cross Gram matrix ``C_ij = <g_i(z₁), g_j(z₂)>`` of two independent halves of the batch instead
  of the Gram matrix, and moves along ``Σ_t w_t g_t`` of the whole batch (MoDo; see
  :func:`mtjax.train.step.cross_gram`); ``update`` called directly stays the one-sample rule."""

  init: Callable[..., Any]
  update: Callable[..., tuple[Any, Any, jax.Array]]
  level: str
  meta: MetaSpec | None = None
  from_gram: Callable[..., tuple[jax.Array, Any]] | None = None
  double_sampling: bool = False


class EmptyState(NamedTuple):
  """State of a method that keeps none."""


def stateless_init(num_tasks, grads_like=None) -> EmptyState:
  """``init`` of a method that keeps no state."""
  del num_tasks, grads_like
  return EmptyState()


def num_tasks_of(task_grads) -> int:
  """The size of the leading task axis shared by every leaf of ``task_grads``."""
  leaves = jax.tree_util.tree_leaves(task_grads)
  if not leaves:
    raise ValueError("task_grads: expected a pytree with at least one array leaf, got none")
  sizes = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(
        "task_grads: every leaf must carry the same leading task axis T, got leading sizes "
        f"{sorted(str(s) for s in sizes)}")
  return sizes.pop()


def gram(task_grads) -> jax.Array:
  """The ``(T, T)`` Gram matrix ``G_ij = <g_i, g_j>``, in float32, summed leaf by leaf."""
  def leaf_gram(g):
    g = g.reshape(g.shape[0], -1).astype(jnp.float32)
    return jnp.einsum("id,jd->ij", g, g, precision=jax.lax.Precision.HIGHEST)
  return sum(leaf_gram(g) for g in jax.tree_util.tree_leaves(task_grads))


def weighted_sum(task_grads, weights: jax.Array):
  """``Σ_t weights_t g_t``, leaf by leaf; the task axis is removed. Keeps each leaf's dtype."""
  weights = jnp.asarray(weights, jnp.float32)
  def leaf_sum(g):
    out = jnp.tensordot(weights, g.astype(jnp.float32), axes=(0, 0),
                        precision=jax.lax.Precision.HIGHEST)
    return out.astype(g.dtype)
  return jax.tree_util.tree_map(leaf_sum, task_grads)


def gram_update(from_gram):
  """The ``update`` of a Gram-matrix method: ``from_gram`` on :func:`gram`, then
  :func:`weighted_sum` with the weights it gives."""
  def update(task_grads, state, *, losses=None, key=None):
    weights, state = from_gram(gram(task_grads), state, losses=losses, key=key)
    return weighted_sum(task_grads, weights), state, weights
  return update


def gram_method(init, from_gram) -> Method:
  """A gradient-level :class:`Method` whose weights are ``from_gram(gram, state, *, losses,
  key) -> (weights, state)``; its ``update`` is :func:`gram_update` of it."""
  return Method(init, gram_update(from_gram), "gradient", None, from_gram)


def tree_map_tasks(fn, task_grads):
  """Applies ``fn`` to each task's flat gradient: ``fn`` maps ``(T, D)`` to ``(T, D)``.

  For element-wise or per-task-vector rules (GradDrop, PCGrad written on vectors) that need the
  flat vectors; most methods only need :func:`gram` and :func:`weighted_sum`.
  """
  leaves, treedef = jax.tree_util.tree_flatten(task_grads)
  num_tasks = num_tasks_of(task_grads)
  flat = jnp.concatenate([x.reshape(num_tasks, -1).astype(jnp.float32) for x in leaves], axis=1)
  out = fn(flat)
  pieces, start = [], 0
  for leaf in leaves:
    size = leaf[0].size
    pieces.append(out[:, start:start + size].reshape(leaf.shape).astype(leaf.dtype))
    start += size
  return jax.tree_util.tree_unflatten(treedef, pieces)


def combine_or_none(task_grads, weights: jax.Array):
  """``weighted_sum`` for a loss-level method, or ``None`` when called with losses only."""
  return None if task_grads is None else weighted_sum(task_grads, weights)


# Floor for losses and loss ratios before a division or a log.
TINY = 1e-12
# Below any float32 Gram entry worth solving for: gradients of 1e-20 square to 0 in float32.
GRAM_TINY = 1e-30


def safe_sqrt(x: jax.Array) -> jax.Array:
  """``sqrt(max(x, 0))``, exactly 0 at and below 0, with a finite gradient there."""
  x = jnp.maximum(x, 0.0)
  return jnp.where(x > 0, jnp.sqrt(jnp.where(x > 0, x, 1.0)), 0.0)


def safe_div(x: jax.Array, y: jax.Array, eps: float = GRAM_TINY) -> jax.Array:
  """``x / y`` where ``|y| > eps``, else 0 (value and gradient stay finite)."""
  ok = jnp.abs(y) > eps
  return jnp.where(ok, x / jnp.where(ok, y, 1.0), 0.0)


def safe_norm(x: jax.Array, axis=-1) -> jax.Array:
  """Euclidean norm whose value and gradient stay finite at zero."""
  return safe_sqrt(jnp.sum(jnp.square(x), axis=axis))


def adam_step(params, grad, mu, nu, count, lr, b1=0.9, b2=0.999, eps=1e-8):
  """One step of ``optax.adam`` (Kingma & Ba, 2015; the same rule as ``torch.optim.Adam``).

  For the small learnable vectors some methods keep in their own NamedTuple state (FAMO's
  logits, GradNorm's weights, Auto-Lambda's weights). Returns ``(params, mu, nu, count)``.
  """
  adam = optax.adam(lr, b1=b1, b2=b2, eps=eps)
  updates, (state, _) = adam.update(grad, (optax.ScaleByAdamState(count, mu, nu),
                                           optax.EmptyState()))
  return params + updates, state.mu, state.nu, state.count
