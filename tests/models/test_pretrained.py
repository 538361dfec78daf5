"""Pretrained torchvision ResNets: mtjax's forward on converted weights equals torchvision's."""

import pathlib

import jax
import numpy as np
import pytest

from mtjax.models import MultiTaskModel, backbones, pretrained
from tests.helpers import tiny_tasks

FIXTURE = pathlib.Path(__file__).parents[1] / "fixtures" / "resnet_tiny_torchvision"


@pytest.fixture(scope="module")
def fixture():
  return pretrained.read(str(FIXTURE) + ".safetensors"), dict(np.load(str(FIXTURE) + ".npz"))


def _part(tensors, prefix):
  return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + "/")}


@pytest.mark.parametrize("block,width", [("basic", 8), ("bottleneck", 4)])
def test_forward_equals_torchvision(fixture, block, width):
  tensors, arrays = fixture
  net = backbones.ResNet((1, 1, 1, 1), block, width, 32, "imagenet")
  image = arrays["image"].transpose(0, 2, 3, 1)  # NCHW -> NHWC
  variables = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), image, train=False))
  params, stats = pretrained.convert(_part(tensors, block), variables["params"],
                                     variables["batch_stats"], net.stage_sizes, net.block)
  stages = net.apply({"params": params, "batch_stats": stats}, image, train=False)
  for name, value in stages.items():
    expected = arrays[f"{block}/{name}"].transpose(0, 2, 3, 1)
    assert value.shape == expected.shape, name
    assert np.max(np.abs(np.asarray(value) - expected)) < 1e-4, name


def test_errors_list_missing_mismatched_and_unexpected(fixture):
  tensors, _ = fixture
  basic = _part(tensors, "basic")
  net = backbones.ResNet((1, 1, 1, 1), "basic", 8, 32, "imagenet")
  variables = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3)),
                                              train=False))
  broken = {k: v for k, v in basic.items() if k != "layer2.0.bn1.running_var"}
  broken["layer1.0.conv1.weight"] = np.zeros((8, 8, 1, 1), np.float32)
  broken["layer5.0.conv1.weight"] = np.zeros((1,), np.float32)
  with pytest.raises(ValueError) as error:
    pretrained.convert(broken, variables["params"], variables["batch_stats"], (1, 1, 1, 1),
                       "basic")
  message = str(error.value)
  assert "missing (1): layer2.0.bn1.running_var (for BasicBlock_1/BatchNorm_0/var)" in message
  assert "mismatched shapes (1): layer1.0.conv1.weight: file (1, 1, 8, 8), model (3, 3, 8, 8)" \
      in message
  assert "unexpected (1): layer5.0.conv1.weight" in message
  # A deeper backbone than the file: its extra blocks are missing, named by torchvision.
  deeper = backbones.ResNet((2, 1, 1, 1), "basic", 8, 32, "imagenet")
  variables = jax.eval_shape(lambda: deeper.init(jax.random.PRNGKey(0),
                                                 np.zeros((1, 32, 32, 3)), train=False))
  with pytest.raises(ValueError, match=r"missing \(10\): .*layer1\.1\.conv1\.weight \(for "):
    pretrained.convert(basic, variables["params"], variables["batch_stats"], (2, 1, 1, 1),
                       "basic")


def test_load_backbone_into_a_multitask_model(tmp_path, fixture):
  from safetensors.numpy import save_file

  tensors, arrays = fixture
  path = str(tmp_path / "basic.safetensors")
  save_file(_part(tensors, "basic"), path)
  head = tiny_tasks(("segmentation",))["segmentation"].head(hidden=8)
  model = MultiTaskModel(backbones.ResNet((1, 1, 1, 1), "basic", 8, 32, "imagenet"),
                         {"segmentation": head})
  image = arrays["image"].transpose(0, 2, 3, 1)
  variables = model.init(jax.random.PRNGKey(0), image, train=False)
  params, stats = pretrained.load_backbone(model, variables["params"], variables["batch_stats"],
                                           path)
  assert set(params) == set(variables["params"])  # the head is kept
  features = model.apply({"params": params, "batch_stats": stats}, image, method="encode")
  np.testing.assert_allclose(features, arrays["basic/stage4"].transpose(0, 2, 3, 1), atol=1e-4)
  with pytest.raises(ValueError, match="model.pretrained: .*expected a torchvision state dict"):
    pretrained.check_path(str(tmp_path / "weights.bin"))
  with pytest.raises(ValueError, match="model.pretrained: .*no such file"):
    pretrained.check_path(str(tmp_path / "absent.safetensors"))


def test_frozen_bn_group_and_statistics(tmp_path):
  from mtjax.errors import UserError
  from mtjax.models import labels
  from mtjax.train import setup
  from tests.helpers import tiny_config

  net = backbones.ResNet((1, 1), "basic", 4, 32, "small", frozen_bn=True)
  image = np.random.default_rng(0).random((2, 16, 16, 3), np.float32)
  variables = net.init(jax.random.PRNGKey(0), image, train=False)
  groups = {net.param_group(path) for path in
            __import__("flax").traverse_util.flatten_dict(variables["params"])}
  assert groups == {"stem", "stage1", "stage2", "bn/stem", "bn/stage1", "bn/stage2"}
  # In training the running statistics normalise and stay as they are.
  out, updates = net.apply(variables, image, train=True, mutable=["batch_stats"])
  evaluated = net.apply(variables, image, train=False)
  np.testing.assert_array_equal(out["stage2"], evaluated["stage2"])
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(
      lambda a, b: bool(np.array_equal(a, b)), updates["batch_stats"], variables["batch_stats"]))
  # The loop freezes "shared/bn" on top of the configured groups; a bad path names the field.
  cfg = tiny_config(tmp_path, **{"model.frozen_bn": True})
  assert setup.optimizer_spec(cfg).frozen == (f"{labels.SHARED}/bn",)
  cfg = tiny_config(tmp_path, **{"model.pretrained": str(tmp_path / "weights.bin")})
  with pytest.raises(UserError, match=r"config.model.pretrained: .*\.safetensors"):
    setup.build(cfg)
