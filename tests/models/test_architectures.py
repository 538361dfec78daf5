"""Every registered sharing architecture: shapes, parameter counts, equivalences, train steps.

An architecture added to ``mtjax.models.ARCHITECTURES`` is picked up by :func:`test_architecture`
(one test per architecture, so that pytest-xdist spreads them; each builds its trainers once and
feeds every assertion from them): its output shapes, labels, parameter count (checked against
the formula where it is listed in ``FORMULAS``; those of the expert architectures live with
their tests), train steps (compiled once, lowering the loss; 8 devices = 1 device for one
architecture of each kind of forward pass, ``EIGHT_DEVICES``), both gradient levels where it has
a shared encoder (the representation level refused otherwise) and every gradient-level
weighting method on its real per-task gradients.

What "every weighting method on every architecture" covers, honestly: per architecture, one
full jitted train step at each supported gradient level with PCGrad (a representative
gradient-level method) wrapped in a spy that keeps the per-task gradients the step handed it;
then every registered gradient-level method's ``update`` is applied to those real per-task
gradients at each level (flattened and zero-padded to ``PAD``, so each method compiles once per
process whatever the architecture). Loss-level methods see only the loss vector, the same for
every architecture; meta-level methods need the meta step: both are covered on the hard-sharing
model by ``tests/weighting/test_registry.py``, not per architecture here.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtjax import config as config_lib
from mtjax import models, weighting
from mtjax.errors import UserError
from mtjax.models import backbones, labels
from mtjax.train import step as step_lib
from mtjax.train.trainer import gradient_like, make_trainer
from mtjax.weighting.base import Method
from tests.helpers import scenes, tiny_tasks

TASKS = ("segmentation", "depth")
SIZE, BATCH = 16, 8
COMMON = dict(width=4, output_stride=4, stem="small", head_hidden=4)
# SegNet-MTAN is a network of its own (no ResNet backbone, inputs multiples of 32): the same
# checks (labels, the general path's gradients, the representation level refused, train steps
# compiled once) are in tests/models/test_segnet.py.
ARCHS = [a for a in models.names() if a != "segnet_mtan"]
# Every level's flattened per-task gradients are zero-padded to this length (one compile per
# method); the largest today, MMoE's and DSelect-k's shared parameters, is ≈ 16k.
PAD = 1 << 15


def _build(arch, tasks=None, **hparams):
  return models.build("resnet_tiny", tasks or tiny_tasks(TASKS), architecture=arch, **COMMON,
                      **hparams)


def _count(tree):
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def _init_shapes(model):
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                           jnp.zeros((1, SIZE, SIZE, 3)), train=False))


@functools.cache
def _components():
  """``P_stem``, ``[P_i]``, ``{task: P_head}``, ``[C_i]`` from the hard model's labels."""
  model = _build("hard")
  params = _init_shapes(model)["params"]
  by_label = {}
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, leaf in flat:
    label = labels.label_of(model, tuple(k.key for k in path))
    by_label[label] = by_label.get(label, 0) + int(np.prod(leaf.shape))
  n = len(model.backbone.stage_sizes)
  channels = backbones.stage_channels(backbones.plan_of(model.backbone))[1:]
  return (by_label["shared/stem"], [by_label[f"shared/stage{i}"] for i in range(1, n + 1)],
          {t: by_label[t] for t in TASKS}, channels)


def _formula(arch):
  stem, stages, heads, c = _components()
  t, n = len(TASKS), len(stages)
  backbone, head_sum = stem + sum(stages), sum(heads.values())
  if arch == "hard":
    return backbone + head_sum
  if arch == "partial":  # default branch_stage = 2
    return stem + sum(stages[:2]) + t * sum(stages[2:]) + head_sum
  if arch == "cross_stitch":
    return t * backbone + (n - 1) * t * t + head_sum
  if arch == "ltb":
    return t * backbone + n * t * t + head_sum
  if arch == "mtan":
    att = sum((c[0] if i == 0 else 2 * c[i]) * c[i] + c[i] ** 2 + 4 * c[i] for i in range(n))
    transfer = sum(9 * c[i] * c[i + 1] + 2 * c[i + 1] for i in range(n - 1))
    return backbone + t * (att + transfer) + head_sum
  if arch == "pad_net":
    cn = c[-1]
    return (backbone + t * (9 * cn * cn + 2 * cn)
            + sum(2 * heads[k] + 9 * cn * cn + cn + (t - 1) * 9 * cn * cn for k in TASKS))
  raise KeyError(arch)


