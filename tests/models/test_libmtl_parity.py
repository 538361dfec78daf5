"""mtjax's architectures against LibMTL's on the same weights (eval mode).

The fixture (``tests/fixtures/make_libmtl_arch_fixture.py``, run with torch and LibMTL's own
classes) holds LibMTL's state dicts of Cross_stitch, LTB, MTAN, MMoE, CGC, DSelect_k and PLE on
a tiny ResNet-18 (widths 2·(1, 2, 4, 8), random weights and BatchNorm statistics), identity
decoders, and their outputs on one input. Each test converts a state dict to mtjax's
parameters (the converters below: LibMTL's keys to torchvision's, then
:func:`mtjax.models.pretrained.convert`; MTAN's attention biases folded into BatchNorm's mean)
and checks mtjax's per-task outputs against LibMTL's: EVIDENCE. Where mtjax differs from
LibMTL by design (docs/architectures.md), LibMTL's model was run with exactly that difference
substituted (the script's docstring lists them), so equality shows the difference is the
named one and nothing else. One compile per architecture.
"""

import functools
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import models
from mtjax.models import experts, pretrained
from tests.helpers import tiny_tasks

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures"
TASKS = ("segmentation", "depth")
COMMON = dict(width=2, output_stride=32, stem="imagenet", head_hidden=4)
HPARAMS = {
    "cross_stitch": {}, "ltb": {}, "mtan": {},
    "mmoe": {"num_experts": 4, "expert_stages": 2},
    "cgc": {"num_shared_experts": 1, "num_task_experts": 1, "expert_stages": 2},
    "dselect_k": {"num_experts": 4, "num_nonzeros": 2, "expert_stages": 2},
    "ple": {"num_shared_experts": 1, "num_task_experts": 1, "num_levels": 4},
}


@functools.cache
def _fixture():
  from safetensors.numpy import load_file
  tensors = {k: np.asarray(v, np.float32)
             for k, v in load_file(str(FIXTURES / "libmtl_arch.safetensors")).items()}
  return tensors, dict(np.load(FIXTURES / "libmtl_arch.npz"))


class _Identity(nn.Module):
  """LibMTL's decoders of the fixture: the architecture's per-task output itself."""

  @nn.compact
  def __call__(self, x, output_size, train: bool = False):
    del output_size, train
    return x


def _build(arch):
  names = ("segmentation",) if arch == "ple" else TASKS
  tasks = {n: t._replace(head=lambda hidden, dtype: _Identity())
           for n, t in tiny_tasks(names).items()}
  return models.build("resnet18", tasks, architecture=arch, **COMMON, **HPARAMS[arch]), names


# ---------------------------------------------------------------------------------------------
# Converters: LibMTL state dict -> mtjax variables.


def _state(arch):
  tensors, _ = _fixture()
  prefix = f"{arch}/"
  return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _renamed(sd, renames):
  """The tensors of ``sd`` under ``renames`` ``[(LibMTL prefix, torchvision prefix), ...]``."""
  out = {}
  for old, new in renames:
    matched = {new + k[len(old):]: v for k, v in sd.items() if k.startswith(old)}
    assert matched, old
    out.update(matched)
  return out


def _stem(prefix):
  """A LibMTL ``Sequential(conv1, bn1, relu, maxpool)`` at ``prefix``: torchvision's stem."""
  return [(f"{prefix}0.", "conv1."), (f"{prefix}1.", "bn1.")]


def _resnet(variables, name, tv, num_stages):
  """Fills ``variables[...][name]`` (a ResNet piece) from torchvision-named tensors ``tv``."""
  params, stats = pretrained.convert(tv, variables["params"][name],
                                     variables["batch_stats"].get(name, {}),
                                     (2,) * num_stages, "basic")
  variables["params"][name] = params
  if stats:
    variables["batch_stats"][name] = stats


def _linear(sd, prefix):
  """A Flax ``Dense``'s parameters from LibMTL's ``nn.Linear`` at ``prefix``."""
  return {"kernel": sd[prefix + "weight"].T, "bias": sd[prefix + "bias"]}


def _conv_bn(sd, conv, bn, fold_bias=False):
  """``(conv params, BN params, BN stats)`` of a LibMTL conv + BatchNorm2d; ``fold_bias``: the
  conv's bias into the BN mean (mtjax's convolutions before BN have none; in eval mode
  ``BN(Wx + b)`` with mean ``μ`` is ``BN(Wx)`` with mean ``μ - b``)."""
  mean = sd[bn + "running_mean"] - (sd[conv + "bias"] if fold_bias else 0.0)
  return ({"kernel": sd[conv + "weight"].transpose(2, 3, 1, 0)},
          {"scale": sd[bn + "weight"], "bias": sd[bn + "bias"]},
          {"mean": mean, "var": sd[bn + "running_var"]})


