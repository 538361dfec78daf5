"""LibMTL's DeepLab protocol: mtjax equals LibMTL's own code on its fixture.

The fixture (tests/fixtures/make_libmtl_deeplab_fixture.py, run with LibMTL, torch and
torchvision) holds a tiny-width LibMTL NYUv2 model with random weights and BatchNorm statistics,
its predictions, losses and metrics on a 3-image split, torchvision's dilated ResNet-50 stages,
one head in training mode, and torch's Adam + StepLR on fixed gradients.
"""

import pathlib

import flax.traverse_util as traverse
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import data, models, tasks
from mtjax.data import sources
from mtjax.models import backbones, heads, multitask, pretrained
from mtjax.tasks.base import summarize
from mtjax.train import optim

FIXTURE = pathlib.Path(__file__).parents[1] / "fixtures" / "libmtl_deeplab"
WEIGHTS = str(FIXTURE) + ".safetensors"
NYU_TASKS = ("segmentation", "depth", "normals")


@pytest.fixture(scope="module")
def ref():
  return dict(np.load(str(FIXTURE) + ".npz"))


@pytest.fixture(scope="module")
def nyu_tasks():
  info = data.dataset_info("nyuv2")["tasks"]
  return {name: tasks.get(name, **info[name]) for name in NYU_TASKS}


def tiny_model(nyu_tasks, **kwargs):
  """The fixture's model in mtjax: ResNet-50 at width 2, DeepLab heads of 8 channels."""
  return models.build("resnet50", nyu_tasks, **{
      "width": 2, "output_stride": 8, "stem": "imagenet", "head": "deeplab", "head_hidden": 8,
      **kwargs})


def shapes_of(model, image_shape):
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)),
                                           train=False))


def write_split(root, ref):
  """The fixture's val/ split (and a train/ split of the same images) in the LibMTL layout."""
  examples = [{"image": ref["val_image"][i], "label": ref["val_label"][i],
               "depth": ref["val_depth"][i], "normal": ref["val_normal"][i]}
              for i in range(len(ref["val_image"]))]
  for split in ("train", "val"):
    sources.write_preprocessed(str(root), split, examples)


def test_dilated_resnet50_equals_torchvision(ref):
  """torchvision's ``replace_stride_with_dilation=[False, True, True]`` (LibMTL's
  ``resnet_dilated``): the first block of stages 3 and 4 keeps the previous dilation."""
  net = backbones.get("resnet50", width=2, output_stride=8, stem="imagenet")
  plan = backbones.plan_of(net)
  assert [b[1:] for b in plan.stages[2]] == [(1, 1)] + [(1, 2)] * 5   # (strides, dilation)
  assert [b[1:] for b in plan.stages[3]] == [(1, 2)] + [(1, 4)] * 2
  tensors = pretrained.read(WEIGHTS)
  encoder = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}
  image = ref["val_image"][:1]
  shapes = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), image, train=False))
  params, stats = pretrained.convert(encoder, shapes["params"], shapes["batch_stats"],
                                     net.stage_sizes, net.block)
  stages = jax.jit(lambda v, x: net.apply(v, x, train=False))(
      {"params": params, "batch_stats": stats}, image)
  for i in range(1, 5):
    expected = ref[f"tv_stage{i}"].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(stages[f"stage{i}"], expected, rtol=1e-4, atol=1e-5)


def test_small_stems_keep_dilating_every_block():
  """mtjax's small-image stems (the default experiment's) dilate every block of a dilated
  stage, as before."""
  plan = backbones.plan_of(backbones.get("resnet18", width=4, output_stride=4, stem="small"))
  assert [b[1:] for b in plan.stages[2]] == [(1, 2), (1, 2)]
  assert [b[1:] for b in plan.stages[3]] == [(1, 4), (1, 4)]


