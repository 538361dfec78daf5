"""ResNet backbones: published parameter counts, output strides, the multi-task composition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import tasks as tasks_lib
from mtjax.models import backbones, build, labels


def _num_params(tree):
  return sum(x.size for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("name,expected", [("resnet18", 11_176_512), ("resnet50", 23_508_032)])
def test_parameter_counts_match_torchvision_trunks(name, expected):
  # torchvision's resnet18/50 without the final fc layer (11,689,512 − 513,000 and
  # 25,557,032 − 2,049,000 parameters), BatchNorm scale and bias included.
  model = backbones.get(name)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)),
                                             train=False))
  assert _num_params(shapes["params"]) == expected


@pytest.mark.parametrize("stem,output_stride,expected", [
    ("imagenet", 32, 2), ("imagenet", 16, 4), ("imagenet", 8, 8), ("small", 4, 16),
    ("small", 2, 32), ("cifar", 1, 64)])
def test_output_stride(stem, output_stride, expected):
  model = backbones.get("resnet18", width=8, output_stride=output_stride, stem=stem)
  stages = jax.eval_shape(lambda: model.init_with_output(
      jax.random.PRNGKey(0), jnp.zeros((2, 64, 64, 3)), train=False)[0])
  assert set(stages) == {"stem", "stage1", "stage2", "stage3", "stage4"}
  assert backbones.last_stage(stages).shape == (2, expected, expected, 64)
  assert stages["stage1"].shape[-1] == 8 and stages["stage3"].shape[-1] == 32


def test_stage_labels_follow_the_stage_sizes():
  model = backbones.get("resnet34", width=8)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                             train=False))["params"]
  groups = {name: model.param_group((name,)) for name in params}
  assert groups["Conv_0"] == groups["BatchNorm_0"] == "stem"
  sizes = [3, 4, 6, 3]  # ResNet-34's blocks per stage
  expected = [f"stage{i + 1}" for i, n in enumerate(sizes) for _ in range(n)]
  assert [groups[f"BasicBlock_{k}"] for k in range(sum(sizes))] == expected


def test_bad_names_list_the_valid_ones():
  with pytest.raises(ValueError, match=r"model.backbone: unknown backbone 'resnet9'.*resnet18"):
    backbones.get("resnet9")
  with pytest.raises(ValueError, match="model.output_stride"):
    backbones.get("resnet18", output_stride=3)
  with pytest.raises(ValueError, match="model.stem"):
    backbones.get("resnet18", stem="huge")


def test_multitask_outputs_and_methods_agree():
  tasks = {"segmentation": tasks_lib.get("segmentation", 5), "depth": tasks_lib.get("depth"),
           "classification": tasks_lib.get("classification", 4)}
  model = build("resnet_tiny", tasks, width=8, output_stride=4, stem="small", head_hidden=8)
  images = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)
  out = jax.jit(model.apply)(variables, images)
  assert out["features"].shape == (2, 8, 8, 32)
  assert out["segmentation"].shape == (2, 32, 32, 5)
  assert out["depth"].shape == (2, 32, 32, 1)
  assert out["classification"].shape == (2, 4)
  features = jax.jit(lambda v, x: model.apply(v, x, method="encode"))(variables, images)
  depth = jax.jit(lambda v, f: model.apply(v, f, "depth", (32, 32), method="decode"))(
      variables, features)
  assert jnp.allclose(features, out["features"]) and jnp.allclose(depth, out["depth"])
  assert labels.groups(model, variables["params"]) == [
      "classification", "depth", "segmentation", "shared/stage1", "shared/stage2",
      "shared/stage3", "shared/stem"]
  assert labels.groups(model, variables["batch_stats"])[-1] == "shared/stem"
  own = labels.split(model, variables["params"])
  assert labels.merge(*own.values()) == variables["params"]


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  depth = {"depth": tasks_lib.get("depth")}
  model = build("resnet_tiny", depth, width=8, stem="small", dtype="bfloat16")
  images = jnp.ones((1, 16, 16, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables["params"]))
  out = jax.jit(model.apply)(variables, images)
  assert out["features"].dtype == jnp.bfloat16 and out["depth"].dtype == jnp.float32
  with pytest.raises(ValueError, match="model.dtype"):
    build("resnet_tiny", depth, dtype="float16")


def test_pieces_of_a_resnet_chain_to_the_resnet():
  """``Stages`` pieces (the stage runner the sharing architectures copy) compute the ResNet:
  two blocks per stage, the ImageNet stem and dilation past output stride 8."""
  resnet = backbones.get("resnet18", width=4, output_stride=8)
  images = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3))
  shapes = jax.eval_shape(lambda: resnet.init(jax.random.PRNGKey(0), images, train=False))
  rng = np.random.default_rng(0)  # random variables of the right shapes: no init to compile
  variables = jax.tree_util.tree_map(
      lambda x: jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype), shapes)
  pieces = [backbones.part(resnet, 0, 1), backbones.part(resnet, 2, 2),
            backbones.part(resnet, 3, 4)]
  blocks = [(0, 2), (2, 4), (4, 8)]  # each piece's blocks, numbered from 0 in the piece

  def piece_variables(k):
    first, end = blocks[k]
    out = {}
    for col, tree in variables.items():
      out[col] = {f"BasicBlock_{i - first}": tree[f"BasicBlock_{i}"] for i in range(first, end)}
      if k == 0:
        out[col].update({n: v for n, v in tree.items() if "Block_" not in n})
    return out

  def both(x):
    whole = resnet.apply(variables, x, train=False)
    for k, piece in enumerate(pieces):
      x = piece.apply(piece_variables(k), x, train=False)
    return whole, x
  whole, chained = jax.jit(both)(images)
  assert chained.shape == (2, 4, 4, 32)  # stride 8: stage 4 dilated
  assert jnp.allclose(chained, whole["stage4"], rtol=1e-6, atol=1e-6)
  groups = {n: pieces[2].param_group((n,)) for n in piece_variables(2)["params"]}
  assert groups == {"BasicBlock_0": "stage3", "BasicBlock_1": "stage3",
                    "BasicBlock_2": "stage4", "BasicBlock_3": "stage4"}
  assert pieces[0].param_group(("Conv_0",)) == "stem"
  assert backbones.stage_channels(backbones.plan_of(resnet)) == (4, 4, 8, 16, 32)
