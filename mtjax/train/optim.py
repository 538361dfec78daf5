"""Optimizers and learning-rate schedules from the config, with per-group scales and freezing.

Parameter groups are the model's labels (:mod:`mtjax.models.labels`): ``optimizer.lr_scale``
holds ``(label prefix, scale)`` pairs and ``optimizer.frozen`` label prefixes; the longest
matching prefix decides. A frozen group gets a zero update and keeps its optimizer state, so
unfreezing it later continues where it stopped. Without scales or frozen groups the optimizer
is the plain transformation.
"""

from typing import NamedTuple

import flax.traverse_util as traverse
import jax
import optax

from mtjax.models import labels

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "step")


class OptimizerSpec(NamedTuple):
  """``config.optimizer`` resolved (:func:`mtjax.train.setup.optimizer_spec`); its values are
  checked where they are used (:func:`make_schedule`, :func:`check_groups`, the optimizer's
  name when it is made), each error naming ``optimizer.<field>``.

  ``name``: one of :data:`OPTIMIZERS`; ``learning_rate``: the peak learning rate;
  ``schedule``: one of :data:`SCHEDULES`, with ``warmup_steps`` (``warmup_cosine``) and
  ``step_size``, ``gamma`` (``step``; 0: unset); ``momentum`` (SGD's; 0: none),
  ``weight_decay`` (0: none), ``grad_clip`` (the global norm clipped to; 0: none);
  ``lr_scale``: ``((label prefix, scale), ...)``; ``frozen``: label prefixes.
  """

  name: str
  learning_rate: float
  schedule: str
  warmup_steps: int = 0
  momentum: float = 0.0
  weight_decay: float = 0.0
  grad_clip: float = 0.0
  step_size: int = 0
  gamma: float = 0.0
  lr_scale: tuple = ()
  frozen: tuple = ()


def make_schedule(cfg: OptimizerSpec, num_steps: int):
  """The learning rate of each step: ``constant``, ``cosine`` (to 0 at ``num_steps``),
  ``warmup_cosine`` (linear from 0 over ``warmup_steps``, then cosine), or ``step``:
  ``learning_rate · gamma ** floor(step / step_size)``, ``torch.optim.lr_scheduler.StepLR``.
  ``step_size`` counts optimizer steps: LibMTL steps its StepLR once an epoch
  (``LibMTL/trainer.py``, ``self.scheduler.step()`` after each epoch), so its ``step_size``
  epochs are ``step_size × steps per epoch`` here."""
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f"optimizer.schedule: got {cfg.schedule!r}; expected one of {SCHEDULES}")
  if not cfg.learning_rate > 0:
    raise ValueError(f"optimizer.learning_rate: got {cfg.learning_rate!r}; expected > 0")
  if cfg.schedule == "constant":
    return optax.constant_schedule(cfg.learning_rate)
  if cfg.schedule == "step":
    step_size, gamma = cfg.step_size, cfg.gamma
    if not isinstance(step_size, int) or isinstance(step_size, bool) or step_size < 1:
      raise ValueError(f"optimizer.step_size: got {step_size!r}; expected an int >= 1 (optimizer "
                       "steps between two decays of the 'step' schedule)")
    if not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
      raise ValueError(f"optimizer.gamma: got {gamma!r}; expected a number in (0, 1] (the "
                       "'step' schedule's factor)")
    return optax.exponential_decay(cfg.learning_rate, step_size, gamma, staircase=True)
  if cfg.schedule == "cosine":
    return optax.cosine_decay_schedule(cfg.learning_rate, max(num_steps, 1))
  return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps,
                                            max(num_steps, cfg.warmup_steps + 1))


def _base(cfg: OptimizerSpec, schedule) -> optax.GradientTransformation:
  if cfg.name not in OPTIMIZERS:
    raise ValueError(f"optimizer.name: got {cfg.name!r}; expected one of {OPTIMIZERS}")
  if cfg.name == "sgd":
    opt = optax.sgd(schedule, momentum=cfg.momentum or None)
    if cfg.weight_decay:
      opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay), opt)
  elif cfg.name == "adam":
    # torch.optim.Adam's weight_decay: added to the gradient before the moments (coupled, L2),
    # unlike adamw's decoupled decay.
    opt = optax.adam(schedule)
    if cfg.weight_decay:
      opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay), opt)
  else:
    opt = optax.adamw(schedule, weight_decay=cfg.weight_decay)
  if cfg.grad_clip:
    opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
  return opt


