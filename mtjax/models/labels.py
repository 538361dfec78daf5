"""Parameter labels: which task owns a parameter, and finer groups for the optimizer.

A multi-task model labels each path of its variable trees (``label_of(model, path)``) with
``"shared"`` or a task name, optionally refined after a slash (``"shared/stage4"``). The part
before the first slash is the parameter's *owner*: the train step differentiates the shared
parameters per task and each task's own parameters by its loss alone; the optimizer applies
per-group learning-rate scales and freezing by label prefix. Nothing else names parameters.
"""

import flax.traverse_util as traverse
import jax

SHARED = "shared"


def label_of(model, path) -> str:
  """``label_of(model, path)``; a model that labels nothing shares every parameter."""
  labeller = getattr(model, "param_label", None)
  return SHARED if labeller is None else labeller(path)


def from_table(table, path, what: str, trunk=None) -> str:
  """The label of the variable ``path`` from a model's ``table``, ``{top-level name: label}``.

  The top-level names are the ones Linen gives a model's submodules and parameters (a dict
  attribute ``attr`` names its entries ``attr_<key>``, a list ``attr_<i>``); the model lists
  them from the same keys it builds its modules with, so nothing parses a name. ``trunk``:
  ``(name, module)`` of a shared backbone, whose variables are labelled
  ``"shared/<module.param_group(rest of the path)>"``. A path in neither raises ValueError
  naming the model (``what``).
  """
  if trunk is not None and path[0] == trunk[0]:
    return f"{SHARED}/{trunk[1].param_group(path[1:])}"
  label = table.get(path[0])
  if label is None:
    raise ValueError(f"parameter path {path}: not a part of this {what} model")
  return label


def heads_table(heads, label: str = "{}") -> dict:
  """``{"heads_<task>": label.format(task)}``: the rows of a ``heads`` dict attribute."""
  return {f"heads_{task}": label.format(task) for task in heads}


def owner(label: str) -> str:
  """``"shared"`` or the task name: the label up to its first slash."""
  return label.split("/", 1)[0]


def matches(label: str, prefix: str) -> bool:
  """Whether ``label`` is ``prefix`` or inside it (``"shared/stage1"`` is in ``"shared"``)."""
  return label == prefix or label.startswith(prefix + "/")


def label_tree(model, tree):
  """``tree`` (params, batch stats or their gradients) with each leaf replaced by its label."""
  flat = traverse.flatten_dict(dict(tree))
  return traverse.unflatten_dict({path: label_of(model, path) for path in flat})


def split(model, tree) -> dict:
  """``{owner: subtree}``: the leaves of ``tree`` grouped by owner, paths kept."""
  parts = {}
  for path, leaf in traverse.flatten_dict(dict(tree)).items():
    parts.setdefault(owner(label_of(model, path)), {})[path] = leaf
  return {name: traverse.unflatten_dict(flat) for name, flat in parts.items()}


def merge(*trees) -> dict:
  """The union of trees with disjoint paths (the inverse of :func:`split`)."""
  flat = {}
  for tree in trees:
    flat.update(traverse.flatten_dict(dict(tree)))
  return traverse.unflatten_dict(flat)


def groups(model, tree) -> list[str]:
  """The distinct labels of ``tree``, sorted."""
  return sorted({label_of(model, p) for p in traverse.flatten_dict(dict(tree))})


def in_groups(label: str, prefixes) -> bool:
  """Whether ``label`` is in one of the groups named by label ``prefixes``."""
  return any(matches(label, prefix) for prefix in prefixes)


def stop_gradient(model, tree, prefixes):
  """``tree`` with ``jax.lax.stop_gradient`` on the leaves in the groups ``prefixes``.

  Applied inside a differentiated function, the frozen leaves get a symbolic zero cotangent:
  their backward pass is not computed at all.
  """
  if not prefixes:
    return tree
  flat = traverse.flatten_dict(dict(tree))
  return traverse.unflatten_dict({
      path: jax.lax.stop_gradient(leaf) if in_groups(label_of(model, path), prefixes) else leaf
      for path, leaf in flat.items()})