def _convert_columns(arch, variables, sd, names):
  """Cross-stitch's columns and LTB's nodes: a stem and four stages per task."""
  for tn, task in enumerate(names):
    _resnet(variables, f"{'columns' if arch == 'cross_stitch' else 'nodes'}_{task}_stem",
            _renamed(sd, _stem(f"encoder.resnet_conv.{task}.")), 0)
    for i in range(1, 5):
      piece = f"{'columns' if arch == 'cross_stitch' else 'nodes'}_{task}_stage{i}"
      _resnet(variables, piece,
              _renamed(sd, [(f"encoder.resnet_layer.{i - 1}.{tn}.", "layer1.")]), 1)


def convert(arch, variables):
  """mtjax variables of ``arch`` (their structure: ``variables``) from LibMTL's state dict."""
  sd = _state(arch)
  variables = jax.tree_util.tree_map(np.asarray, variables)
  variables = {"params": dict(variables["params"]),
               "batch_stats": dict(variables.get("batch_stats", {}))}
  names = ("segmentation",) if arch == "ple" else TASKS
  if arch == "cross_stitch":
    _convert_columns(arch, variables, sd, names)
    for i in range(1, 4):
      variables["params"][f"cross_stitch_stage{i}"] = sd["encoder.cross_unit"][i - 1]
  elif arch == "ltb":
    _convert_columns(arch, variables, sd, names)
    for i in range(1, 5):
      variables["params"][f"branch_stage{i}"] = sd["encoder.alpha"][i]
  elif arch == "mtan":
    layers = [(f"encoder.shared_layer.{i}.0.0.", f"layer{i + 1}.0.") for i in range(4)]
    layers += [(f"encoder.shared_layer.{i}.1.", f"layer{i + 1}.1.") for i in range(4)]
    _resnet(variables, "backbone", _renamed(sd, _stem("encoder.shared_conv.") + layers), 4)
    for tn, task in enumerate(names):
      for i in range(1, 5):
        att = f"encoder.encoder_att.{i - 1}.{tn}."
        name = f"attention_{task}_stage{i}"
        c0, b0, s0 = _conv_bn(sd, att + "0.", att + "1.", fold_bias=True)
        c1, b1, s1 = _conv_bn(sd, att + "3.", att + "4.", fold_bias=True)
        variables["params"][name] = {"Conv_0": c0, "BatchNorm_0": b0, "Conv_1": c1,
                                     "BatchNorm_1": b1}
        variables["batch_stats"][name] = {"BatchNorm_0": s0, "BatchNorm_1": s1}
      for i in range(1, 4):
        f = f"encoder.transfer.{tn}.{i - 1}."
        conv, bn, stats = _conv_bn(sd, f + "0.", f + "1.")
        variables["params"][f"transfer_{task}_stage{i}"] = {"Conv_0": conv, "BatchNorm_0": bn}
        variables["batch_stats"][f"transfer_{task}_stage{i}"] = {"BatchNorm_0": stats}
  elif arch in ("mmoe", "cgc", "dselect_k"):
    trunk = _fixture()[0]
    trunk = {k[len("trunk/"):]: v for k, v in trunk.items() if k.startswith("trunk/")}
    _resnet(variables, "trunk", _renamed(trunk, _stem("") + [("4.", "layer1."),
                                                             ("5.", "layer2.")]), 2)
    last = [(".0.", "layer1."), (".1.", "layer2.")]

    def expert(name, prefix):
      _resnet(variables, name, _renamed(sd, [(prefix + a, b) for a, b in last]), 2)

    if arch == "cgc":
      expert("shared_experts_0", "experts_shared.0")
      for task in names:
        expert(f"task_experts_{task}_0", f"experts_specific.{task}.0")
    else:
      for e in range(4):
        expert(f"experts_{e}", f"experts_shared.{e}")
    for task in names:
      if arch == "dselect_k":
        variables["params"][f"gates_{task}"] = {
            f"{p}_logits": _linear(sd, f"_{p}_logits.{task}.1.") for p in ("z", "w")}
      else:
        variables["params"][f"gates_{task}"] = {"Dense_0": _linear(sd, f"gate_specific.{task}.1.")}
  elif arch == "ple":
    task = names[0]
    _resnet(variables, "trunk", _renamed(sd, _stem("encoder.shared_layer.0.0.")), 0)
    for j in range(1, 5):
      _resnet(variables, f"shared_experts_{j - 1}_0",
              _renamed(sd, [(f"encoder.shared_layer.{j}.0.", "layer1.")]), 1)
      _resnet(variables, f"task_experts_{task}_{j - 1}_0",
              _renamed(sd, [(f"encoder.specific_layer.{j}.{task}.0.", "layer1.")]), 1)
      gate = {"Dense_0": _linear(sd, f"encoder.gate_specific.{task}.{j}.1.")}
      variables["params"][f"task_gates_{task}_{j - 1}"] = gate
      if j < 4:  # one task: the paper's shared gate is LibMTL's structure when it copies it
        variables["params"][f"shared_gates_{j - 1}"] = gate
  return variables


