"""Every registered sharing architecture: shapes, parameter counts, equivalences, train steps.

An architecture added to ``mtjax.models.ARCHITECTURES`` is picked up here: its output shapes,
labels, train steps (compiled once, lowering the loss; 8 devices = 1 device for one
architecture of each kind, `EIGHT_DEVICES`), both gradient
levels where it has a shared encoder (the representation level refused otherwise) and every
gradient-level weighting method on its real per-task gradients. Its parameter-count formula is
checked where it is listed in ``FORMULAS`` (those of the expert architectures live with their
tests).

What "every weighting method on every architecture" covers, honestly: per architecture, one
full jitted train step at each supported gradient level with PCGrad (a representative
gradient-level method) wrapped in a spy that keeps the per-task gradients the step handed it;
then every registered gradient-level method's ``update`` is applied to each architecture's real
per-task gradients at each level (flattened and zero-padded to one size, so each method
compiles once). Loss-level methods see only the loss vector, the same for every architecture;
meta-level methods need the meta step: both are covered on the hard-sharing model by
``tests/weighting/test_registry.py``, not per architecture here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtjax import config as config_lib
from mtjax import models, weighting
from mtjax.errors import UserError
from mtjax.models import labels, sharing
from mtjax.train import step as step_lib
from mtjax.train.trainer import make_trainer
from mtjax.weighting.base import Method
from tests.helpers import scenes, tiny_tasks

TASKS = ("segmentation", "depth")
SIZE, BATCH = 16, 8
COMMON = dict(width=4, output_stride=4, stem="small", head_hidden=4)
ARCHS = models.names()


def _build(arch, tasks=None, **hparams):
  return models.build("resnet_tiny", tasks or tiny_tasks(TASKS), architecture=arch, **COMMON,
                      **hparams)


def _count(tree):
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def _init_shapes(model):
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                           jnp.zeros((1, SIZE, SIZE, 3)), train=False))


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
  channels = sharing.stage_channels(sharing.trunk_spec(model.backbone))
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


@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_labels_and_parameter_count(arch):
  model = _build(arch)
  variables = _init_shapes(model)
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((BATCH, SIZE, SIZE, 3))), variables)
  assert _final(out["segmentation"]).shape[:3] == (BATCH, SIZE, SIZE)
  assert _final(out["depth"]).shape == (BATCH, SIZE, SIZE, 1)
  owners = {labels.owner(g) for g in labels.groups(model, variables["params"])}
  assert owners <= {"shared", *TASKS} and set(TASKS) <= owners, owners
  labels.groups(model, variables["batch_stats"])  # every path labelled
  if arch in FORMULAS:
    assert _count(variables["params"]) == _formula(arch), arch


def test_registry_and_config_errors(tmp_path):
  assert set(FORMULAS) <= set(ARCHS)
  assert models.hparams("hard") == {"frozen_bn": False}
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
  from mtjax.train import loop
  from tests.helpers import tiny_config

  bad = tiny_config(tmp_path)
  with bad.unlocked():
    bad.model = config_lib.model_config("partial", **{k: v for k, v in bad.model.items()
                                                      if k != "architecture"})
  bad.model.branch_stage = 7
  with pytest.raises(UserError, match=r"config.model.branch_stage: got 7"):
    loop.build(bad)


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


def _apply_both(model_a, vars_a, model_b, vars_b, images):
  """Both models' outputs in evaluation and in training mode (one jit each)."""
  def both(model, variables):
    return [model.apply(variables, images, train, mutable=["batch_stats"])[0]
            for train in (False, True)]
  outs_a = jax.jit(lambda v: both(model_a, v))(vars_a)
  outs_b = jax.jit(lambda v: both(model_b, v))(vars_b)
  return list(zip(outs_a, outs_b, strict=True))


def test_partial_at_the_last_stage_is_hard():
  hard, partial = _build("hard"), _build("partial", branch_stage=3)
  images = jnp.asarray(scenes(4, SIZE)["image"])
  vh = hard.init(jax.random.PRNGKey(1), images[:1], train=False)
  vp = {}
  for col in ("params", "batch_stats"):
    pieces = _split_resnet(vh[col]["backbone"], hard.backbone.stage_sizes)
    vp[col] = {**{f"shared_{k}": v for k, v in pieces.items()},
               **{k: v for k, v in vh[col].items() if k.startswith("heads_")}}
  assert (jax.tree_util.tree_structure(vp)
          == jax.tree_util.tree_structure(_init_shapes(partial)))
  for out_h, out_p in _apply_both(hard, vh, partial, vp, images):
    for task in TASKS:
      np.testing.assert_allclose(out_p[task], out_h[task], rtol=1e-5, atol=1e-6)


def test_identity_cross_stitch_is_independent_networks():
  tasks = tiny_tasks(TASKS)
  images = jnp.asarray(scenes(4, SIZE)["image"])
  cs = _build("cross_stitch", alpha_self=1.0)
  vc = cs.init(jax.random.PRNGKey(2), images[:1], train=False)
  for i in (1, 2):
    np.testing.assert_array_equal(vc["params"][f"cross_stitch_stage{i}"], np.eye(len(TASKS)))
  default = _build("cross_stitch").init(jax.random.PRNGKey(2), images[:1], train=False)
  np.testing.assert_allclose(default["params"]["cross_stitch_stage1"], [[.9, .1], [.1, .9]])
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
    outs = list(_apply_both(cs, vc, single, vs, images))
    for out_c, out_s in outs:
      np.testing.assert_allclose(out_c[task], out_s[task], rtol=1e-5, atol=1e-6)
  mixed = jax.jit(lambda v: cs.apply(v, images))(vc | {"params": default["params"]})
  assert not np.allclose(mixed["segmentation"], outs[0][0]["segmentation"])


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


