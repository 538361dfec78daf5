"""The detection task (FCOS): box ops, target assignment, NMS, loss, decoding, COCO AP."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtjax import weighting
from mtjax.data import render_scene
from mtjax.models import build
from mtjax.tasks import box_ops, detection
from mtjax.train.step import make_mesh, replicate, shard_batch
from mtjax.train.trainer import make_trainer
from tests.helpers import host_variables, tiny_det_seg_config, tiny_tasks

SIZE = 32


def _scenes(n, seed=0):
  rng = np.random.default_rng(seed)
  examples = [render_scene(rng, SIZE, SIZE) for _ in range(n)]
  return {k: np.stack([e[k] for e in examples])
          for k in ("image", "segmentation", "boxes", "box_classes")}


def test_encode_decode_round_trip():
  key1, key2 = jax.random.split(jax.random.PRNGKey(0))
  lo = jax.random.uniform(key1, (50, 2), maxval=40.0)
  boxes = jnp.concatenate([lo, lo + 1.0 + jax.random.uniform(key2, (50, 2), maxval=20.0)], -1)
  points = lo + 0.3 * (boxes[:, 2:] - lo)
  distances = box_ops.encode(points, boxes)
  assert jnp.all(distances > 0)
  np.testing.assert_allclose(box_ops.decode(points, distances), boxes, rtol=1e-6, atol=1e-5)
  normalized = jnp.array([[0.1, 0.2, 0.5, 0.9]])  # (y0, x0, y1, x1)
  pixels = box_ops.from_normalized(normalized, (20, 40))
  np.testing.assert_allclose(pixels, [[8.0, 2.0, 36.0, 10.0]])
  np.testing.assert_allclose(box_ops.to_normalized(pixels, (20, 40)), normalized, rtol=1e-6)
  # GIoU: 1 for the same box, IoU for nested boxes, negative for far-apart ones.
  a, b = jnp.array([0.0, 0, 2, 2]), jnp.array([4.0, 0, 6, 2])
  assert box_ops.giou(a, a) == pytest.approx(1.0)
  assert box_ops.giou(a, jnp.array([0.0, 0, 1, 1])) == pytest.approx(0.25)
  assert box_ops.giou(a, b) == pytest.approx(0 - 2 / 6)  # hull 12, union 8
  assert box_ops.centerness(jnp.array([1.0, 2.0, 1.0, 2.0])) == pytest.approx(1.0)
  assert box_ops.centerness(jnp.array([1.0, 1.0, 3.0, 1.0])) == pytest.approx(np.sqrt(1 / 3))


def test_assignment_follows_the_paper_rules():
  points = jnp.array([[5.0, 5.0], [5.0, 5.0], [30.0, 30.0], [18.0, 18.0]])
  strides = jnp.array([4.0, 8.0, 4.0, 4.0])
  ranges = jnp.array([[0.0, 32.0], [32.0, jnp.inf], [0.0, 32.0], [0.0, 32.0]])
  boxes = jnp.array([[0.0, 0.0, 40.0, 40.0],     # big: max distance 35 at (5, 5)
                     [2.0, 2.0, 10.0, 10.0],     # small, inside the big one
                     [0.0, 0.0, 40.0, 40.0]])    # a padding row (class 0) over everything
  classes = jnp.array([1, 3, 0])
  labels, targets = detection.assign(points, strides, ranges, boxes, classes, center_sampling=0)
  # (5, 5) at level 0 is in both real boxes; the big one's 35 > 32 is out of range anyway.
  assert int(labels[0]) == 3
  np.testing.assert_allclose(targets[0], [3.0, 3.0, 5.0, 5.0])
  # The same point at level 1 (range [32, inf)): only the big box's 35 fits.
  assert int(labels[1]) == 1
  np.testing.assert_allclose(targets[1], [5.0, 5.0, 35.0, 35.0])
  # (30, 30) is only in the big box: its max distance 30 is in [0, 32].
  assert int(labels[2]) == 1
  # With both boxes in range, the smaller area wins even when listed second.
  wide_range = jnp.full((4, 2), jnp.array([0.0, jnp.inf]))
  both = jnp.array([[0.0, 0.0, 40.0, 40.0], [4.0, 4.0, 30.0, 30.0], [0.0, 0.0, 0.0, 0.0]])
  labels, _ = detection.assign(points, strides, wide_range, both, jnp.array([2, 4, 0]),
                               center_sampling=0)
  assert int(labels[3]) == 4
  # Center sampling (radius 1.5 strides): (30, 30) is 10 px from the big box's centre (20, 20),
  # more than 1.5 × 4 = 6: background; (18, 18) is 2 px away: positive.
  labels, _ = detection.assign(points, strides, wide_range, boxes[:1], classes[:1],
                               center_sampling=1.5)
  assert int(labels[2]) == 0 and int(labels[3]) == 1
  # No real box: every point is background.
  labels, _ = detection.assign(points, strides, wide_range, boxes, jnp.zeros(3, jnp.int32))
  assert not np.any(np.asarray(labels))


def test_nms_per_class_keeps_the_best():
  boxes = jnp.array([[0.0, 0, 10, 10], [0.5, 0, 10, 10], [0.0, 0, 10, 10.5],
                     [20.0, 20, 30, 30], [0.0, 0, 10, 10]])
  scores = jnp.array([0.6, 0.9, 0.7, 0.5, 0.95])
  classes = jnp.array([1, 1, 2, 1, 1])
  valid = jnp.array([True, True, True, True, False])  # the best box is padding: never kept
  keep = jax.jit(box_ops.nms, static_argnums=4)(boxes, scores, classes, valid, 0.5)
  # Box 1 (class 1, 0.9) suppresses its duplicate 0; box 2 is class 2; box 3 does not overlap.
  np.testing.assert_array_equal(keep, [False, True, True, True, False])
  # Class-blind input (one class): the class-2 duplicate goes too.
  keep = box_ops.nms(boxes, scores, jnp.ones(5, jnp.int32), valid, 0.5)
  np.testing.assert_array_equal(keep, [False, True, False, True, False])


def test_steps_and_decoding_without_objects_compile_once():
  """Real train steps (a gradient method at the representation level: the features are the
  pyramid's stage dict) and evaluation on images with scenes, no objects, all-padding rows and
  one object: finite losses and gradients, one compile of the step and one of the evaluation."""
  tasks = tiny_tasks(("detection", "segmentation"))
  model = build("resnet_tiny", tasks, width=8, output_stride=32, stem="small", head_hidden=8)
  mesh = make_mesh(jax.devices()[:1])
  trainer = make_trainer(model, tasks, weighting.get("pcgrad"), optax.adam(1e-3),
                         image_shape=(SIZE, SIZE, 3), batch_size=4, grad_level="representation",
                         mesh=mesh)
  state = replicate(trainer.init(jax.random.PRNGKey(0)), mesh)  # as the loop does
  batch = _scenes(4)
  empty = dict(batch, box_classes=np.zeros_like(batch["box_classes"]))
  padding = dict(empty, boxes=np.zeros_like(batch["boxes"]))
  one = dict(batch, box_classes=batch["box_classes"] * (np.arange(4) == 0)[None, :])
  compiled = []

  def on_duration(event, duration, **kwargs):
    del duration
    if event == "/jax/core/compile/backend_compile_duration":
      compiled.append(kwargs.get("fun_name", ""))

  jax.monitoring.register_event_duration_secs_listener(on_duration)
  try:
    before = jax.device_get(state.params["backbone"])  # the step donates the state
    results = {}
    for name, b in (("scenes", batch), ("no objects", empty), ("all padding", padding),
                    ("one object", one)):
      state, metrics = trainer.step(state, shard_batch(b, mesh))
      _, predictions = trainer.evaluate(state, shard_batch(b, mesh))
      metrics = jax.device_get(metrics)
      assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"]), name
      assert int(state.health.bad_step) < 0, name  # losses, gradient, parameters finite
      results[name] = metrics
      if name == "scenes":
        moved = jax.tree_util.tree_map(lambda a, b: bool(np.any(a != b)),
                                       jax.device_get(state.params["backbone"]), before)
        # The direction reached every block (inside one, the layers before its zero-initialised
        # last BatchNorm scale get no gradient at the first step, by design).
        assert all(any(jax.tree_util.tree_leaves(block)) for block in moved.values()), moved
  finally:
    jax.monitoring.unregister_event_duration_listener(on_duration)
  assert compiled.count("jit(step)") == 1, compiled
  assert compiled.count("jit(evaluate)") == 1, compiled
  # No positives: no box or centerness term, only the focal loss of the negatives.
  assert results["no objects"]["loss/detection/box"] == 0.0
  assert results["all padding"]["loss/detection/centerness"] == 0.0
  assert results["scenes"]["loss/detection/box"] > 0.0
  predictions = jax.device_get(predictions["detection"])
  assert predictions["boxes"].shape == (4, detection.MAX_DETECTIONS, 4)
  assert predictions["scores"].shape == predictions["valid"].shape == (4, detection.MAX_DETECTIONS)
  assert np.all(np.diff(predictions["scores"], axis=1) <= 0)  # sorted by score
  assert np.all((predictions["boxes"] >= 0) & (predictions["boxes"] <= 1))
  # The features: the pyramid's stages as a dict (the segmentation head reads the last).
  features = jax.eval_shape(lambda: model.apply(
      {"params": state.params, "batch_stats": state.batch_stats}, batch["image"],
      method="encode"))
  assert set(features) == {"stage1", "stage2", "stage3"}


def test_coco_ap_of_ground_truth_and_shifted_boxes():
  batch = _scenes(6, seed=1)
  evaluator = detection.evaluator(num_classes=4)
  real = batch["box_classes"] > 0
  truth = {"boxes": batch["boxes"], "scores": np.ones(real.shape), "classes": batch["box_classes"],
           "valid": real}
  state = evaluator.update(evaluator.init(), truth, batch)
  result = evaluator.result(state)
  assert result == pytest.approx({"ap": 1.0, "ap50": 1.0, "ap75": 1.0, "ar": 1.0})
  # Shifted by half their size in x and y: IoU = (1/4) / (7/4) = 1/7 < 0.5 everywhere.
  boxes = batch["boxes"].copy()
  half = 0.5 * (boxes[..., 2:] - boxes[..., :2])
  boxes[..., :2] += half
  boxes[..., 2:] += half
  state = evaluator.update(evaluator.init(), dict(truth, boxes=boxes), batch)
  assert evaluator.result(state)["ap50"] == pytest.approx(0.0, abs=1e-6)
  # Padded examples (mask 0) are left out: the wrong boxes of the padding do not count.
  masked = dict(batch, mask=np.array([1, 1, 1, 0, 0, 0]))
  wrong = dict(truth, boxes=np.where(np.arange(6)[:, None, None] < 3, batch["boxes"], boxes))
  state = evaluator.update(evaluator.init(), wrong, masked)
  assert evaluator.result(state)["ap50"] == pytest.approx(1.0)



@pytest.fixture(scope="module")
def det_seg_data(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def test_missing_evaluator_package_fails_at_build(det_seg_data, tmp_path, monkeypatch):
  """Without faster-coco-eval, a detection run fails at ``setup.build`` (before any data,
  compilation or training) naming the package and the extra; a run without detection builds."""
  import sys

  from mtjax.errors import UserError
  from mtjax.train import loop, setup
  monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # `import` raises ImportError
  cfg = tiny_det_seg_config(det_seg_data)
  message = (r"config\.tasks: task 'detection': .*faster-coco-eval, which is not installed: "
             r"pip install -e \"\.\[detection\]\"")
  with pytest.raises(UserError, match=message):
    setup.build(cfg)
  with pytest.raises(UserError, match=message):
    loop.train(cfg, str(tmp_path / "run"), progress=False)
  assert not (tmp_path / "run").exists()
  with pytest.raises(ImportError, match="faster-coco-eval"):  # the evaluator itself says so too
    detection.evaluator(4).result(([{"id": 1}], [{"id": 1}], [{"id": 1}]))
  setup.build(tiny_det_seg_config(det_seg_data, tasks=("segmentation",)))


def test_loop_prediction_png_draws_the_boxes(det_seg_data, tmp_path, monkeypatch):
  """The loop's evaluation PNG of det_seg: the ground-truth boxes of each validation image
  (with the dataset's class names) and the detections, over the image and segmentation."""
  import types

  from mtjax.data import dataset_info
  from mtjax.tasks import detection_plot
  from mtjax.train import loop, setup, sinks
  cfg = tiny_det_seg_config(det_seg_data, prediction_images=2)
  run = setup.resolve(cfg)
  exp = run.experiment
  val = setup.load_data(cfg, "validation", exp.label_keys)
  calls = []
  draw = detection_plot.draw_boxes

  def spy(ax, boxes, classes, size, **kwargs):
    calls.append((np.asarray(classes), kwargs, draw(ax, boxes, classes, size, **kwargs)))
    return calls[-1][-1]

  monkeypatch.setattr(detection_plot, "draw_boxes", spy)
  variables = host_variables(exp.model, (SIZE, SIZE, 3))
  state = types.SimpleNamespace(params=variables["params"],
                                batch_stats=variables.get("batch_stats", {}))
  trainer = types.SimpleNamespace(predict=jax.jit(lambda state, images: {
      name: task.predict_fn(exp.model.apply(
          {"params": state.params, "batch_stats": state.batch_stats}, images, False)[name])
      for name, task in exp.tasks.items()}))
  loop.prediction_shower(run, trainer, val, sinks.Sinks((), None, None, str(tmp_path)))(
      state, 7)
  assert (tmp_path / "predictions" / "step_7.png").stat().st_size > 0
  truth, predicted = calls[0::2], calls[1::2]
  assert len(truth) == len(predicted) == 2    # one of each per image
  for n, (classes, kwargs, drawn) in enumerate(truth):
    np.testing.assert_array_equal(classes, val["box_classes"][n])
    assert drawn == np.count_nonzero(val["box_classes"][n]) > 0
    assert kwargs["class_names"] == dataset_info("shapes")["class_names"]
    # Columns: image, detection target, detection prediction, segmentation target, prediction.
    assert kwargs["offset"] == (n * SIZE, SIZE)
  for n, (classes, kwargs, _) in enumerate(predicted):
    assert classes.shape == (detection.MAX_DETECTIONS,) and "scores" in kwargs
    assert kwargs["offset"] == (n * SIZE, 2 * SIZE)
