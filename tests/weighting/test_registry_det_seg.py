"""Every registered method on det_seg (FCOS detection + segmentation on one ResNet): a method
added to the registry is covered here without a line of test code.

A full train step per method costs ≈ 16 s of compilation on the 2-core CPU. So det_seg's
per-task terms are computed once per gradient level (a module fixture, the step's own
``task_terms(...).per_task()`` on det_seg's tiny model at 32 px: the parameter level's
gradients of the shared parameters, handed to the methods as one (T, D) array, and the
representation level's stacked cotangents of the FCOS pyramid's stage dict), and each method's
real ``update`` (jitted: a small compile) runs on them; the direction becomes every parameter's
gradient by the step's own ``finish`` (the representation level: back through the encoder, one
compile shared by every method). Loss-level methods weigh det_seg's real loss vector.
Meta-level methods need their meta step (second order through det_seg's losses): the step's
``meta_step`` of every one of them at 16 px, in one compiled program. Everything is compiled
with XLA's cheaper CPU code generation (:data:`FAST_COMPILE`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import weighting
from mtjax.data import render_scene
from mtjax.models import build, labels
from mtjax.train import meta as meta_lib
from mtjax.train import step as step_lib
from mtjax.train.state import TrainState
from mtjax.train.trainer import gradient_like
from tests.helpers import host_variables, tiny_tasks

NAMES = weighting.names()
LEVEL = {n: weighting.get(n).level for n in NAMES}
TASKS = ("detection", "segmentation")
SIZE, BATCH = 32, 2
# Weights that are NaN by design (GradDrop has none; DB-MTL's before its buffers fill).
NAN_WEIGHTS = ("graddrop", "db_mtl")
# XLA's CPU code generation without its expensive passes: about half the compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _scenes(n, size, seed):
  rng = np.random.default_rng(seed)
  examples = [render_scene(rng, size, size) for _ in range(n)]
  return {k: jnp.asarray(np.stack([e[k] for e in examples]))
          for k in ("image", "segmentation", "boxes", "box_classes")}


def _model():
  tasks = tiny_tasks(TASKS)
  return build("resnet_tiny", tasks, width=8, output_stride=32, stem="small",
               head_hidden=8), tasks


def _finite(tree) -> bool:
  return all(bool(np.all(np.isfinite(np.asarray(x, np.float32))))
             for x in jax.tree_util.tree_leaves(tree))


def _norms(tree) -> dict:
  """The gradient norm of each top-level group of the shared parameters (backbone stages)."""
  shared = labels.split(MODEL, tree)[labels.SHARED]
  flat = {}
  for group, sub in shared["backbone"].items():
    flat[group] = float(jnp.sqrt(sum(jnp.sum(jnp.square(x))
                                     for x in jax.tree_util.tree_leaves(sub))))
  return flat


MODEL, TASK_MAP = _model()


@pytest.fixture(scope="module")
def det_seg():
  """Parameters, batch statistics and two batches of det_seg's tiny model at 32 px."""
  variables = host_variables(MODEL, (SIZE, SIZE, 3))
  return (variables["params"], variables.get("batch_stats", {}),
          _scenes(BATCH, SIZE, seed=0), _scenes(BATCH, SIZE, seed=1))


def compiled(fn, *args):
  """``jax.jit(fn)`` compiled for ``args`` with XLA's cheaper CPU code generation (≈ half the
  compile time; the same computation)."""
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)


def _terms(level, params, stats, batch):
  terms = step_lib.task_terms(MODEL, TASK_MAP, params, stats, batch, grad_level=level)
  grads, finish = terms.per_task()
  # finish of a zero direction: every task's own parameters' gradient, the shared part 0.
  return terms.losses, grads, finish(jax.tree_util.tree_map(lambda g: jnp.zeros_like(g[0]),
                                                            grads))


def _finish(params, stats, batch, direction):
  """The representation level's finish: ``direction`` through the encoder, plus the heads."""
  terms = step_lib.task_terms(MODEL, TASK_MAP, params, stats, batch,
                              grad_level="representation")
  return terms.per_task()[1](direction)


def _flat(grads):
  """The parameter level's task gradients as one (T, D) array (the methods see the values of
  det_seg's gradients; their handling of parameter trees is tested on every architecture in
  ``tests/models/test_architectures.py``), and the inverse for one direction."""
  leaves, treedef = jax.tree_util.tree_flatten(grads)
  flat = np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for x in leaves], axis=1)
  sizes = np.cumsum([x[0].size for x in leaves])[:-1]

  def unflat(direction):
    pieces = np.split(np.asarray(direction), sizes)
    return jax.tree_util.tree_unflatten(treedef, [p.reshape(x.shape[1:]).astype(x.dtype)
                                                  for p, x in zip(pieces, leaves, strict=True)])
  return flat, unflat


