"""Mixture-of-experts architectures: shapes, the parameter-count formulas, MMoE with one expert
as hard sharing, the gates' distributions and DSelect-k's exact k-selection.

Their train steps (one compile, a falling loss, both levels or the refusal, every gradient
method on their per-task gradients, and CGC's per-task gradients against ``jax.jacrev``) are
``tests/models/test_architectures.py``'s; the general path that PLE takes is checked against
``jax.jacrev`` by ``tests/train/test_contracts.py``."""

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import models
from mtjax.models import backbones, build, experts, labels
from mtjax.train import step as step_lib
from tests.helpers import scenes, tiny_tasks

KW = dict(width=8, output_stride=4, stem="small", head_hidden=8)
TWO = ("segmentation", "classification")  # a dense and a global head: the cheapest pair


def _count(tree):
  return sum(x.size for x in jax.tree_util.tree_leaves(tree))


def _shapes(model, size=32, batch=2):
  out, variables = jax.eval_shape(lambda: model.init_with_output(
      jax.random.PRNGKey(0), jnp.zeros((batch, size, size, 3)), train=False))
  return out, variables


def _stage_params(hard, params):
  """``{stage number: parameter count}`` of the hard model's backbone (0: the stem)."""
  counts = {}
  for path, leaf in flax.traverse_util.flatten_dict(params["backbone"]).items():
    group = hard.backbone.param_group(path)
    stage = 0 if group == "stem" else int(group[5:])
    counts[stage] = counts.get(stage, 0) + leaf.size
  return counts


def _expected_count(name, hp, hard, hard_params, num_tasks):
  """The docstring's formula (mtjax/models/experts.py), from the hard model's counts."""
  resnet, stages = hard.backbone, _stage_params(hard, hard_params)
  n, t = len(resnet.stage_sizes), num_tasks
  total = _count(hard_params)
  if name == "ple":
    s, e_t, levels = hp["num_shared_experts"], hp["num_task_experts"], hp["num_levels"]
    for j in range(1, levels + 1):
      c = backbones.stage_channels(backbones.plan_of(resnet))[n - levels + j - 1]
      total += (s + t * e_t - 1) * stages[n - levels + j]
      total += (c + 1) * (t * (s + e_t) + (s + t * e_t) * (j < levels))
    return total
  k_stages = hp["expert_stages"]
  last = sum(stages[i] for i in range(n - k_stages + 1, n + 1))
  c = backbones.stage_channels(backbones.plan_of(resnet))[n - k_stages]
  if name == "mmoe":
    e = hp["num_experts"]
    return total + (e - 1) * last + t * (c + 1) * e
  if name == "cgc":
    s, e_t = hp["num_shared_experts"], hp["num_task_experts"]
    return total + (s + t * e_t - 1) * last + t * (c + 1) * (s + e_t)
  e, k = hp["num_experts"], hp["num_nonzeros"]
  return total + (e - 1) * last + t * (c + 1) * k * (int(math.log2(e)) + 1)


@pytest.mark.parametrize("name,backbone,overrides", [
    ("mmoe", "resnet_tiny", {}),
    ("mmoe", "resnet18", {"num_experts": 3, "expert_stages": 4}),
    ("cgc", "resnet_tiny", {}),
    ("cgc", "resnet_tiny", {"num_shared_experts": 0, "num_task_experts": 2, "expert_stages": 3}),
    ("ple", "resnet_tiny", {}),
    ("ple", "resnet50", {"num_shared_experts": 2, "num_task_experts": 0, "num_levels": 3}),
    ("dselect_k", "resnet_tiny", {}),
    ("dselect_k", "resnet_tiny", {"num_experts": 8, "num_nonzeros": 3, "expert_stages": 2}),
])
def test_output_shapes_and_parameter_count_formula(name, backbone, overrides):
  tasks = tiny_tasks()
  width = 4 if backbone == "resnet50" else 8
  kw = {**KW, "width": width}
  model = experts.ARCHITECTURES[name](backbone, tasks, models.Common(**kw), **overrides)
  hard = build(backbone, tasks, **kw)
  out, variables = _shapes(model)
  hard_out, hard_vars = _shapes(hard)
  for task in tasks:  # every head sees what it sees under hard sharing
    assert out[task].shape == hard_out[task].shape
  hp = {**models.hparams(name), **overrides}
  assert _count(variables["params"]) == _expected_count(name, hp, hard, hard_vars["params"],
                                                        len(tasks))
  # Every variable is labelled; the shared ones are the trunk and the shared experts/gates.
  groups = labels.groups(model, variables["params"])
  assert {labels.owner(g) for g in groups} == {"shared", *tasks}
  labels.label_tree(model, variables["batch_stats"])
  if name == "ple":
    assert "features" not in out and not step_lib.has_shared_encoder(model)
  else:  # the representation the representation-level methods see
    last = hard_out["features"].shape
    shared = out["features"]["experts"]
    if name == "cgc" and overrides.get("num_shared_experts") == 0:
      assert shared is None  # no shared experts: the trunk output is the whole representation
    else:
      assert shared.shape[:2] == (2, hp.get("num_experts", hp.get("num_shared_experts")))
      assert shared.shape[2:] == last[1:]


