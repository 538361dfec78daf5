"""SegNet-MTAN against LibMTL's own code (``tests/fixtures/make_libmtl_segnet_fixture.py``).

The fixture holds LibMTL's ``examples/nyu/segnet_mtan.py`` model at width 2 (random weights,
random BatchNorm statistics, LibMTL's state-dict keys), its eval-mode outputs on a fixed input,
its parameter counts at width 2 and 64 (its NYUv2 metrics on random arrays:
tests/test_segnet_protocol.py, through ``mtjax eval``).
"""

import functools
import pathlib

import flax.traverse_util as traverse
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import models
from mtjax import tasks as tasks_lib
from mtjax.data import loading
from mtjax.models import labels, pretrained, segnet
from mtjax.train import step as step_lib

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"
FIXTURE = FIXTURES / "libmtl_segnet_tiny"
LIBMTL_TASKS = {"segmentation": "segmentation", "depth": "depth", "normals": "normal"}


def nyuv2_tasks(names=("segmentation", "depth", "normals")):
  info = loading.DATASETS["nyuv2"].tasks
  return {n: tasks_lib.get(n, **info[n]) for n in names}


@functools.cache
def fixture():
  return pretrained.read(str(FIXTURE) + ".safetensors"), dict(np.load(str(FIXTURE) + ".npz"))


def build(width, names=("segmentation", "depth", "normals")):
  return models.build("segnet", nyuv2_tasks(names), architecture="segnet_mtan", width=width)


def shapes(model, size):
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *size, 3)),
                                           train=False))


def count(tree):
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def converted(model, size):
  state, arrays = fixture()
  like = shapes(model, size)
  return segnet.libmtl_variables(state, {k: like[k] for k in ("params", "batch_stats")}), arrays


def test_outputs_equal_libmtl():
  """Eval mode, LibMTL's random weights and BatchNorm statistics: LibMTL's per-task outputs."""
  _, arrays = fixture()
  width = int(arrays["width"])
  model = build(width)
  x = np.transpose(arrays["input"], (0, 2, 3, 1))
  variables, _ = converted(model, x.shape[1:3])
  out = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["relations"])[0])(
      variables, x)
  for task, name in LIBMTL_TASKS.items():
    want = np.transpose(arrays[f"out_{name}"], (0, 2, 3, 1))
    assert out[task].shape == want.shape
    assert np.std(want) > 1e-3   # outputs that vary: the wiring is tested, not a constant
    np.testing.assert_allclose(out[task], want, rtol=1e-4, atol=2e-5, err_msg=task)


def test_training_mode_equals_libmtl():
  """One training-mode forward from LibMTL's state: the outputs (batch statistics) and the
  BatchNorm running statistics it leaves, PyTorch's update (momentum 0.1, unbiased variance;
  the shared attention convolutions updated once per task), to float32 tolerance."""
  _, arrays = fixture()
  tasks = tuple(LIBMTL_TASKS)
  model = build(int(arrays["width"]))
  x = np.transpose(arrays["input"], (0, 2, 3, 1))
  variables, _ = converted(model, x.shape[1:3])
  out, updates = jax.jit(lambda v, x: model.apply(v, x, train=True,
                                                  mutable=["batch_stats", "relations"]))(
      variables, x)
  for task in ("depth", "normals"):
    want = np.transpose(arrays[f"train_out_{LIBMTL_TASKS[task]}"], (0, 2, 3, 1))
    np.testing.assert_allclose(out[task], want, rtol=1e-4, atol=2e-5, err_msg=task)
  stats = traverse.flatten_dict(updates["batch_stats"])
  assert len(stats) == sum(k.startswith("stat/") for k in arrays)
  for path, value in stats.items():
    want = arrays["stat/" + segnet.libmtl_name(path, tasks)]
    np.testing.assert_allclose(value, want, rtol=1e-4, atol=1e-6, err_msg=str(path))


def test_parameter_count_equals_libmtl_tiny_and_full_size():
  _, arrays = fixture()
  width = int(arrays["width"])
  tiny = shapes(build(width), (32, 32))["params"]
  full = shapes(build(64), (32, 32))["params"]
  assert count(tiny) == int(arrays["params_tiny"]) == segnet.parameter_count(width, (13, 1, 3))
  assert count(full) == int(arrays["params_full"]) == segnet.parameter_count(64, (13, 1, 3))
  assert int(arrays["params_full"]) == 44_229_073


def test_full_size_forward_smoke():
  """The reference's width (filters 64..512) on a 32×64 input: shapes and finite outputs."""
  model = build(64)
  out, variables = jax.jit(lambda x: model.init_with_output(jax.random.PRNGKey(0), x,
                                                            train=False))(jnp.ones((1, 32, 64, 3)))
  del variables
  assert out["segmentation"].shape == (1, 32, 64, 13)
  assert out["depth"].shape == (1, 32, 64, 1) and out["normals"].shape == (1, 32, 64, 3)
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in out.values())