@pytest.fixture(scope="module")
def terms(det_seg):
  """``{level: (losses, task grads, finish, task grads of a second batch)}``, computed once;
  ``finish(direction)``: every parameter's gradient, as the step's ``per_task`` makes it."""
  params, stats, batch, other = det_seg
  out = {}
  for level in step_lib.GRAD_LEVELS:
    fn = compiled(functools.partial(_terms, level), params, stats, batch)
    losses, grads, heads = jax.device_get(fn(params, stats, batch))
    other_grads = jax.device_get(fn(params, stats, other)[1])
    if level == "parameter":
      grads, unflat = _flat(grads)
      other_grads = _flat(other_grads)[0]
      own = labels.split(MODEL, heads)
      rest = [v for k, v in own.items() if k != labels.SHARED]

      def finish(direction, unflat=unflat, rest=rest):
        return labels.merge(unflat(direction), *rest)
    else:
      finish_fn = compiled(_finish, params, stats, batch,
                           jax.tree_util.tree_map(lambda g: g[0], grads))

      def finish(direction, finish_fn=finish_fn):
        return jax.device_get(finish_fn(params, stats, batch, direction))
    out[level] = (losses, grads, finish, other_grads, heads)
  return out


def test_det_seg_terms(det_seg, terms):
  """The terms the methods see are det_seg's: two finite positive losses, the parameter level's
  gradients those of the shared parameters, the representation level's the pyramid's stage
  dict, each task's gradient non-zero."""
  params = det_seg[0]
  shared = labels.split(MODEL, params)[labels.SHARED]
  losses, grads, finish, _, heads = terms["parameter"]
  assert losses.shape == (2,) and np.all(np.isfinite(losses)) and np.all(losses > 0)
  assert grads.shape == (2, sum(x.size for x in jax.tree_util.tree_leaves(shared)))
  gram = np.asarray(weighting.gram(grads))
  assert np.all(np.diag(gram) > 0) and np.all(np.isfinite(gram))
  assert jax.tree_util.tree_structure(finish(grads[0])) == jax.tree_util.tree_structure(params)
  _, features, _, _, _ = terms["representation"]
  assert set(features) == {"stage1", "stage2", "stage3"}
  assert all(f.shape[:2] == (2, BATCH) for f in features.values())
  assert np.all(np.diag(np.asarray(weighting.gram(features))) > 0)
  assert set(labels.split(MODEL, heads)) == {labels.SHARED, *TASKS}


@pytest.mark.parametrize("name", [n for n in NAMES if LEVEL[n] == "gradient"])
def test_gradient_method_on_det_seg(name, det_seg, terms):
  """At both levels: finite weights (T,), a finite direction shaped like one task's gradient,
  a full gradient that reaches every backbone stage; a stateful method's second call too;
  a double-sampling method's weights from the cross Gram matrix of two batches."""
  method = weighting.get(name)
  params = det_seg[0]
  for level in step_lib.GRAD_LEVELS:
    losses, grads, finish, other, _ = terms[level]
    like = jax.tree_util.tree_map(lambda g: jnp.zeros(g.shape[1:], g.dtype), grads)
    state = method.init(2, like)
    update = compiled(lambda g, s, loss, k: method.update(g, s, losses=loss, key=k),
                      grads, state, losses, jax.random.PRNGKey(0))
    for call, scale in enumerate((1.0, 0.9)):
      direction, state, weights = update(grads, state, jnp.asarray(losses * scale),
                                         jax.random.PRNGKey(call))
      assert weights.shape == (2,), (name, level)
      assert np.all(np.isfinite(weights)) or name in NAN_WEIGHTS, (name, level, weights)
      assert jax.tree_util.tree_structure(direction) == jax.tree_util.tree_structure(like)
      assert _finite((direction, state)), (name, level, call)
    full = finish(direction)
    assert jax.tree_util.tree_structure(full) == jax.tree_util.tree_structure(params)
    assert _finite(full), (name, level)
    norms = _norms(full)
    assert all(v > 0 for v in norms.values()), (name, level, norms)
    if method.double_sampling:
      cross = sum(np.einsum("id,jd->ij", a.reshape(2, -1), b.reshape(2, -1))
                  for a, b in zip(jax.tree_util.tree_leaves(grads),
                                  jax.tree_util.tree_leaves(other), strict=True))
      w, _ = jax.jit(method.from_gram)(jnp.asarray(cross, jnp.float32), method.init(2, like),
                                        losses=losses, key=jax.random.PRNGKey(0))
      assert w.shape == (2,) and np.all(np.isfinite(w)), (name, level, cross, w)


