"""The pieces of a train step: per-task terms of one forward pass, balancing, the update.

:func:`task_terms` runs the model once and returns the task losses with two ways to get
gradients from the same forward pass: ``combine(w)``, the gradient of ``Σ_t w_t L_t`` with
respect to every parameter (one backward pass), and ``per_task()``, the per-task gradients of
the shared part at the chosen level plus a ``finish`` that turns a combined direction into the
full parameter gradient. With an encoder model the shared features are computed once, each task
is back-propagated through its own parameters only, and the T feature cotangents are either
handed to the method (representation level: then one backward through the encoder) or pushed
through the encoder by one ``jax.vmap`` over its VJP (parameter level). A model without a
shared encoder (the general path) gets one ``jax.vmap`` over the VJP of its loss vector.
With many tasks the parameter level can instead run in chunks (``gram_terms(chunk)``, used by
:func:`balance` when ``task_chunk > 0`` for a method with ``from_gram``): task gradients are
linear in the feature cotangents, ``g_t = V c_t`` with ``V`` the encoder's VJP and ``J = Vᵀ``
its JVP, so ``G_ij = <c_i, J V c_j>`` comes from a ``jax.lax.map`` over chunks of tasks (a
``vmap`` of ``V`` then ``J`` per chunk: at most ``chunk`` parameter-sized gradients alive) and
the direction ``Σ_t w_t g_t = V(Σ_t w_t c_t)`` costs one more backward pass through the encoder.
For MoDo's double sampling, :func:`cross_gram` runs :func:`task_terms` on the two halves of the
batch and takes the cross products of their per-task gradients; ``weighted(w)`` is then the
whole batch's ``Σ_t w_t g_t`` without stacking its task gradients.
A task's own parameters get the gradient of ``Σ_t L_t`` under gradient-level methods (each sees
only its own loss, as in LibMTL) and of ``Σ_t w_t L_t`` under loss-level ones.
:func:`mtjax.train.trainer.make_trainer` composes these into the jitted step.
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mtjax import relations as relations_lib
from mtjax.models import labels
from mtjax.models.multitask import AUX_LOSSES, DeepSupervision
from mtjax.tasks import loss_and_parts
from mtjax.train.state import Health, TrainState
from mtjax.weighting.base import weighted_sum

GRAD_LEVELS = ("parameter", "representation")
RELATIONS = "relations"  # the collection models sow task-relation quantities into
# The model's per-step key is fold_in(per-step key, MODEL_KEY_TAG): a stream of its own, so the
# weighting method's key (the per-step key itself) is unchanged by a model that draws noise.
MODEL_KEY_TAG = 0x6D6F6465


MESH_AXES = ("data", "fsdp")


def mesh_shape(shape, num_devices: int) -> dict:
  """``{"data": d, "fsdp": f}`` with ``d * f == num_devices`` from ``shape`` (None: pure data
  parallelism, ``{"data": num_devices, "fsdp": 1}``); one axis may be -1 (the rest).

  Raises ValueError (``mesh: ...``) naming what is wrong, before anything is compiled.
  """
  given = {"data": -1, "fsdp": 1} if shape is None else dict(shape)
  extra = sorted(set(given) - set(MESH_AXES))
  if extra:
    raise ValueError(f"mesh: got axes {extra}; expected only {MESH_AXES} (e.g. "
                     "{'data': -1, 'fsdp': 4})")
  sizes = {axis: given.get(axis, 1) for axis in MESH_AXES}
  bad = {a: s for a, s in sizes.items()
         if not isinstance(s, int) or isinstance(s, bool) or not (s == -1 or s >= 1)}
  if bad or list(sizes.values()).count(-1) > 1:
    raise ValueError(f"mesh: got {sizes}; expected positive ints, at most one of them -1 "
                     "(all the devices left)")
  known = int(np.prod([s for s in sizes.values() if s != -1]))
  if -1 in sizes.values():
    if num_devices % known:
      raise ValueError(f"mesh: got {sizes}: {known} does not divide the {num_devices} "
                       "devices")
    sizes = {a: num_devices // known if s == -1 else s for a, s in sizes.items()}
  elif known != num_devices:
    raise ValueError(f"mesh: got {sizes}: data x fsdp = {known}, but there are {num_devices} "
                     "devices; expected a product equal to the device count (or -1 on one axis)")
  return sizes


def make_mesh(devices=None, shape=None) -> Mesh:
  """A ``("data", "fsdp")`` mesh over ``devices`` (default: all), sized by ``shape`` (see
  :func:`mesh_shape`; default: every device on ``data``, today's pure data parallelism).

  Devices are ordered by process, so each process's devices hold a contiguous block of the
  batch (what :func:`shard_batch` assumes on several hosts).
  """
  devices = jax.devices() if devices is None else list(devices)
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  sizes = mesh_shape(shape, len(devices))
  return Mesh(np.asarray(devices).reshape(sizes["data"], sizes["fsdp"]), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The batch: its leading axis split over every device (``data`` x ``fsdp``)."""
  return NamedSharding(mesh, PartitionSpec(tuple(a for a in MESH_AXES if a in mesh.shape)))


def fsdp_spec(shape, fsdp: int) -> PartitionSpec:
  """Where a parameter-shaped leaf lives: its largest axis divisible by ``fsdp`` (the last of
  equal ones) split on ``"fsdp"``, the rest replicated; replicated whole when no axis divides
  (scalars included) or ``fsdp == 1``."""
  axes = [i for i, n in enumerate(shape) if fsdp > 1 and n % fsdp == 0]
  if not axes:
    return PartitionSpec()
  axis = max(axes, key=lambda i: (shape[i], i))
  return PartitionSpec(*(("fsdp" if i == axis else None) for i in range(len(shape))))


def state_shardings(state, mesh: Mesh):
  """The :class:`NamedSharding` of each leaf of a train state (arrays or shape structs).

  Parameters and batch statistics by :func:`fsdp_spec`. A leaf of the optimizer or weighting
  state whose shape is, or ends with, a parameter's shape (Adam's moments, momentum, a method's
  per-task gradient buffers ``(T, *shape)``) is split on the same axis as that parameter.
  Everything else (step, key, health, per-task vectors, counts) is replicated. With
  ``fsdp == 1`` every leaf is replicated: pure data parallelism.
  """
  fsdp = mesh.shape.get("fsdp", 1)
  replicated = NamedSharding(mesh, PartitionSpec())
  if fsdp == 1:
    return jax.tree_util.tree_map(lambda _: replicated, state)
  shapes = {tuple(x.shape) for x in jax.tree_util.tree_leaves((state.params, state.batch_stats))
            if x.ndim}

  def parameter_like(x):
    shape = tuple(x.shape)
    match = max((p for p in shapes if shape[len(shape) - len(p):] == p), key=len, default=None)
    if match is None:
      return replicated
    lead = len(shape) - len(match)
    return NamedSharding(mesh, PartitionSpec(*(None,) * lead, *fsdp_spec(match, fsdp)))

  def of(tree):
    return jax.tree_util.tree_map(parameter_like, tree)

  return state._replace(
      step=replicated, params=of(state.params), batch_stats=of(state.batch_stats),
      opt_state=of(state.opt_state), weighting_state=of(state.weighting_state),
      key=replicated, health=jax.tree_util.tree_map(lambda _: replicated, state.health))


def place(tree, shardings):
  """``tree`` (host or device arrays, the same value on every process) laid out as
  ``shardings`` (a pytree of them, or one for every leaf): one fresh buffer per leaf
  (donatable); each process builds only its shards."""
  def put(x, sharding):
    try:
      host = np.asarray(jax.device_get(x))
    except jax.errors.TracerArrayConversionError:  # under jit or eval_shape: a constraint
      return jax.lax.with_sharding_constraint(x, sharding)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  if isinstance(shardings, jax.sharding.Sharding):  # one for every leaf
    return jax.tree_util.tree_map(lambda x: put(x, shardings), tree)
  return jax.tree_util.tree_map(put, tree, shardings)


def shard_batch(batch, mesh: Mesh):
  """Places a host batch on ``mesh``, split along its leading axis over every device.

  One process: ``batch`` is the global batch. Several (``jax.distributed``): ``batch`` is this
  process's rows (:func:`mtjax.data.pipeline.process_slice`), assembled into the global array.
  """
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def replicate(tree, mesh: Mesh):
  """Copies ``tree`` onto every device of ``mesh``, one fresh buffer per leaf (donatable)."""
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.tree_util.tree_map(lambda x: jax.device_put(np.array(x), replicated), tree)


def has_shared_encoder(model) -> bool:
  """Whether ``model`` splits into ``encode`` (shared) and ``decode`` (per task)."""
  return callable(getattr(model, "encode", None)) and callable(getattr(model, "decode", None))


def check_task_chunk(model, method, grad_level: str, task_chunk: int) -> None:
  """Raises ValueError unless the chunked parameter level (``task_chunk > 0``) applies."""
  if not isinstance(task_chunk, int) or isinstance(task_chunk, bool) or task_chunk < 0:
    raise ValueError(f"task_chunk: got {task_chunk!r}; expected an int >= 0 (0: no chunks)")
  if task_chunk == 0:
    return
  if grad_level != "parameter":
    raise ValueError(
        f"task_chunk: got {task_chunk} with grad_level={grad_level!r}; chunks of tasks are for "
        "the parameter level (the representation level never holds T copies of the "
        "backbone's gradient): set task_chunk=0")
  if not has_shared_encoder(model):
    raise ValueError(
        f"task_chunk: got {task_chunk}, but {type(model).__name__} has no shared encoder, and "
        "the chunked Gram matrix needs one (task gradients linear in the feature "
        "cotangents): set task_chunk=0")
  if method.level != "gradient" or getattr(method, "from_gram", None) is None:
    raise ValueError(
        f"task_chunk: got {task_chunk}, but the weighting method (level {method.level!r}) has "
        "no 'from_gram' (weights from the Gram matrix alone), which chunks need: set "
        "task_chunk=0 or use a Gram-matrix method (mgda, imtl, cagrad, nash_mtl, upgrad, ...)")


def check_grad_level(model, grad_level: str) -> None:
  """Raises ValueError unless ``model`` supports ``grad_level``."""
  if grad_level not in GRAD_LEVELS:
    raise ValueError(f"grad_level: got {grad_level!r}; expected one of {GRAD_LEVELS}")
  if grad_level == "representation" and not has_shared_encoder(model):
    raise ValueError(
        f"grad_level: 'representation' needs a shared representation, and "
        f"{type(model).__name__} has no shared encoder (each task reads its own features); "
        "use grad_level='parameter'")


CONFLICT_LEVELS = ("auto", *GRAD_LEVELS)


def conflict_level_of(model, method, grad_level: str, requested: str = "auto") -> str:
  """The gradient level at which the step measures gradient conflict (``conflict/*``).

  ``"auto"``: a gradient-level method's own level (``grad_level``: the task gradients it
  balances); a loss- or meta-level method has none, and gets the shared representation when
  the model has a shared encoder (the T feature cotangents: the heads' backward passes, no
  backward pass through the backbone per task), else the shared parameters. ``"parameter"`` or
  ``"representation"``: that level (the representation needs a shared encoder).
  """
  if requested not in CONFLICT_LEVELS:
    raise ValueError(f"relations.conflict_level: got {requested!r}; expected one of "
                     f"{CONFLICT_LEVELS}")
  if requested == "auto":
    if method.level == "gradient":
      return grad_level
    return "representation" if has_shared_encoder(model) else "parameter"
  if requested == "representation" and not has_shared_encoder(model):
    raise ValueError(
        f"relations.conflict_level: 'representation' needs a shared representation, and "
        f"{type(model).__name__} has no shared encoder; use 'parameter' or 'auto'")
  return requested


class TaskTerms(NamedTuple):
  """What one forward pass gives (see the module docstring)."""

  losses: jax.Array          # (T,) float32
  parts: dict                # {task: {part: scalar}}: the parts of losses that have them
  outputs: dict              # {task: output}
  batch_stats: Any           # the batch statistics after this pass
  combine: Callable          # weights (T,) -> ∇ Σ_t w_t L_t of every parameter
  # (level=None) -> (task grads with a leading T axis, finish) at ``level`` ("parameter" or
  # "representation"; None: the pass's ``grad_level``)
  per_task: Callable
  # chunk -> (the (T, T) Gram matrix of the shared parameters' task gradients, computed
  # `chunk` tasks at a time, and finish: weights (T,) -> every parameter's gradient with the
  # shared part Σ_t w_t g_t); None without a shared encoder.
  gram_terms: Callable | None = None
  # weights (T,) -> every parameter's gradient: the shared part Σ_t w_t g_t without stacking the
  # task gradients (one more backward pass), each task's own part ∇ L_t (as per_task's finish).
  weighted: Callable | None = None
  # {name: float32 array}: what the model sowed into "relations" in this pass (the last value
  # of each name); {} for a model that sows nothing.
  relations: dict | None = None
  # {name: float32 scalar}: the auxiliary losses the model sowed into "aux_losses" (not tasks:
  # added to the objective after the task weighting), and () -> ∇ Σ_name aux of every parameter
  # (one more backward pass); {} and None for a model that sows none.
  aux_losses: dict | None = None
  aux_grad: Callable | None = None


def sown_relations(*updates) -> dict:
  """``{name: float32 array}`` from the ``"relations"`` collections of ``model.apply`` updates.

  A name is the sow name, prefixed by the submodule path when sown inside a submodule
  (``"/"``-joined); of several values sown under one name, the last counts.
  """
  out = {}
  for update in updates:
    for path, values in traverse_util.flatten_dict(dict(update.get(RELATIONS, {}))).items():
      value = values[-1] if isinstance(values, tuple) else values
      out["/".join(path)] = jax.lax.stop_gradient(jnp.asarray(value, jnp.float32))
  return out


def sown_aux_losses(update) -> dict:
  """``{name: float32 scalar}`` from the ``"aux_losses"`` collection of a ``model.apply`` update.

  Names as :func:`sown_relations`; several values sown under one name are added. The values
  keep their gradient (they are differentiated with the task losses' forward pass).
  """
  out = {}
  for path, values in traverse_util.flatten_dict(dict(update.get(AUX_LOSSES, {}))).items():
    values = values if isinstance(values, tuple) else (values,)
    out["/".join(path)] = sum(jnp.sum(jnp.asarray(v, jnp.float32)) for v in values)
  return out


def _with_aux(vjp, aux):
  """The VJP of ``(primal, aux)`` as a VJP of ``primal`` alone (zero cotangent for ``aux``)."""
  zeros = jax.tree_util.tree_map(jnp.zeros_like, aux)
  return lambda cotangent: vjp((cotangent, zeros))


def _rngs(key):
  """The ``rngs`` of ``model.apply``: a ``"gumbel"`` stream for models that draw noise, and a
  ``"dropout"`` stream (``fold_in(key, 1)``) for dropout layers (DeepLab's head)."""
  return None if key is None else {"gumbel": key, "dropout": jax.random.fold_in(key, 1)}


def output_loss(task, out, batch):
  """``(loss, parts, output)`` of one task's decoded ``out``.

  ``out`` is the task's output, or a :class:`mtjax.models.DeepSupervision` (a final output
  plus intermediate outputs, e.g. PAD-Net's): then the loss is the final output's plus
  ``weight`` × the sum of the intermediate outputs' losses, which is also reported as the part
  ``"intermediate"``; ``output`` is the final one (what metrics and predictions see).
  """
  if isinstance(out, DeepSupervision):
    loss, parts = loss_and_parts(task, out.output, batch)
    deep = sum(loss_and_parts(task, o, batch)[0] for o in out.intermediate)
    return loss + out.weight * deep, {**parts, "intermediate": deep}, out.output
  loss, parts = loss_and_parts(task, out, batch)
  return loss, parts, out


def _tree_sum(trees):
  return jax.tree_util.tree_map(lambda *xs: sum(xs), *trees)


def _tree_stack(trees):
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def task_terms(model, tasks, params, batch_stats, batch, *, grad_level="parameter",
               train=True, frozen=(), key=None) -> TaskTerms:
  """The per-task terms of one forward pass of ``model`` on ``batch``.

  ``frozen``: label prefixes of parameter groups that are not differentiated (their gradient
  is zero and its backward pass is not computed). ``key``: the model's PRNG key for this pass
  (the ``"gumbel"`` stream of ``model.apply``; only models that draw noise use it, e.g.
  ``ltb``). The ``"relations"`` collection is mutable in every apply; what the model sows
  there is returned in ``relations``, and so is ``"aux_losses"``: what the model sows there is
  returned in ``aux_losses``, with ``aux_grad`` (see :class:`TaskTerms`).
  """
  def trainable(p):
    return labels.stop_gradient(model, p, frozen)

  if has_shared_encoder(model):
    return _encoder_terms(model, tasks, params, batch_stats, batch, grad_level, train, trainable,
                          _rngs(key))
  return _joint_terms(model, tasks, params, batch_stats, batch, grad_level, train, trainable,
                      _rngs(key))


def _encoder_terms(model, tasks, params, batch_stats, batch, grad_level, train, trainable, rngs):
  images = batch["image"]
  output_size = images.shape[1:3]
  own, stats = labels.split(model, params), labels.split(model, batch_stats)

  def encode(p):
    variables = {"params": trainable(p), "batch_stats": stats.get(labels.SHARED, {})}
    features, updates = model.apply(variables, images, train, method="encode",
                                    mutable=["batch_stats", RELATIONS, AUX_LOSSES], rngs=rngs)
    return (features, sown_aux_losses(updates)), (updates["batch_stats"], sown_relations(updates))

  (features, encode_aux), encode_aux_vjp, (new_stats, relations) = jax.vjp(
      encode, own.get(labels.SHARED, {}), has_aux=True)
  encode_vjp = _with_aux(encode_aux_vjp, encode_aux)
  losses, head_vjps, outputs, parts, task_stats, head_auxes = [], [], {}, {}, [], []
  for name, task in tasks.items():
    def head_loss(p, f, name=name, task=task):
      variables = {"params": trainable(p), "batch_stats": stats.get(name, {})}
      out, updates = model.apply(variables, f, name, output_size, train, method="decode",
                                 mutable=["batch_stats", RELATIONS, AUX_LOSSES], rngs=rngs)
      loss, loss_parts, out = output_loss(task, out, batch)
      return ((loss, sown_aux_losses(updates)),
              (updates["batch_stats"], out, loss_parts, sown_relations(updates)))

    (loss, head_aux), head_aux_vjp, (head_stats, out, loss_parts, sown) = jax.vjp(
        head_loss, own.get(name, {}), features, has_aux=True)
    relations.update(sown)
    losses.append(loss)
    head_vjps.append(_with_aux(head_aux_vjp, head_aux))
    head_auxes.append((head_aux, head_aux_vjp))
    task_stats.append(head_stats)
    outputs[name] = out
    if loss_parts:
      parts[name] = loss_parts
  losses = jnp.stack(losses)

  def backward_heads(cotangents):
    pulled = [head_vjp(cotangents[i]) for i, head_vjp in enumerate(head_vjps)]
    return [p for p, _ in pulled], [f for _, f in pulled]

  def combine(weights):
    head_grads, feature_grads = backward_heads(jnp.asarray(weights, losses.dtype))
    (shared_grads,) = encode_vjp(_tree_sum(feature_grads))
    return labels.merge(shared_grads, *head_grads)

  def task_cotangents():
    """Each task's feature cotangent, stacked, and the heads' gradients of Σ_t L_t."""
    head_grads, feature_grads = backward_heads(jnp.ones_like(losses))
    return _tree_stack(feature_grads), labels.merge(*head_grads)

  def per_task(level=None):
    stacked, head_grads = task_cotangents()
    if (level or grad_level) == "representation":
      return stacked, lambda direction: labels.merge(encode_vjp(direction)[0], head_grads)
    (shared,) = jax.vmap(encode_vjp)(stacked)
    return shared, lambda direction: labels.merge(direction, head_grads)

  def gram_terms(chunk):
    stacked, head_grads = task_cotangents()
    # J, the encoder's JVP at these parameters, as the transpose of its (linear) VJP: it
    # reuses the VJP's residuals, no second forward pass.
    jvp = jax.linear_transpose(lambda c: encode_vjp(c)[0], features)

    def gram_row(cotangent):  # c_j -> (<c_i, J V c_j>)_i
      (pushed,) = jvp(encode_vjp(cotangent)[0])
      return sum(jnp.einsum("i...,...->i", c.astype(jnp.float32), p.astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST)
                 for c, p in zip(jax.tree_util.tree_leaves(stacked),
                                 jax.tree_util.tree_leaves(pushed), strict=True))

    rows = jax.lax.map(gram_row, stacked, batch_size=chunk)
    gram = 0.5 * (rows + rows.T)
    return gram, functools.partial(weighted_direction, stacked, head_grads)

  def weighted_direction(stacked, head_grads, weights):
    (direction,) = encode_vjp(weighted_sum(stacked, weights))
    return labels.merge(direction, head_grads)

  def weighted(weights):
    return weighted_direction(*task_cotangents(), weights)

  def aux_grad():
    pulled = [vjp((jnp.zeros_like(losses[0]), jax.tree_util.tree_map(jnp.ones_like, aux)))
              for aux, vjp in head_auxes]
    (shared,) = encode_aux_vjp((_tree_sum([f for _, f in pulled]),
                                jax.tree_util.tree_map(jnp.ones_like, encode_aux)))
    return labels.merge(shared, *(p for p, _ in pulled))

  aux_losses = _add_aux([encode_aux, *(aux for aux, _ in head_auxes)])
  return TaskTerms(losses, parts, outputs, labels.merge(new_stats, *task_stats), combine,
                   per_task, gram_terms, weighted, relations, aux_losses,
                   aux_grad if aux_losses else None)


def _add_aux(auxes) -> dict:
  out = {}
  for aux in auxes:
    for name, value in aux.items():
      out[name] = out[name] + value if name in out else value
  return out


def _joint_terms(model, tasks, params, batch_stats, batch, grad_level, train, trainable, rngs):
  own = labels.split(model, params)
  shared = own.pop(labels.SHARED, {})
  specific = labels.merge(*own.values())
  names = tuple(tasks)

  def loss_vector(shared, specific):
    variables = {"params": trainable(labels.merge(shared, specific)),
                 "batch_stats": batch_stats}
    outputs, updates = model.apply(variables, batch["image"], train,
                                   mutable=["batch_stats", RELATIONS, AUX_LOSSES], rngs=rngs)
    triples = [output_loss(task, outputs[name], batch) for name, task in tasks.items()]
    parts = {name: p for name, (_, p, _) in zip(names, triples, strict=True) if p}
    outs = {name: out for name, (_, _, out) in zip(names, triples, strict=True)}
    return ((jnp.stack([loss for loss, _, _ in triples]), sown_aux_losses(updates)),
            (updates["batch_stats"], outs, parts, sown_relations(updates)))

  (losses, aux_losses), aux_vjp, (new_stats, outputs, parts, relations) = jax.vjp(
      loss_vector, shared, specific, has_aux=True)
  vjp = _with_aux(aux_vjp, aux_losses)

  def aux_grad():
    ones = jax.tree_util.tree_map(jnp.ones_like, aux_losses)
    return labels.merge(*aux_vjp((jnp.zeros_like(losses), ones)))

  def combine(weights):
    return labels.merge(*vjp(jnp.asarray(weights, losses.dtype)))

  def per_task(level=None):
    if (level or grad_level) != "parameter":
      check_grad_level(model, level or grad_level)
    shared_grads, specific_grads = jax.vmap(vjp)(jnp.eye(len(names), dtype=losses.dtype))
    specific_sum = jax.tree_util.tree_map(lambda g: jnp.sum(g, axis=0), specific_grads)
    return shared_grads, lambda direction: labels.merge(direction, specific_sum)

  def weighted(weights):
    shared_grads, _ = vjp(jnp.asarray(weights, losses.dtype))
    _, specific_sum = vjp(jnp.ones_like(losses))
    return labels.merge(shared_grads, specific_sum)

  return TaskTerms(losses, parts, outputs, new_stats, combine, per_task, weighted=weighted,
                   relations=relations, aux_losses=aux_losses,
                   aux_grad=aux_grad if aux_losses else None)


def balance(terms: TaskTerms, method, weighting_state, key, task_chunk: int = 0,
            cross: jax.Array | None = None, *, conflict=None, conflict_level=None):
  """``(gradient of every parameter, new weighting state, task weights)`` under ``method``.

  ``task_chunk > 0`` (a gradient-level ``method`` with ``from_gram``, an encoder model, the
  parameter level; see :func:`check_task_chunk`): the Gram matrix is computed ``task_chunk``
  tasks at a time and the direction by one more backward pass (``terms.gram_terms``).
  ``cross`` (a ``method.double_sampling`` method): the ``(T, T)`` cross Gram matrix of two
  halves of the batch (:func:`cross_gram`) goes to ``method.from_gram``, and the direction is
  ``Σ_t w_t g_t`` of the whole batch (``terms.weighted``).
  ``conflict`` (a bool, traced or not): also return, as a fourth element,
  :func:`mtjax.relations.conflict_metrics` of the task gradients at ``conflict_level`` (None:
  the level of ``terms``; :func:`conflict_level_of` picks it): from the Gram matrix a chunked
  step already has (parameter level), from the task gradients a gradient-level method already
  has (its own level), else computed under ``lax.cond`` only where ``conflict`` holds (a
  loss-level method pays for the per-task gradients at those steps only; zeros elsewhere).
  """
  out = _balance(terms, method, weighting_state, key, task_chunk, cross, conflict,
                 conflict_level)
  return out if conflict is not None else out[:3]


def _balance(terms, method, weighting_state, key, task_chunk, cross, conflict, conflict_level):
  def measured(task_grads=None):
    """The conflict metrics where ``conflict`` holds: of ``task_grads`` (the step's own), else
    of ``terms.per_task(conflict_level)`` (computed under the cond only)."""
    if conflict is None:
      return None
    if task_grads is not None:
      return relations_lib.when(conflict, relations_lib.conflict_from_grads, task_grads)
    return relations_lib.when(
        conflict, lambda: relations_lib.conflict_from_grads(terms.per_task(conflict_level)[0]))

  if cross is not None:
    weights, weighting_state = method.from_gram(cross, weighting_state, losses=terms.losses,
                                                key=key)
    return terms.weighted(weights), weighting_state, weights, measured()
  if task_chunk and method.level == "gradient":
    gram, finish = terms.gram_terms(task_chunk)
    weights, weighting_state = method.from_gram(gram, weighting_state, losses=terms.losses,
                                                key=key)
    seen = (relations_lib.conflict_metrics(gram)
            if conflict is not None and conflict_level in (None, "parameter") else measured())
    return finish(weights), weighting_state, weights, seen
  if method.level == "loss":
    _, weighting_state, weights = method.update(None, weighting_state, losses=terms.losses,
                                                key=key)
    return (terms.combine(jax.lax.stop_gradient(weights)), weighting_state, weights,
            measured())
  if method.level == "gradient":
    task_grads, finish = terms.per_task()
    direction, weighting_state, weights = method.update(task_grads, weighting_state,
                                                        losses=terms.losses, key=key)
    seen = measured(task_grads if conflict_level is None else None)
    return finish(direction), weighting_state, weights, seen
  raise ValueError(f"weighting level {method.level!r} needs its own train step "
                   "(see mtjax.train.meta for 'meta')")


def check_double_sampling(method, batch_size: int, num_devices: int, task_chunk: int = 0):
  """Raises ValueError unless a ``method.double_sampling`` method can split this batch."""
  if not getattr(method, "double_sampling", False):
    return
  if method.level != "gradient" or method.from_gram is None:
    raise ValueError("weighting: double sampling needs a gradient-level method with "
                     f"'from_gram' (weights from a Gram matrix); got level {method.level!r}")
  if task_chunk:
    raise ValueError(
        f"task_chunk: got {task_chunk}, but the weighting method samples twice "
        "(double_sampling=True: the cross Gram matrix of two halves of the batch, which is not "
        "computed in chunks): set task_chunk=0 or weighting.double_sampling=False")
  if batch_size % (2 * num_devices):
    raise ValueError(
        f"batch_size: got {batch_size} on {num_devices} device(s) "
        f"({batch_size / num_devices:g} per device); the weighting method's double sampling "
        "(weighting.double_sampling=True) splits each device's examples into two halves: "
        f"expected a multiple of {2 * num_devices} (an even number per device), or set "
        "weighting.double_sampling=False")


def halves(batch):
  """The two halves of ``batch`` for double sampling: its even and its odd examples.

  With the batch sharded on its leading axis and an even number of examples per device, each
  device splits its own examples (nothing moves between devices). The data order is random, so
  the two halves are independent samples.
  """
  def half(i):
    return jax.tree_util.tree_map(
        lambda x: x.reshape(x.shape[0] // 2, 2, *x.shape[1:])[:, i], batch)
  return half(0), half(1)


def cross_gram(model, tasks, params, batch_stats, batch, *, grad_level="parameter",
               frozen=()) -> jax.Array:
  """``C_ij = <g_i(z₁), g_j(z₂)>``: the ``(T, T)`` cross products of the per-task gradients
  of the two halves ``z₁, z₂`` of ``batch`` (:func:`halves`), in float32, for MoDo's double
  sampling (Chen et al., 2023, Algorithm 1).

  Each half is its own forward pass in train mode (its own batch statistics, discarded; the
  step keeps those of the whole batch). At the parameter level ``g_t`` is the gradient of the
  shared parameters. At the representation level it is the gradient with respect to a half's
  features, and the product pairs the k-th example of one half with the k-th of the other,
  scaled by ½: a half's per-example cotangents are twice the whole batch's (its loss averages
  over half as many examples), so that when the two halves are equal ``C`` is the whole batch's
  Gram matrix at either level, as it is at the parameter level.
  """
  grads = [task_terms(model, tasks, params, batch_stats, half, grad_level=grad_level,
                      frozen=frozen).per_task()[0] for half in halves(batch)]
  def leaf_cross(a, b):
    a = a.reshape(a.shape[0], -1).astype(jnp.float32)
    b = b.reshape(b.shape[0], -1).astype(jnp.float32)
    return jnp.einsum("id,jd->ij", a, b, precision=jax.lax.Precision.HIGHEST)
  cross = sum(leaf_cross(a, b) for a, b in zip(jax.tree_util.tree_leaves(grads[0]),
                                               jax.tree_util.tree_leaves(grads[1]), strict=True))
  return 0.5 * cross if grad_level == "representation" else cross


NONFINITE_POLICIES = ("stop", "skip")


def check_nonfinite_policy(nonfinite: str, max_consecutive_skips: int) -> None:
  """Raises ValueError unless ``nonfinite`` is a policy and ``max_consecutive_skips`` >= 1."""
  if nonfinite not in NONFINITE_POLICIES:
    raise ValueError(f"nonfinite: got {nonfinite!r}; expected one of {NONFINITE_POLICIES}")
  if not (isinstance(max_consecutive_skips, int) and max_consecutive_skips >= 1):
    raise ValueError(f"max_consecutive_skips: got {max_consecutive_skips!r}; expected an int >= 1")


def all_finite(tree) -> jax.Array:
  """Whether every floating-point entry of ``tree`` is finite: a bool scalar, on device."""
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def check_health(health: Health, step, losses, grad_ok, params_ok, *, nonfinite: str,
                 max_consecutive_skips: int):
  """``(ok, health)``: whether step ``step``'s update is finite, and the updated record.

  ``ok``: every task loss, the combined gradient (``grad_ok``) and the updated parameters and
  batch statistics (``params_ok``) are finite. Under ``"stop"`` the first step that is not ok
  is where the run stops; under ``"skip"`` a step that is not ok is skipped and counted, and
  the run stops at the ``max_consecutive_skips``-th skip in a row. What was not finite is kept
  for the step the run stops at (see :class:`mtjax.train.state.Health`).
  """
  check_nonfinite_policy(nonfinite, max_consecutive_skips)
  losses_ok = jnp.isfinite(losses)
  ok = jnp.all(losses_ok) & grad_ok & params_ok
  streak = jnp.where(ok, 0, health.streak + 1).astype(jnp.int32)
  if nonfinite == "skip":
    skipped = health.skipped + jnp.where(ok, 0, 1).astype(jnp.int32)
    stop = streak >= max_consecutive_skips
  else:
    skipped, stop = health.skipped, ~ok
  first = (health.bad_step < 0) & stop
  return ok, Health(skipped, streak,
                    jnp.where(first, jnp.asarray(step, jnp.int32), health.bad_step),
                    jnp.where(first, ~losses_ok, health.bad_losses),
                    jnp.where(first, ~grad_ok, health.bad_grad),
                    jnp.where(first, ~params_ok, health.bad_params))


def apply_gradients(state: TrainState, optimizer, names, grads, weighting_state,
                    terms: TaskTerms, weights, *, nonfinite: str = "stop",
                    max_consecutive_skips: int = 10, frozen=None):
  """The optimizer update that ends a train step, and the step's metrics.

  ``grads`` is the balanced direction; the gradient of the model's auxiliary losses
  (``terms.aux_grad``, if it sowed any) is added to it here, after the task weighting, and each
  is logged as ``loss/aux/<name>``.

  The step also checks, on device, that the task losses, the gradient and the updated
  parameters are finite (:func:`check_health`; nothing waits for the host). ``nonfinite="stop"``
  only records the first step that is not (the loop stops there: the trajectory of a healthy
  run is unchanged); ``"skip"`` keeps the parameters, batch statistics, optimizer and weighting
  states of such a step bitwise unchanged, while the step counter still advances (the data
  position and the per-step key ``fold_in(root, step)`` stay functions of the step, so a
  resumed run is exact). ``frozen``: the groups a grouped optimizer
  (:func:`mtjax.train.optim.make_grouped_optimizer`) skips this step. As in
  ``optax.apply_if_finite``, the optimizer's own count, and so its
  learning-rate schedule, does not advance on a skipped step.
  """
  # frozen: label prefixes a grouped optimizer (a strategy's phase) skips; None: a plain one.
  extra = {} if frozen is None else {"frozen": tuple(frozen)}
  if terms.aux_grad is not None:  # the model's auxiliary losses, after the task weighting
    grads = jax.tree_util.tree_map(jnp.add, grads, terms.aux_grad())
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params, **extra)
  params = optax.apply_updates(state.params, updates)
  losses = terms.losses
  metrics = {"loss": jnp.sum(losses), "grad_norm": optax.tree_utils.tree_norm(grads)}
  for name, value in (terms.relations or {}).items():
    metrics[f"relations/{name}"] = value
  for name, value in (terms.aux_losses or {}).items():
    metrics[f"loss/aux/{name}"] = value
  for i, name in enumerate(names):
    metrics[f"loss/{name}"] = losses[i]
    metrics[f"weight/{name}"] = weights[i]
    for part, value in terms.parts.get(name, {}).items():
      metrics[f"loss/{name}/{part}"] = value
  new_state = TrainState(state.step + 1, params, terms.batch_stats, opt_state, weighting_state,
                         state.key, state.health)
  if state.health is None:  # a state made by hand, without a record: nothing is checked
    return new_state, metrics
  ok, health = check_health(state.health, state.step + 1, losses, all_finite(grads),
                            all_finite((params, terms.batch_stats)), nonfinite=nonfinite,
                            max_consecutive_skips=max_consecutive_skips)
  if nonfinite == "skip":
    kept = jax.tree_util.tree_map(lambda new, old: jnp.where(ok, new, old),
                                  tuple(new_state[1:5]), tuple(state[1:5]))
    new_state = TrainState(state.step + 1, *kept, state.key, health)
    metrics["skipped"] = health.skipped
  else:
    new_state = new_state._replace(health=health)
  return new_state, metrics