FORMULAS = ("hard", "partial", "cross_stitch", "mtan", "pad_net", "ltb")


def _final(out):
  return out.output if isinstance(out, models.DeepSupervision) else out


def test_registry_and_config_errors(tmp_path):
  assert set(FORMULAS) <= set(ARCHS)
  assert models.hparams("hard") == {"frozen_bn": False, "head": "task", "input_norm": "none"}
  assert models.hparams("partial") == {"branch_stage": 2}
  with pytest.raises(ValueError, match=r"model.architecture: got 'nope'.*'partial'"):
    _build("nope")
  with pytest.raises(ValueError, match=r"model.branch_stage: not a hyperparameter of .*'hard'"):
    _build("hard", branch_stage=1)
  with pytest.raises(ValueError, match=r"model.branch_stage: got 4; expected an int in \[0, 3\]"):
    _build("partial", branch_stage=4)
  with pytest.raises(ValueError, match=r"model.alpha_self"):
    _build("cross_stitch", alpha_self=1.5)
  with pytest.raises(UserError, match=r"config.model.architecture: got 'nope'"):
    config_lib.model_config("nope")
  cfg = config_lib.model_config("ltb", backbone="resnet_tiny")
  assert cfg.temperature == 1.0 and cfg.architecture == "ltb"
  from mtjax.train import setup
  from tests.helpers import tiny_config

  bad = tiny_config(tmp_path)
  with bad.unlocked():
    bad.model = config_lib.model_config("partial", **{k: v for k, v in bad.model.items()
                                                      if k != "architecture"})
  bad.model.branch_stage = 7
  with pytest.raises(UserError, match=r"config.model.branch_stage: got 7"):
    setup.build(bad)


def _split_resnet(tree, stage_sizes):
  """A ResNet's variables as ``{"stem": ..., "stage<i>": ...}`` (blocks renumbered per stage)."""
  ends = np.cumsum(stage_sizes)
  out = {"stem": {k: v for k, v in tree.items() if "Block_" not in k}}
  for key, value in tree.items():
    if "Block_" in key:
      prefix, index = key.rsplit("_", 1)
      stage = int(np.searchsorted(ends, int(index), side="right"))
      start = 0 if stage == 0 else int(ends[stage - 1])
      out.setdefault(f"stage{stage + 1}", {})[f"{prefix}_{int(index) - start}"] = value
  return out


def _random_variables(model, images, seed):
  """Random variables of ``model``'s shapes (BatchNorm variances in [0.5, 1.5]): no init is
  compiled."""
  rng = np.random.default_rng(seed)

  def draw(path, x):
    values = (rng.uniform(0.5, 1.5, x.shape) if jax.tree_util.keystr(path).endswith("['var']")
              else rng.normal(0.0, 0.3, x.shape))
    return jnp.asarray(values, x.dtype)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images[:1])
  return jax.tree_util.tree_map_with_path(draw, shapes)


def _both_modes(model):
  """``variables -> [evaluation outputs, training outputs]``, jitted once."""
  return jax.jit(lambda v, images: [model.apply(v, images, train, mutable=["batch_stats"])[0]
                                    for train in (False, True)])


def test_partial_at_the_last_stage_is_hard():
  hard, partial = _build("hard"), _build("partial", branch_stage=3)
  images = jnp.asarray(scenes(4, SIZE)["image"])
  vh = _random_variables(hard, images, 1)
  vp = {}
  for col in ("params", "batch_stats"):
    pieces = _split_resnet(vh[col]["backbone"], hard.backbone.stage_sizes)
    vp[col] = {**{f"shared_{k}": v for k, v in pieces.items()},
               **{k: v for k, v in vh[col].items() if k.startswith("heads_")}}
  assert (jax.tree_util.tree_structure(vp)
          == jax.tree_util.tree_structure(_init_shapes(partial)))
  for out_h, out_p in zip(_both_modes(hard)(vh, images), _both_modes(partial)(vp, images),
                          strict=True):
    for task in TASKS:
      np.testing.assert_allclose(out_p[task], out_h[task], rtol=1e-5, atol=1e-6)