# ---------------------------------------------------------------------------------------------
# Tests.


def _check(got, want, what):
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=2e-5, err_msg=what)


@pytest.mark.parametrize("arch", list(HPARAMS))
def test_outputs_equal_libmtl(arch):
  model, names = _build(arch)
  _, arrays = _fixture()
  image = jnp.asarray(arrays["image"].transpose(0, 2, 3, 1))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), image, train=False))
  shapes = {k: shapes[k] for k in ("params", "batch_stats")}
  variables = convert(arch, jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes))
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(shapes)
  for got, want in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(shapes),
                       strict=True):
    assert got.shape == want.shape

  def forward(variables, image):
    out = model.apply(variables, image, False)
    trunk = (model.apply(variables, image, False, method=lambda m, x, t: m.trunk(x, t))
             if arch in ("mmoe", "cgc", "dselect_k") else None)
    return {t: out[t] for t in names}, trunk

  outputs, trunk = jax.jit(forward)(variables, image)
  if trunk is not None:
    _check(trunk, arrays["trunk_output"].transpose(0, 2, 3, 1), f"{arch} trunk")
  for task in names:
    want = arrays[f"{arch}/{task}"].transpose(0, 2, 3, 1)
    assert np.abs(want).mean() > 0.1  # not a degenerate (all-zero) output
    _check(outputs[task], want, f"{arch} {task}")


def test_dselect_k_entropy_regulariser_equals_libmtl():
  """LibMTL's ``_entropy_reg_loss`` (weight 1e-6, the last task's selectors: its training
  forward) and its gradient on that task's z logits equal mtjax's ``1e-6 ·``
  :func:`experts.selector_entropy` on the same gate and gate input."""
  _, arrays = _fixture()
  sd = _state("dselect_k")
  task = TASKS[-1]
  gate_input = jnp.asarray(arrays["trunk_output"].mean(axis=(2, 3)))
  params = {f"{p}_logits": _linear(sd, f"_{p}_logits.{task}.1.") for p in ("z", "w")}
  gate = experts.DSelectKGate(4, 2, 1.0)

  def regulariser(params):
    _, extras = gate.apply({"params": params}, gate_input)
    return 1e-6 * experts.selector_entropy(extras["selectors"]), extras["selectors"]

  (value, selectors), grad = jax.value_and_grad(regulariser, has_aux=True)(params)
  np.testing.assert_allclose(selectors, arrays["dselect_k/entropy_selectors"], rtol=1e-5,
                             atol=1e-6)
  assert np.mean(arrays["dselect_k/entropy_selectors"] == 0) > 0.2  # some selectors saturated
  np.testing.assert_allclose(float(value), float(arrays["dselect_k/entropy_loss"]), rtol=1e-5)
  np.testing.assert_allclose(grad["z_logits"]["kernel"],
                             arrays["dselect_k/entropy_grad_z_weight"].T, rtol=1e-4, atol=1e-12)
  np.testing.assert_allclose(grad["z_logits"]["bias"], arrays["dselect_k/entropy_grad_z_bias"],
                             rtol=1e-4, atol=1e-12)
  assert np.abs(grad["z_logits"]["kernel"]).max() > 0
  assert not np.any(grad["w_logits"]["kernel"])  # the entropy does not depend on α


def test_mtan_attention_hidden_width_is_libmtls():
  """The attention's hidden width is ``C / expansion`` (LibMTL's and the official code's
  ``att_layer(in, C // expansion, C)``): ``C`` for basic blocks, ``C / 4`` for bottlenecks."""
  for backbone, hidden in (("resnet18", 8), ("resnet50", 8)):
    tasks = tiny_tasks(("depth",))
    model = models.build(backbone, tasks, architecture="mtan", width=8, output_stride=32,
                         stem="imagenet", head_hidden=4)
    shapes = jax.eval_shape(lambda m=model: m.init(jax.random.PRNGKey(0),
                                                   jnp.zeros((1, 32, 32, 3)), train=False))
    attention = shapes["params"]["attention_depth_stage1"]
    channels = 8 * (4 if backbone == "resnet50" else 1)
    assert attention["Conv_0"]["kernel"].shape == (1, 1, channels, hidden), backbone
    assert attention["Conv_1"]["kernel"].shape == (1, 1, hidden, channels), backbone