def test_converter_names_every_bad_tensor_in_one_error():
  state, arrays = fixture()
  model = build(int(arrays["width"]))
  like = shapes(model, (32, 32))
  bad = dict(state)
  del bad["encoder.encoder_att.1.2.3.weight"]                     # depth's mask, level 2
  bad["decoders.normal.pred_task.1.bias"] = np.zeros(4, np.float32)   # 3 channels
  bad["encoder.extra.weight"] = np.zeros(1, np.float32)
  bad["loss_scale"] = np.zeros(3, np.float32)                     # UW's: not the model's
  with pytest.raises(ValueError) as error:
    segnet.libmtl_variables(bad, like)
  message = str(error.value)
  assert "missing (1): encoder.encoder_att.1.2.3.weight" in message
  assert "mismatched shapes (1): decoders.normal.pred_task.1.bias: file (4,), model (3,)" in message
  assert "unexpected (1): encoder.extra.weight" in message
  with pytest.raises(ValueError, match=r"mismatched shapes \(\d+\)"):   # another width
    segnet.libmtl_variables(state, shapes(build(int(arrays["width"]) + 1), (32, 32)))
  with pytest.raises(ValueError, match=r"unexpected \(\d+\): decoders.normal"):  # two tasks
    segnet.libmtl_variables(state, shapes(build(int(arrays["width"]),
                                                ("segmentation", "depth")), (32, 32)))


def test_builder_and_input_errors():
  with pytest.raises(ValueError, match=r"model.backbone: got 'resnet18'.*expected 'segnet'"):
    models.build("resnet18", nyuv2_tasks(), architecture="segnet_mtan")
  with pytest.raises(ValueError, match=r"model.width: got 0"):
    build(0)
  classification = {"classification": tasks_lib.get("classification", num_classes=3)}
  with pytest.raises(ValueError, match=r"dense per-pixel tasks; task 'classification'"):
    models.build("segnet", classification, architecture="segnet_mtan")
  with pytest.raises(ValueError, match=r"dataset.image_size: .*multiples of 32; got \(48, 64\)"):
    shapes(build(1), (48, 64))
  assert models.hparams("segnet_mtan") == {}


def _batch(size=(32, 32), n=2, seed=0):
  rng = np.random.default_rng(seed)
  normals = rng.normal(size=(n, *size, 3)).astype(np.float32)
  normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
  return {"image": rng.random((n, *size, 3), dtype=np.float32),
          "segmentation": rng.integers(0, 13, (n, *size)).astype(np.int32),
          "depth": rng.uniform(0.5, 5.0, (n, *size)).astype(np.float32),
          "depth_valid": np.ones((n, *size), bool), "normals": normals,
          "normals_valid": np.ones((n, *size), bool)}


def test_labels_and_the_general_gradient_path():
  """LibMTL's shared parameters (the whole encoder, every task's attention included) are
  labelled shared; the step takes the general path (its per-task gradients of the whole encoder,
  zero on the other tasks' attention; the general path itself is checked against ``jax.jacrev``
  in tests/train/test_contracts.py); the representation level is refused; the attention means
  are reported as relations. (Train steps: tests/test_segnet_protocol.py.)"""
  tasks = nyuv2_tasks()
  model = build(1)
  like = shapes(model, (32, 32))
  groups = labels.groups(model, like["params"])
  assert groups == ["depth", "normals", "segmentation", "shared/attention",
                    "shared/attention/depth", "shared/attention/normals",
                    "shared/attention/segmentation", "shared/segnet"]
  labels.groups(model, like["batch_stats"])   # every statistic labelled
  assert not step_lib.has_shared_encoder(model)
  with pytest.raises(ValueError, match=r"grad_level: 'representation' needs a shared"):
    step_lib.check_grad_level(model, "representation")

  rng = np.random.default_rng(1)
  variables = jax.tree_util.tree_map(
      lambda x: jnp.asarray(rng.uniform(0.5, 1.5, x.shape) if x.ndim == 1 else
                            rng.normal(0.0, 0.3, x.shape), x.dtype), like)
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  @jax.jit
  def per_task(variables):
    terms = step_lib.task_terms(model, tasks, variables["params"], variables["batch_stats"],
                                batch)
    return terms.per_task()[0], terms.relations

  got, relations = per_task(variables)
  shared = traverse.flatten_dict(labels.split(model, variables["params"])["shared"])
  assert set(traverse.flatten_dict(got)) == set(shared)   # the whole encoder, per task
  for path, g in traverse.flatten_dict(got).items():
    assert g.shape == (len(tasks), *shared[path].shape)
    label = labels.label_of(model, path)
    for i, task in enumerate(tasks):
      if label.startswith("shared/attention/") and label != f"shared/attention/{task}":
        assert not np.any(g[i]), (task, path)   # another task's mask: no gradient
  own_mask = traverse.flatten_dict(got)[("encoder_att_depth_0", "conv0", "conv", "kernel")]
  assert np.any(own_mask[1])                    # depth's own mask: a gradient
  for task in tasks:
    for side in ("encoder", "decoder"):
      means = np.asarray(relations[f"segnet_mtan/{task}/{side}"])
      assert means.shape == (5,) and np.all((means > 0) & (means < 1))