def test_identity_cross_stitch_is_independent_networks():
  tasks = tiny_tasks(TASKS)
  images = jnp.asarray(scenes(4, SIZE)["image"])
  cs = _build("cross_stitch", alpha_self=1.0)
  vc = _random_variables(cs, images, 2)
  # Only the cross-stitch units are initialised (the columns are not called): no forward pass.
  init = cs.init(jax.random.PRNGKey(2), images[:1], method=lambda module, x: module.units)
  init = init["params"]
  for i in (1, 2):  # the identity initialisation (the default's 0.9 / 0.1: test_architecture)
    np.testing.assert_array_equal(init[f"cross_stitch_stage{i}"], np.eye(len(TASKS)))
    vc["params"][f"cross_stitch_stage{i}"] = init[f"cross_stitch_stage{i}"]
  cross_stitch = _both_modes(cs)
  outs_c = cross_stitch(vc, images)
  for task in TASKS:  # one single-task hard network per column, with the column's weights
    single = _build("hard", {task: tasks[task]})
    vs = {}
    for col in ("params", "batch_stats"):
      resnet = {}
      offset = 0
      for part in ("stem", "stage1", "stage2", "stage3"):
        for key, value in vc[col].get(f"columns_{task}_{part}", {}).items():
          if "Block_" in key:
            prefix, index = key.rsplit("_", 1)
            key = f"{prefix}_{int(index) + offset}"
          resnet[key] = value
        if part != "stem":
          offset += 1  # resnet_tiny: one block per stage
      vs[col] = {"backbone": resnet, f"heads_{task}": vc[col][f"heads_{task}"]}
    for out_c, out_s in zip(outs_c, _both_modes(single)(vs, images), strict=True):
      np.testing.assert_allclose(out_c[task], out_s[task], rtol=1e-5, atol=1e-6)
  alpha = jnp.asarray([[0.9, 0.1], [0.1, 0.9]])  # mixing: the columns are no longer independent
  mixed = cross_stitch({**vc, "params": {**vc["params"], "cross_stitch_stage1": alpha}}, images)
  assert not np.allclose(mixed[0]["segmentation"], outs_c[0]["segmentation"])


def _spy(method):
  """``method``, keeping the per-task gradients it was handed in its state."""
  def init(num_tasks, grads_like=None):
    stacked = jax.tree_util.tree_map(lambda g: jnp.zeros((num_tasks, *g.shape), g.dtype),
                                     grads_like)
    return method.init(num_tasks, grads_like), stacked

  def update(task_grads, state, *, losses, key=None):
    combined, inner, weights = method.update(task_grads, state[0], losses=losses, key=key)
    return combined, (inner, task_grads), weights
  return Method(init, update, "gradient")


def _counting(tasks, counter):
  """``tasks`` whose loss functions count their traces (a retrace means a recompile)."""
  def wrap(task):
    def loss_fn(out, batch):
      counter[0] += 1
      return task.loss_fn(out, batch)
    return task._replace(loss_fn=loss_fn)
  return {n: wrap(t) for n, t in tasks.items()}


def _train(arch, level, devices, steps, initial=None):
  """``steps`` train steps of ``arch`` with the PCGrad spy on ``devices``: ``(model, tasks,
  initial host state, [metrics], [loss traces so far], [params], [spied task gradients])`` after
  each step. ``initial``: a host state to start from (default: the trainer's own init; at the
  representation level, a parameter-level state whose weighting state is remade)."""
  counter = [0]
  tasks = _counting(tiny_tasks(TASKS), counter)
  model = _build(arch, tasks)
  mesh = step_lib.make_mesh(devices)
  spy = _spy(weighting.get("pcgrad"))
  trainer = make_trainer(model, tasks, spy, optax.adam(1e-2),
                         image_shape=(SIZE, SIZE, 3), batch_size=BATCH, grad_level=level,
                         mesh=mesh)
  if initial is None:
    initial = jax.device_get(trainer.init(jax.random.PRNGKey(0)))
  elif level == "representation":  # another level's state: only the weighting state differs
    like = gradient_like(model, initial.params, initial.batch_stats, grad_level=level,
                         image_shape=(SIZE, SIZE, 3), batch_size=BATCH)
    initial = initial._replace(weighting_state=jax.device_get(spy.init(len(TASKS), like)))
  state = step_lib.replicate(initial, mesh)
  batch = step_lib.shard_batch(_batch(), mesh)
  history, traces, params, grads = [], [], [], []
  for _ in range(steps):
    state, metrics = trainer.step(state, batch)
    history.append(jax.device_get(metrics))
    traces.append(counter[0])
    params.append(jax.device_get(state.params))
    grads.append(jax.device_get(state.weighting_state[1]))
  return model, tasks, initial, history, traces, params, grads