def test_libmtl_model_outputs_equal_libmtl(ref, nyu_tasks):
  """The whole LibMTL model file, imported: eval-mode predictions at the label size (bilinear,
  ``align_corners=True``) equal LibMTL's, and so does the parameter count."""
  model = tiny_model(nyu_tasks)
  images = ref["val_image"]
  shapes = shapes_of(model, images.shape[1:])
  params, stats = pretrained.load(model, shapes["params"], shapes["batch_stats"], WEIGHTS)
  tensors = pretrained.read(WEIGHTS)
  count = sum(v.size for k, v in tensors.items()
              if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
  assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == count
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(
      {"params": params, "batch_stats": stats}, images)
  for name in NYU_TASKS:
    expected = ref[f"pred_{pretrained.libmtl_task(name)}"].transpose(0, 2, 3, 1)
    scale = np.max(np.abs(expected))
    np.testing.assert_allclose(out[name], expected, rtol=1e-4, atol=1e-5 * scale)


def test_libmtl_file_mismatch_is_one_line_listing_the_tensors(nyu_tasks):
  model = tiny_model(nyu_tasks)
  shapes = shapes_of(model, (24, 32, 3))
  tensors = dict(pretrained.read(WEIGHTS))
  del tensors["decoders.depth.2.running_var"]
  tensors["decoders.normal.4.bias"] = np.zeros((4,), np.float32)
  tensors["decoders.edges.4.bias"] = np.zeros((4,), np.float32)
  tensors["loss_scale"] = np.zeros((3,), np.float32)  # UW's parameter: not the model's
  with pytest.raises(ValueError) as error:
    pretrained.LIBMTL_IMPORTERS["hard"](tensors, dict(shapes))
  message = str(error.value)
  assert "\n" not in message
  assert "missing (1): decoders.depth.2.running_var (for heads_depth/bn/var)" in message
  assert "mismatched shapes (1): decoders.normal.4.bias: file (4,), model (3,)" in message
  assert "unexpected (1): decoders.edges.4.bias" in message
  # A model of another width: every file tensor of that part mismatches, named.
  wider = tiny_model(nyu_tasks, head_hidden=4)
  with pytest.raises(ValueError, match=r"mismatched shapes \(\d+\): decoders\."):
    pretrained.load(wider, *shapes_of(wider, (24, 32, 3)).values(), WEIGHTS)


def test_deeplab_head_in_training_equals_torch(ref):
  """Training mode (dropout off on both sides): the output and the running statistics torch's
  BatchNorm2d leaves (unbiased variance: n / (n - 1), n = 2 in the pooling branch)."""
  head = heads.DeepLabHead(13, hidden=8)
  features = ref["head_train_features"].transpose(0, 2, 3, 1)
  shapes = jax.eval_shape(lambda: head.init(jax.random.PRNGKey(0), features, features.shape[1:3],
                                            False))
  tensors = pretrained.read(WEIGHTS)
  prefix = "decoders.segmentation."
  variables = pretrained.fill(
      {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, dict(shapes),
      lambda _, path: f"{pretrained._DEEPLAB[path[0]]}.{pretrained._LEAVES[path[1]]}")
  out, updates = head.apply(variables, features, features.shape[1:3], True,
                            mutable=["batch_stats"])
  np.testing.assert_allclose(out, ref["head_train_out"].transpose(0, 2, 3, 1), rtol=1e-4,
                             atol=1e-5)
  flat = traverse.flatten_dict(updates["batch_stats"])
  for (module, leaf), value in flat.items():
    name = f"head_train_stats/{pretrained._DEEPLAB[module]}.{pretrained._LEAVES[leaf]}"
    np.testing.assert_allclose(value, ref[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_deeplab_head_dropout_only_with_its_stream_in_training():
  head = heads.DeepLabHead(2, hidden=4, rates=(1, 2, 3))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 6))
  variables = head.init(jax.random.PRNGKey(1), x, (4, 4), False)

  def run(train, key=None):
    rngs = None if key is None else {"dropout": key}
    return head.apply(variables, x, (4, 4), train, mutable=["batch_stats"], rngs=rngs)[0]
  a, b = run(True, jax.random.PRNGKey(2)), run(True, jax.random.PRNGKey(3))
  assert not np.allclose(a, b)                           # the mask comes from the stream
  np.testing.assert_array_equal(run(True), run(True))    # no stream: deterministic
  np.testing.assert_array_equal(run(False, jax.random.PRNGKey(2)), run(False))


def test_resize_align_corners_matches_the_definition():
  """``F.interpolate(..., align_corners=True)``: corners map to corners, and output pixel i
  reads input position i (H - 1) / (h - 1)."""
  x = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(1, 3, 4, 2) ** 1.5
  y = np.asarray(heads.resize_align_corners(x, (5, 7)))
  for i in range(5):
    for j in range(7):
      u, v = i * 2 / 4, j * 3 / 6
      i0, j0 = int(np.floor(u)), int(np.floor(v))
      i1, j1 = min(i0 + 1, 2), min(j0 + 1, 3)
      du, dv = u - i0, v - j0
      xn = np.asarray(x)[0]
      want = ((1 - du) * (1 - dv) * xn[i0, j0] + (1 - du) * dv * xn[i0, j1]
              + du * (1 - dv) * xn[i1, j0] + du * dv * xn[i1, j1])
      np.testing.assert_allclose(y[0, i, j], want, rtol=1e-6)


def test_losses_and_metrics_equal_libmtl(ref, nyu_tasks, tmp_path):
  """mtjax's tasks on the split as mtjax reads it (the LibMTL layout) and LibMTL's predictions:
  LibMTL's SegLoss/DepthLoss/NormalLoss on the first batch and its metrics over the split."""
  write_split(tmp_path, ref)
  split = sources.read_all(data.open_split("nyuv2", "validation", data_dir=str(tmp_path)))
  preds = {name: ref[f"pred_{pretrained.libmtl_task(name)}"].transpose(0, 2, 3, 1)
           for name in NYU_TASKS}
  first = {k: v[:2] for k, v in split.items()}
  for name, task in nyu_tasks.items():
    loss = task.loss_fn(jnp.asarray(preds[name][:2]), first)
    np.testing.assert_allclose(loss, ref[f"loss_{pretrained.libmtl_task(name)}"], rtol=1e-5)
  got = {}
  for name, task in nyu_tasks.items():
    sums = task.metrics_fn(jnp.asarray(preds[name]), split)
    got[name] = summarize(task, jax.tree_util.tree_map(np.asarray, sums))
  miou, pix = ref["metric_segmentation"]
  np.testing.assert_allclose([got["segmentation"]["miou"], got["segmentation"]["pixel_acc"]],
                             [miou, pix], rtol=1e-6)
  np.testing.assert_allclose([got["depth"]["abs_err"], got["depth"]["rel_err"]],
                             ref["metric_depth"], rtol=1e-5)
  mean, median, *within = ref["metric_normal"]
  normals = got["normals"]
  np.testing.assert_allclose(normals["mean_angle"], mean, rtol=1e-5)
  # mtjax reads the median off a 0.05° histogram (exact under sharding): within half a bin of
  # a middle value, and np.median averages the two middle values of the ~1.8k angles here,
  # ≈ 0.1° apart (on a real split, millions of angles: within half a bin).
  assert abs(normals["median_angle"] - median) <= 0.1
  np.testing.assert_allclose([normals["within_11_25"], normals["within_22_5"],
                              normals["within_30"]], 100 * np.asarray(within), rtol=1e-5)


def test_adam_coupled_weight_decay_and_steplr_equal_torch(ref):
  """``torch.optim.Adam(lr, weight_decay)`` (decay added to the gradient) with ``StepLR``
  stepped once per 2-step epoch, step_size 2 epochs: mtjax's ``adam`` + ``step`` schedule
  with step_size 4 steps."""
  cfg = optim.OptimizerSpec(name="adam", learning_rate=1e-2, schedule="step", step_size=4,
                            gamma=0.5, warmup_steps=0, momentum=0.9, weight_decay=0.1,
                            grad_clip=0.0)
  opt = optim.make_optimizer(cfg, 10)
  params = jnp.asarray(ref["adam_p0"])
  state = opt.init(params)
  for step, grad in enumerate(ref["adam_grads"]):
    updates, state = opt.update(jnp.asarray(grad), state, params)
    params = params + updates
    np.testing.assert_allclose(params, ref["adam_params"][step], rtol=1e-5, atol=1e-6,
                               err_msg=f"step {step}")


def test_step_schedule_checks_its_fields():
  cfg = optim.OptimizerSpec(name="adam", schedule="step", learning_rate=1e-4, step_size=0,
                            gamma=0.5)
  with pytest.raises(ValueError, match="optimizer.step_size"):
    optim.make_schedule(cfg, 10)
  cfg = cfg._replace(step_size=3, gamma=2.0)
  with pytest.raises(ValueError, match="optimizer.gamma"):
    optim.make_schedule(cfg, 10)


def _fixture_script():
  """The fixture script as a module (its weight drawing needs numpy only)."""
  import importlib.util
  path = FIXTURE.parent / "make_libmtl_deeplab_fixture.py"
  spec = importlib.util.spec_from_file_location("make_libmtl_deeplab_fixture", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_full_size_model_equals_libmtl(ref, nyu_tasks):
  """``resnet_dilated('resnet50')`` and three 256-channel DeepLab heads on 2048 channels:
  LibMTL's parameter count, the same tensor names and shapes, and LibMTL's predictions for
  weights drawn from each tensor's name (eval mode, a 32×32 image)."""
  import json

  model = models.build("resnet50", nyu_tasks, output_stride=8, stem="imagenet", head="deeplab",
                       head_hidden=256)
  shapes = shapes_of(model, (32, 32, 3))
  assert sum(x.size for x in jax.tree_util.tree_leaves(shapes["params"])) == int(
      ref["full_param_count"])
  script = _fixture_script()
  tensors = {name: script.full_size_tensor(name, tuple(shape))
             for name, shape in json.loads(str(ref["full_shapes"])).items()}
  variables = pretrained.LIBMTL_IMPORTERS["hard"](tensors, dict(shapes))
  del tensors
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, script.full_size_image())
  assert out["features"].shape == (1, 4, 4, 2048)        # output stride 8
  for name in NYU_TASKS:
    expected = ref[f"full_pred_{pretrained.libmtl_task(name)}"].transpose(0, 2, 3, 1)
    scale = np.max(np.abs(expected))
    np.testing.assert_allclose(out[name], expected, rtol=1e-4, atol=1e-5 * scale, err_msg=name)


def test_input_norm_is_applied_once_inside_the_model(nyu_tasks):
  """``"imagenet"`` on images == ``"none"`` on images normalised by hand: normalised once, by
  the model; ``"none"`` adds nothing."""
  seg = {"segmentation": nyu_tasks["segmentation"]}
  plain = models.build("resnet_tiny", seg, width=4, stem="small", head_hidden=4)
  normed = models.build("resnet_tiny", seg, width=4, stem="small", head_hidden=4,
                        input_norm="imagenet")
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 3))
  variables = plain.init(jax.random.PRNGKey(1), x, train=False)
  by_hand = (x - jnp.asarray(multitask.IMAGENET_MEAN)) / jnp.asarray(multitask.IMAGENET_STD)
  a = jax.jit(lambda v, x: normed.apply(v, x, train=False))(variables, x)["segmentation"]
  b = jax.jit(lambda v, x: plain.apply(v, x, train=False))(variables, by_hand)["segmentation"]
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert not np.allclose(a, jax.jit(lambda v, x: plain.apply(v, x, train=False))(
      variables, x)["segmentation"])
  with pytest.raises(ValueError, match="model.input_norm"):
    models.build("resnet_tiny", seg, input_norm="caffe")
  with pytest.raises(ValueError, match="model.head"):
    models.build("resnet_tiny", seg, head="fcn")