def freeze(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """``inner``'s state, kept as it is, and zero updates."""
  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map(jax.numpy.zeros_like, updates), state
  return optax.GradientTransformation(inner.init, update)


def group_rules(cfg: OptimizerSpec) -> tuple[dict, tuple]:
  """``({prefix: lr scale}, frozen prefixes)`` of an optimizer (empty when it has none)."""
  return dict(cfg.lr_scale), tuple(cfg.frozen)


def check_groups(cfg: OptimizerSpec, group_names) -> None:
  """Raises ValueError if a scale or frozen prefix matches none of the model's ``group_names``."""
  scales, frozen = group_rules(cfg)
  for field, prefixes in (("lr_scale", tuple(scales)), ("frozen", frozen)):
    for prefix in prefixes:
      if not any(labels.matches(name, prefix) for name in group_names):
        raise ValueError(f"optimizer.{field}: {prefix!r} matches no parameter group; the "
                         f"model's groups are {list(group_names)}")
  for prefix, scale in scales.items():
    if not isinstance(scale, (int, float)) or scale < 0:
      raise ValueError(f"optimizer.lr_scale: {prefix!r} has scale {scale!r}; expected a "
                       "number >= 0")


def make_optimizer(cfg: OptimizerSpec, num_steps: int,
                   label_fn=None) -> optax.GradientTransformation:
  """The optimizer of ``cfg`` over ``num_steps`` steps; ``label_fn(params)`` gives the labels
  (needed with ``lr_scale`` or ``frozen`` groups).
  """
  schedule = make_schedule(cfg, num_steps)
  scales, frozen = group_rules(cfg)
  if not scales and not frozen:
    return _base(cfg, schedule)
  if label_fn is None:
    raise ValueError("make_optimizer: optimizer.lr_scale / optimizer.frozen need label_fn")

  def rule(label):
    """The longest matching prefix decides: ("frozen",) or ("scale", s)."""
    best = max((p for p in (*scales, *frozen) if labels.matches(label, p)), key=len, default=None)
    if best is None:
      return "scale=1"
    return "frozen" if best in frozen else f"scale={scales[best]}"

  transforms = {"scale=1": _base(cfg, schedule), "frozen": freeze(_base(cfg, schedule))}
  for scale in scales.values():
    transforms[f"scale={scale}"] = optax.chain(_base(cfg, schedule), optax.scale(scale))
  return optax.multi_transform(
      transforms, lambda params: jax.tree_util.tree_map(rule, label_fn(params)))


def make_grouped_optimizer(cfg: OptimizerSpec, num_steps: int,
                           label_fn) -> optax.GradientTransformationExtraArgs:
  """One independent copy of the configured optimizer per parameter group (label), for the
  strategies (:mod:`mtjax.train.strategies`): ``update(grads, state, params, frozen=prefixes)``
  gives the groups in ``frozen`` a zero update and keeps their state bitwise, so a group
  frozen for a phase continues where it stopped. ``lr_scale`` and ``frozen`` of the config
  apply as in :func:`make_optimizer`. Per group means each group's step count (and so its
  learning-rate schedule) advances only while it trains, and ``grad_clip`` clips each
  group's norm. The state is a tuple, one entry per group in sorted label order.
  """
  schedule = make_schedule(cfg, num_steps)
  scales, frozen_cfg = group_rules(cfg)

  def transform(label):
    best = max((p for p in (*scales, *frozen_cfg) if labels.matches(label, p)), key=len,
               default=None)
    if best is None:
      return _base(cfg, schedule)
    if best in frozen_cfg:
      return freeze(_base(cfg, schedule))
    return optax.chain(_base(cfg, schedule), optax.scale(scales[best]))

  def parts(tree):
    flat = traverse.flatten_dict(dict(tree))
    label_flat = traverse.flatten_dict(dict(label_fn(tree)))
    groups = sorted(set(label_flat.values()))
    return groups, [traverse.unflatten_dict({p: v for p, v in flat.items()
                                             if label_flat[p] == g}) for g in groups]

  def init(params):
    groups, subtrees = parts(params)
    return tuple(transform(g).init(sub) for g, sub in zip(groups, subtrees, strict=True))

  def update(grads, state, params=None, *, frozen=(), **extra):
    del extra
    groups, grad_parts = parts(grads)
    param_parts = parts(params)[1] if params is not None else [None] * len(groups)
    new_updates, new_state = [], []
    for g, grad, sub_state, param in zip(groups, grad_parts, state, param_parts, strict=True):
      if labels.in_groups(g, frozen):
        new_updates.append(jax.tree_util.tree_map(jax.numpy.zeros_like, grad))
        new_state.append(sub_state)
      else:
        upd, sub_state = transform(g).update(grad, sub_state, param)
        new_updates.append(upd)
        new_state.append(sub_state)
    return labels.merge(*new_updates), tuple(new_state)

  return optax.GradientTransformationExtraArgs(init, update)