@functools.cache
def _batch():
  return scenes(BATCH, SIZE)


def _expected_relations(arch):
  t = len(TASKS)
  if arch == "cross_stitch":
    return {f"cross_stitch/stage{i}": (t, t) for i in (1, 2)}
  if arch == "ltb":
    return {f"ltb/stage{i}": (t, t) for i in (1, 2, 3)}
  if arch == "mtan":
    return {f"mtan/{k}/stage{i}": () for k in TASKS for i in (1, 2, 3)}
  if arch == "pad_net":
    return {**{f"pad_net/{k}/gate": () for k in TASKS},
            **{f"pad_net/{k}/{s}": () for k in TASKS for s in TASKS if s != k}}
  if arch in ("mmoe", "cgc", "ple", "dselect_k"):  # one gate per task (PLE: per level below)
    gates = {f"gate/{k}" for k in TASKS}
    if arch == "ple":
      gates |= {f"gate/{k}/level1" for k in (*TASKS, "shared")}
    if arch == "dselect_k":
      gates |= {f"dselect_k/{k}/{part}" for k in TASKS for part in ("selectors", "alpha")}
    return gates
  return {}


def _flat(task_grads):
  leaves = jax.tree_util.tree_leaves(task_grads)
  flat = np.concatenate([np.reshape(np.asarray(x, np.float32), (len(TASKS), -1))
                         for x in leaves], axis=1)
  assert flat.shape[1] <= PAD, f"raise PAD to at least {flat.shape[1]}"
  return np.pad(flat, ((0, 0), (0, PAD - flat.shape[1])))


# 8 devices against 1 for one architecture of each kind of forward pass (CI time): the encoder
# path (hard), the general path with (T, T) relations (cross_stitch), the Gumbel noise key
# (ltb). None of the others has device-count-dependent code.
EIGHT_DEVICES = ("hard", "cross_stitch", "ltb")


@functools.cache
def _jitted_update(name):
  """``name``'s jitted ``update`` and initial state for ``PAD``-long gradients: compiled once
  per process, whatever the architecture (every input is padded to ``PAD``)."""
  method = weighting.get(name)
  return jax.jit(method.update), method.init(len(TASKS), jnp.zeros((PAD,)))


GRADIENT_METHODS = [n for n in weighting.names() if weighting.get(n).level == "gradient"]


def _check_shapes_labels_and_count(arch, model, params, batch_stats):
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((BATCH, SIZE, SIZE, 3))),
                       {"params": params, "batch_stats": batch_stats})
  assert _final(out["segmentation"]).shape[:3] == (BATCH, SIZE, SIZE)
  assert _final(out["depth"]).shape == (BATCH, SIZE, SIZE, 1)
  owners = {labels.owner(g) for g in labels.groups(model, params)}
  assert owners <= {"shared", *TASKS} and set(TASKS) <= owners, owners
  labels.groups(model, batch_stats)  # every path labelled
  if arch in FORMULAS:
    assert _count(params) == _formula(arch), arch


def _check_relations(arch, metrics):
  relations = {k[len("relations/"):]: v for k, v in metrics.items()
               if k.startswith("relations/")}
  expected = _expected_relations(arch)
  if isinstance(expected, set):  # the gates' shapes depend on the expert counts
    assert set(relations) == expected, (arch, sorted(relations))
  else:
    assert {k: np.shape(v) for k, v in relations.items()} == expected, arch
  assert all(np.all(np.isfinite(v)) for v in relations.values()), arch
  if arch == "cross_stitch":  # the α of the first step: the initialisation (Misra's 0.9 / 0.1)
    np.testing.assert_allclose(relations["cross_stitch/stage1"], [[.9, .1], [.1, .9]])
  if arch == "ltb":  # the branching probabilities start uniform
    np.testing.assert_allclose(relations["ltb/stage1"], np.full((2, 2), 0.5))
  if arch == "pad_net":
    assert all(f"loss/{t}/intermediate" in metrics for t in TASKS)