def test_mmoe_with_one_expert_is_hard_sharing():
  tasks = tiny_tasks(TWO)
  hard = build("resnet_tiny", tasks, **KW)
  mmoe = experts.build_mmoe("resnet_tiny", tasks, models.Common(**KW), num_experts=1)
  images = jnp.asarray(scenes(4, size=16)["image"])
  rng = np.random.default_rng(0)  # random variables of the right shapes: no init to compile
  hv = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype),
                              jax.eval_shape(hard.init, jax.random.PRNGKey(0), images))
  mv = jax.eval_shape(mmoe.init, jax.random.PRNGKey(1), images)

  def transplant(tree, gates):
    backbone = dict(tree["backbone"])
    expert = {"BasicBlock_0": backbone.pop("BasicBlock_2")}  # numbered from 0 in the expert
    return {"trunk": backbone, "experts_0": expert, **gates,
            **{k: v for k, v in tree.items() if k.startswith("heads_")}}

  gates = jax.tree_util.tree_map(  # any gate: a softmax over one expert is 1
      lambda x: jnp.full(x.shape, 0.3, x.dtype),
      {k: v for k, v in mv["params"].items() if k.startswith("gates_")})
  params = transplant(hv["params"], gates)
  # The structure: hard sharing's parameters plus one (C + 1)-parameter gate per task.
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(mv["params"])
  variables = {"params": params, "batch_stats": transplant(hv["batch_stats"], {})}
  (want, want_stats), (got, state) = jax.jit(lambda hv, variables: (
      hard.apply(hv, images, train=True, mutable=["batch_stats"]),
      mmoe.apply(variables, images, train=True, mutable=["batch_stats", "relations"])))(
          hv, variables)
  for task in tasks:
    np.testing.assert_allclose(got[task], want[task], rtol=1e-6, atol=1e-6)
    assert state["relations"][f"gate/{task}"][0].tolist() == [1.0]
  np.testing.assert_allclose(got["features"]["experts"][:, 0], want["features"], rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(transplant(want_stats["batch_stats"], {})),
                  jax.tree_util.tree_leaves(state["batch_stats"]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_gates_are_per_example_distributions():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 16)), jnp.float32)
  x = x.at[0].mul(1e4).at[1].set(0.0)  # a huge input (saturated softmax) and a zero one
  for gate in (experts.SoftmaxGate(5), experts.DSelectKGate(8, 3)):
    weights, extras = jax.jit(lambda x, gate=gate: gate.apply(gate.init(jax.random.PRNGKey(0), x),
                                                               x))(x)
    assert weights.shape == (6, gate.num_experts)
    assert np.all(np.isfinite(weights)) and np.all(weights >= 0)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
    if extras:  # DSelect-k: each selector is a distribution, mixed by a softmax
      np.testing.assert_allclose(extras["selectors"].sum(-1), 1.0, rtol=1e-6)
      np.testing.assert_allclose(extras["alpha"].sum(-1), 1.0, rtol=1e-6)
      # At initialisation every smooth step is in its band: all experts get weight.
      assert np.all(weights[1:] > 0)


def test_smooth_step_is_a_c1_step():
  gamma = 2.0
  t = np.linspace(-2.0, 2.0, 401, dtype=np.float32)
  edges = np.array([-gamma / 2, gamma / 2, -gamma / 2 * (1 - 1e-4), gamma / 2 * (1 - 1e-4), 0.0],
                   np.float32)
  values, slopes = jax.jit(lambda t: (experts.smooth_step(t, gamma), jax.vmap(jax.grad(
      lambda u: experts.smooth_step(u, gamma)))(t)))(np.concatenate([t, edges]))
  s, (at_low, at_high, in_low, in_high, mid) = values[:401], slopes[401:]
  assert np.all(np.diff(s) >= 0) and float(s[0]) == 0.0 and float(s[-1]) == 1.0
  np.testing.assert_allclose(values[401:403], [0.0, 1.0], atol=1e-6)  # continuous at the edges
  np.testing.assert_allclose([at_low, at_high, in_low, in_high], 0.0, atol=1e-3)  # and flat
  np.testing.assert_allclose(mid, 3 / (2 * gamma), rtol=1e-6)