def _train(arch, level, devices, steps):
  counter = [0]
  tasks = _counting(tiny_tasks(TASKS), counter)
  model = _build(arch, tasks)
  mesh = step_lib.make_mesh(devices)
  trainer = make_trainer(model, tasks, _spy(weighting.get("pcgrad")), optax.adam(1e-2),
                         image_shape=(SIZE, SIZE, 3), batch_size=BATCH, grad_level=level,
                         mesh=mesh)
  state = step_lib.replicate(trainer.init(jax.random.PRNGKey(0)), mesh)
  batch = step_lib.shard_batch(scenes(BATCH, SIZE), mesh)
  history, traces, params = [], [], []
  for _ in range(steps):
    state, metrics = trainer.step(state, batch)
    history.append(jax.device_get(metrics))
    traces.append(counter[0])
    params.append(jax.device_get(state.params))
  return jax.device_get(state), history, traces, params


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
  if arch in ("hard", "partial"):
    return {}
  return None  # not known here: only checked to be finite


def _flat(task_grads):
  leaves = jax.tree_util.tree_leaves(task_grads)
  return np.concatenate([np.reshape(np.asarray(x, np.float32), (len(TASKS), -1))
                         for x in leaves], axis=1)


# 8 devices against 1 for one architecture of each kind of forward pass (CI time): the encoder
# path (hard), the general path with (T, T) relations (cross_stitch), the Gumbel noise key
# (ltb). None of the others has device-count-dependent code.
EIGHT_DEVICES = ("hard", "cross_stitch", "ltb")


def test_train_steps_and_every_gradient_method_on_every_architecture():
  """The train steps of every architecture, then every gradient method on their gradients
  (see the module docstring)."""
  collected = {}
  for arch in ARCHS:
    state, history, traces, params = _train(arch, "parameter", jax.devices()[:1], 4)
    losses = [float(m["loss"]) for m in history]
    assert losses[-1] < losses[0], (arch, losses)
    assert traces[0] > 0 and traces[-1] == traces[0], (arch, traces)  # compiled once
    relations = {k[len("relations/"):]: v for k, v in history[0].items()
                 if k.startswith("relations/")}
    expected = _expected_relations(arch)
    if expected is not None:
      assert {k: np.shape(v) for k, v in relations.items()} == expected, arch
    assert all(np.all(np.isfinite(v)) for v in relations.values()), arch
    if arch == "cross_stitch":  # the α of the first step: the initialisation
      np.testing.assert_allclose(relations["cross_stitch/stage1"], [[.9, .1], [.1, .9]])
    if arch == "ltb":  # the branching probabilities start uniform
      np.testing.assert_allclose(relations["ltb/stage1"], np.full((2, 2), 0.5))
    if arch == "pad_net":
      assert all(f"loss/{t}/intermediate" in history[0] for t in TASKS)
    collected[(arch, "parameter")] = _flat(state.weighting_state[1])

    if arch in EIGHT_DEVICES:
      _, history8, _, params8 = _train(arch, "parameter", jax.devices()[:8], 2)
      for one, eight in zip(history[:2], history8, strict=True):
        for key in one:
          np.testing.assert_allclose(eight[key], one[key], rtol=2e-4, atol=1e-5,
                                     err_msg=f"{arch} {key}")
      # Adam divides by √v: a summation-order difference in a near-zero gradient entry grows.
      for a, b in zip(jax.tree_util.tree_leaves(params8[-1]),
                      jax.tree_util.tree_leaves(params[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-4, err_msg=arch)

    if step_lib.has_shared_encoder(_build(arch)):
      state, history, _, _ = _train(arch, "representation", jax.devices()[:1], 1)
      assert np.isfinite(float(history[0]["loss"])), arch
      collected[(arch, "representation")] = _flat(state.weighting_state[1])
    else:
      with pytest.raises(ValueError, match=r"grad_level: 'representation' needs a shared"):
        _train(arch, "representation", jax.devices()[:1], 1)

  size = max(g.shape[1] for g in collected.values())
  padded = {k: np.pad(g, ((0, 0), (0, size - g.shape[1]))) for k, g in collected.items()}
  losses = jnp.array([1.0, 2.0])
  for name in weighting.names():
    method = weighting.get(name)
    if method.level != "gradient":
      continue
    update = jax.jit(method.update)
    state0 = method.init(len(TASKS), jnp.zeros((size,)))
    for (arch, level), grads in padded.items():
      combined, _, weights = update(jnp.asarray(grads), state0, losses=losses,
                                    key=jax.random.PRNGKey(0))
      assert combined.shape == (size,), (name, arch, level)
      assert np.all(np.isfinite(combined)), (name, arch, level)
      assert np.all(np.isfinite(weights)) or name in ("graddrop", "db_mtl"), (name, arch)


def test_relations_are_logged_as_json():
  from mtjax.train import loop

  record = loop.log_record({"loss": jnp.float32(1.5),
                            "relations/cross_stitch/stage1": jnp.eye(2, dtype=jnp.float32),
                            "relations/mtan/depth/stage1": jnp.float32(0.25)})
  assert record == {"loss": 1.5, "relations/cross_stitch/stage1": [[1.0, 0.0], [0.0, 1.0]],
                    "relations/mtan/depth/stage1": 0.25}
