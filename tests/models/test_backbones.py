"""ResNet backbones: published parameter counts, output strides, the multi-task composition."""

import jax
import jax.numpy as jnp
import pytest

from mtjax.models import backbones, build


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
  out = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0),
                                                      jnp.zeros((2, 64, 64, 3)), train=False)[0])
  assert out.shape == (2, expected, expected, 64)


def test_bad_names_list_the_valid_ones():
  with pytest.raises(ValueError, match=r"model.backbone: unknown backbone 'resnet9'.*resnet18"):
    backbones.get("resnet9")
  with pytest.raises(ValueError, match="model.output_stride"):
    backbones.get("resnet18", output_stride=3)
  with pytest.raises(ValueError, match="model.stem"):
    backbones.get("resnet18", stem="huge")


def test_multitask_outputs_and_methods_agree():
  model = build("resnet_tiny", {"segmentation": ("dense", 5), "depth": ("dense", 1),
                                "classification": ("classification", 4)},
                width=8, output_stride=4, stem="small", head_hidden=8)
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


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  model = build("resnet_tiny", {"depth": ("dense", 1)}, width=8, stem="small", dtype="bfloat16")
  images = jnp.ones((1, 16, 16, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables["params"]))
  out = jax.jit(model.apply)(variables, images)
  assert out["features"].dtype == jnp.bfloat16 and out["depth"].dtype == jnp.float32
  with pytest.raises(ValueError, match="model.dtype"):
    build("resnet_tiny", {"depth": ("dense", 1)}, dtype="float16")