@pytest.mark.parametrize("name", [n for n in NAMES if LEVEL[n] == "loss"])
def test_loss_method_on_det_seg(name, terms):
  """On det_seg's loss vector (detection's focal + GIoU + centerness, segmentation's
  cross-entropy), twice (a stateful method sees its updated state and lower losses): finite
  weights (T,); the gradient Σ_t w_t ∇L_t is finite and reaches every backbone stage."""
  method = weighting.get(name)
  losses, grads, finish, _, heads = terms["parameter"]
  state = method.init(2, jnp.zeros(grads.shape[1:]))

  def weigh(state, losses, key):
    combined, state, weights = method.update(None, state, losses=losses, key=key)
    assert combined is None, name  # the step back-propagates Σ_t w_t L_t itself
    return state, weights

  update = compiled(weigh, state, jnp.asarray(losses), jax.random.PRNGKey(0))
  for call, scale in enumerate((1.0, 0.9)):
    state, weights = update(state, jnp.asarray(losses * scale), jax.random.PRNGKey(call))
    assert weights.shape == (2,) and np.all(np.isfinite(weights)), (name, weights)
    assert _finite(state), name
  # ∇ Σ_t w_t L_t: the shared part Σ_t w_t g_t, each head's gradient times its task's weight.
  own = labels.split(MODEL, heads)
  full = labels.merge(finish(weighting.weighted_sum(grads, weights)),
                      *(jax.tree_util.tree_map(lambda g, i=i: weights[i] * g, own[t])
                        for i, t in enumerate(TASKS)))
  assert _finite(full), name
  assert all(v > 0 for v in _norms(full).values()), name


META_SIZE = 16


META_NAMES = [n for n in NAMES if LEVEL[n] == "meta"]


@pytest.fixture(scope="module")
def meta_outputs():
  """``{name: (parameters, (grads, weighting state, weights, metrics))}``: each meta-level
  method's meta step on det_seg's tiny model at 16 px (a train and a meta batch), all in one
  compiled program (the shared first forward pass is compiled once: ≈ 18% less compile time
  than one program per method)."""
  variables = host_variables(MODEL, (META_SIZE, META_SIZE, 3))
  params, stats = variables["params"], variables.get("batch_stats", {})
  batch, meta_batch = _scenes(BATCH, META_SIZE, seed=2), _scenes(BATCH, META_SIZE, seed=3)
  like = gradient_like(MODEL, params, stats, grad_level="parameter",
                       image_shape=(META_SIZE, META_SIZE, 3), batch_size=BATCH)
  methods = {n: weighting.get(n) for n in META_NAMES}
  wstates = {n: m.init(2, like) for n, m in methods.items()}

  def meta_steps(params, wstates, batch, meta_batch):
    out = {}
    for name, method in methods.items():
      state = TrainState(jnp.zeros((), jnp.int32), params, stats, None, wstates[name],
                         jax.random.PRNGKey(0), None)
      terms = step_lib.task_terms(MODEL, TASK_MAP, params, stats, batch)
      out[name] = meta_lib.meta_step(MODEL, TASK_MAP, method, state, terms, batch, meta_batch,
                                     1e-3, jax.random.PRNGKey(1))
    return out

  step = compiled(meta_steps, params, wstates, batch, meta_batch)
  return params, jax.device_get(step(params, wstates, batch, meta_batch))


@pytest.mark.parametrize("name", META_NAMES)
def test_meta_method_on_det_seg(name, meta_outputs):
  """The step's meta step (the lookahead's exact meta-gradient through det_seg's losses, or
  FORUM's value-function terms): finite task weights (T,), finite meta information, and a
  finite model gradient that reaches every backbone stage."""
  params, outputs = meta_outputs
  grads, wstate, weights, metrics = outputs[name]
  assert weights.shape == (2,) and np.all(np.isfinite(weights)), (name, weights)
  assert _finite((wstate, metrics)), name
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
  assert _finite(grads), name
  assert all(v > 0 for v in _norms(grads).values()), name