def _check_task_gradients(model, tasks, initial, recorded):
  """The step's per-task gradients of the shared parameters = ``jax.jacrev`` of the loss vector
  (the encoder path: ``encode`` on the shared parameters, ``decode`` on the task's)."""
  own = labels.split(model, initial.params)
  others = [own[t] for t in tasks]
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}

  def loss_vector(shared):
    variables = {"params": labels.merge(shared, *others), "batch_stats": initial.batch_stats}
    out, _ = model.apply(variables, batch["image"], train=True, mutable=["batch_stats"])
    return jnp.stack([step_lib.output_loss(tasks[t], out[t], batch)[0] for t in tasks])

  want = jax.jit(jax.jacrev(loss_vector))(own["shared"])
  assert jax.tree_util.tree_structure(recorded) == jax.tree_util.tree_structure(want)
  for got, expected in zip(jax.tree_util.tree_leaves(recorded), jax.tree_util.tree_leaves(want),
                           strict=True):
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_architecture(arch):
  """Everything about one architecture from one trainer per gradient level (see the module
  docstring): shapes, labels, count; 4 steps compiled once that lower the joint loss, with the
  relations it sows; 8 devices = 1; the representation level or its refusal; every
  gradient-level method on the real per-task gradients of each level."""
  model, tasks, initial, history, traces, params, grads = _train(
      arch, "parameter", jax.devices()[:1], 4)
  _check_shapes_labels_and_count(arch, model, initial.params, initial.batch_stats)
  losses = [float(m["loss"]) for m in history]
  assert losses[-1] < losses[0], (arch, losses)
  assert traces[0] > 0 and traces[-1] == traces[0], (arch, traces)  # compiled once
  _check_relations(arch, history[0])
  if arch == "cgc":  # task experts in decode: the encoder path with task-owned encoder inputs
    _check_task_gradients(model, tasks, initial, grads[0])
  levels = {"parameter": _flat(grads[-1])}

  if arch in EIGHT_DEVICES:
    *_, history8, _, params8, _ = _train(arch, "parameter", jax.devices()[:8], 2, initial)
    for one, eight in zip(history[:2], history8, strict=True):
      for key in one:
        np.testing.assert_allclose(eight[key], one[key], rtol=2e-4, atol=1e-5,
                                   err_msg=f"{arch} {key}")
    # Adam divides by √v: a summation-order difference in a near-zero gradient entry grows.
    for a, b in zip(jax.tree_util.tree_leaves(params8[-1]),
                    jax.tree_util.tree_leaves(params[1]), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-4, err_msg=arch)

  if step_lib.has_shared_encoder(model):
    *_, history_r, _, _, grads_r = _train(arch, "representation", jax.devices()[:1], 1,
                                          initial)
    assert np.isfinite(float(history_r[0]["loss"])), arch
    levels["representation"] = _flat(grads_r[0])
  else:
    with pytest.raises(ValueError, match=r"grad_level: 'representation' needs a shared"):
      _train(arch, "representation", jax.devices()[:1], 1)

  task_losses = jnp.asarray([history[-1][f"loss/{t}"] for t in TASKS])
  for name in GRADIENT_METHODS:
    update, state0 = _jitted_update(name)
    for level, task_grads in levels.items():
      combined, _, weights = update(jnp.asarray(task_grads), state0, losses=task_losses,
                                    key=jax.random.PRNGKey(0))
      assert combined.shape == (PAD,), (name, arch, level)
      assert np.all(np.isfinite(combined)), (name, arch, level)
      assert np.all(np.isfinite(weights)) or name in ("graddrop", "db_mtl"), (name, arch)


def test_relations_are_logged_as_json():
  from mtjax.train import loop

  record = loop.log_record({"loss": jnp.float32(1.5),
                            "relations/cross_stitch/stage1": jnp.eye(2, dtype=jnp.float32),
                            "relations/mtan/depth/stage1": jnp.float32(0.25)})
  assert record == {"loss": 1.5, "relations/cross_stitch/stage1": [[1.0, 0.0], [0.0, 1.0]],
                    "relations/mtan/depth/stage1": 0.25}