@pytest.mark.parametrize("k", [1, 3])
def test_dselect_k_selects_exactly_k_experts_once_saturated(k):
  num_experts, gamma = 8, 1.0
  gate = experts.DSelectKGate(num_experts, k, gamma)
  x = jnp.asarray(np.random.default_rng(k).normal(size=(5, 6)), jnp.float32)
  params = jax.jit(gate.init)(jax.random.PRNGKey(0), x)["params"]
  apply = jax.jit(lambda p: gate.apply({"params": p}, x))
  # Selector i saturated on the binary code of expert 2i + 1 (distinct experts).
  codes = experts.binary_codes(num_experts)
  chosen = [2 * i + 1 for i in range(k)]
  bias = np.concatenate([np.where(codes[e], 1.0, -1.0) * gamma for e in chosen])
  params = {**params, "z_logits": {"kernel": jnp.zeros_like(params["z_logits"]["kernel"]),
                                   "bias": jnp.asarray(bias, jnp.float32)}}
  weights, extras = apply(params)
  assert np.all(np.count_nonzero(np.asarray(weights), axis=-1) == k)
  assert np.all(np.asarray(weights)[:, chosen] > 0)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(weights[:, chosen], extras["alpha"], rtol=1e-6)
  # Saturated: the selection no longer moves (zero gradient into the z logits).
  grads = jax.jit(jax.grad(lambda p: jnp.sum(apply(p)[0] * jnp.arange(8.0))))(params)
  assert float(jnp.abs(grads["z_logits"]["bias"]).max()) == 0.0
  assert float(jnp.abs(grads["w_logits"]["bias"]).max()) > 0.0 or k == 1  # α = 1 when k = 1
  # Input-dependent saturation (a large kernel): at most k experts per example, weights sum to 1.
  big = {**params, "z_logits": {"kernel": 1e3 * jax.random.normal(
      jax.random.PRNGKey(1), params["z_logits"]["kernel"].shape), "bias": bias}}
  weights, _ = apply(big)
  assert np.all(np.count_nonzero(np.asarray(weights), axis=-1) <= k)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)


def test_bad_hyperparameters_name_the_field():
  tasks = tiny_tasks(TWO)
  cases = [
      (experts.build_dselect_k, {"num_experts": 6}, r"model.num_experts: dselect_k needs a "
                                                    r"power of 2"),
      (experts.build_dselect_k, {"num_nonzeros": 5}, r"model.num_nonzeros: expected an int in "
                                                     r"1..4"),
      (experts.build_dselect_k, {"gamma": 0.0}, r"model.gamma"),
      (experts.build_dselect_k, {"entropy_reg": -1.0}, r"model.entropy_reg: expected a float"),
      (experts.build_mmoe, {"num_experts": 0}, r"model.num_experts: expected an int >= 1"),
      (experts.build_mmoe, {"expert_stages": 4}, r"model.expert_stages: expected an int in 1..3 "
                                                 r"\(the backbone has 3 stages\)"),
      (experts.build_cgc, {"num_shared_experts": 0, "num_task_experts": 0},
       r"a task needs at least one expert"),
      (experts.build_ple, {"num_shared_experts": 0}, r"model.num_shared_experts"),
      (experts.build_ple, {"num_levels": 0}, r"model.num_levels: expected an int in 1..3"),
      (experts.build_mmoe, {"dtype": "float16"}, r"model.dtype"),
  ]
  for builder, kwargs, message in cases:
    with pytest.raises(ValueError, match=message):
      common = {k: v for k, v in {**KW, **kwargs}.items() if k in models.COMMON}
      hparams = {k: v for k, v in kwargs.items() if k not in models.COMMON}
      builder("resnet_tiny", tasks, models.Common(**common), **hparams)
  assert models.hparams("dselect_k") == {"num_experts": 4, "num_nonzeros": 2, "gamma": 1.0,
                                          "entropy_reg": 1e-6, "expert_stages": 1}
  with pytest.raises(ValueError, match="model.architecture"):
    models.hparams("moe")
