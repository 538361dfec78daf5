"""The device mesh and where things live on it: the batch split over every device, the
train state's parameter-shaped leaves split on ``"fsdp"`` (FSDP), the rest replicated.

A ``("data", "fsdp")`` :class:`jax.sharding.Mesh` under one SPMD ``jax.jit`` (the successor of
``pmap``; JAX's "Distributed arrays and automatic parallelization"), as big_vision and MaxText
lay out data and fully sharded parameters. On several hosts each process feeds its own rows
(:func:`shard_batch`) and builds only its shards of the state (:func:`place`).
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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
  :func:`mesh_shape`; default: every device on ``data``, pure data parallelism).

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
