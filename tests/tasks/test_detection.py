"""The detection task (FCOS): box ops, target assignment, NMS, loss, decoding, COCO AP."""

import functools
import pathlib

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


def test_nms_equals_greedy_nms_on_random_boxes():
  """The while-loop NMS keeps exactly the boxes of the textbook greedy algorithm (sort by score;
  keep a box unless a kept box of its class overlaps it with IoU > threshold) on 300 random
  boxes of 3 classes with invalid slots, at two thresholds."""
  rng = np.random.default_rng(5)
  lo = rng.uniform(0, 50, (300, 2))
  boxes = np.concatenate([lo, lo + rng.uniform(2, 20, (300, 2))], 1).astype(np.float32)
  scores = rng.permutation(300).astype(np.float32) / 300
  classes = rng.integers(1, 4, 300)
  valid = rng.random(300) < 0.8
  area = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
  nms = jax.jit(box_ops.nms, static_argnums=4)
  for threshold in (0.3, 0.6):
    keep = np.zeros(300, bool)
    for i in np.argsort(-scores):
      if not valid[i]:
        continue
      kept = np.flatnonzero(keep & (classes == classes[i]))
      lo = np.maximum(boxes[kept, :2], boxes[i, :2])
      inter = np.prod(np.clip(np.minimum(boxes[kept, 2:], boxes[i, 2:]) - lo, 0, None), axis=1)
      union = area[kept] + area[i] - inter
      if len(kept) == 0 or np.max(inter / union) <= threshold:
        keep[i] = True
    result = np.asarray(nms(boxes, scores, classes, valid, threshold))
    np.testing.assert_array_equal(result, keep)
    assert 20 < keep.sum() < valid.sum()


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



REFERENCE = pathlib.Path(__file__).parents[1] / "fixtures" / "detection_reference.npz"


@pytest.fixture(scope="module")
def reference():
  return dict(np.load(REFERENCE))


def _reference_levels(ref):
  """The fixture's two pyramid levels (strides 8, 16 of a 96×96 image) as FCOSHead outputs."""
  size = ref["loss/image_size"]
  levels, start = [], 0
  strides = [float(s) for s in ref["loss/strides"]]
  for i, stride in enumerate(strides):
    n = int(size[0] // stride)
    ys, xs = np.meshgrid((np.arange(n) + 0.5) * stride, (np.arange(n) + 0.5) * stride,
                         indexing="ij")
    count = n * n
    hi = np.inf if i == len(strides) - 1 else 8.0 * strides[0] * 2**i
    levels.append({
        "cls": jnp.asarray(ref["loss/cls"][:, start:start + count]),
        "box": jnp.asarray(ref["loss/box"][:, start:start + count]),
        "centerness": jnp.asarray(ref["loss/centerness"][:, start:start + count]),
        "points": jnp.asarray(np.stack([xs, ys], -1).reshape(-1, 2), jnp.float32),
        "stride": jnp.float32(stride),
        "range": jnp.array([0.0 if i == 0 else 8.0 * strides[0] * 2 ** (i - 1), hi]),
        "image_size": jnp.asarray(size, jnp.float32)})
    start += count
  return levels


def test_targets_and_losses_match_fcos_and_torchvision(reference):
  """EVIDENCE. On a fixed two-image case (overlapping boxes of 3 classes on P3–P4, an ignore
  row, padding rows, random logits and distances): the targets equal those of the authors'
  ``compute_targets_for_locations`` (centre sampling 1.5), the loss parts equal eq. 2 computed
  with ``torchvision.ops.sigmoid_focal_loss``, ``generalized_box_iou_loss`` and the official
  centerness targets; decoding a point's regression target gives back its ground-truth box."""
  ref = reference
  levels = _reference_levels(ref)
  batch = {"boxes": ref["loss/boxes"], "box_classes": ref["loss/box_classes"],
           "box_ignore": ref["loss/box_ignore"]}
  cls, box, ctr, points, strides, ranges = detection._concat_levels(levels)
  gt = box_ops.from_normalized(jnp.asarray(batch["boxes"]), (96.0, 96.0))
  labels, targets = jax.jit(jax.vmap(detection.assign, in_axes=(None, None, None, 0, 0)))(
      points, strides, ranges, gt, detection.target_classes(batch))
  np.testing.assert_array_equal(labels, ref["loss/labels"])
  positive = ref["loss/labels"] > 0
  assert positive.sum() == ref["loss/num_pos"] > 30 and positive[:, 144:].any()  # both levels
  np.testing.assert_allclose(np.asarray(targets)[positive], ref["loss/reg_targets"][positive],
                             rtol=1e-6, atol=1e-5)
  # decode(encode(gt)) == gt: every positive point's target decodes to a real box of its image.
  decoded = np.asarray(box_ops.decode(points[None], targets))
  for b in range(2):
    real = np.asarray(gt[b])[np.asarray(detection.target_classes(batch))[b] > 0]
    for row in decoded[b][positive[b]]:
      assert np.min(np.max(np.abs(real - row), axis=1)) < 1e-5
  loss_fn = jax.jit(detection.loss_fn)   # one compile for both batches below
  _, parts = loss_fn(levels, batch)
  for name in ("cls", "box", "centerness"):
    np.testing.assert_allclose(parts[name], ref[f"loss/{name}_loss"], rtol=2e-5, err_msg=name)
  # The ignore row is no target: the loss equals the loss without that row.
  dropped = dict(batch, box_classes=np.where(batch["box_ignore"] > 0, 0, batch["box_classes"]),
                 box_ignore=np.zeros_like(batch["box_ignore"]))
  np.testing.assert_allclose(loss_fn(levels, dropped)[0], loss_fn(levels, batch)[0], rtol=1e-6)


def test_loss_terms_match_the_reference_functions(reference):
  """EVIDENCE. Element-wise on fixed inputs: the focal loss the task uses
  (``optax.sigmoid_focal_loss``, α 0.25, γ 2) against ``torchvision.ops.sigmoid_focal_loss``;
  1 − :func:`box_ops.giou` against ``torchvision.ops.generalized_box_iou_loss`` (random pairs,
  identical, nested, touching and disjoint boxes); :func:`box_ops.centerness` against the
  authors' ``compute_centerness_targets``."""
  ref = reference
  focal = optax.sigmoid_focal_loss(ref["focal/logits"], ref["focal/labels"],
                                   alpha=detection.FOCAL_ALPHA, gamma=detection.FOCAL_GAMMA)
  np.testing.assert_allclose(focal, ref["focal/loss"], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(1.0 - box_ops.giou(ref["giou/a"], ref["giou/b"]), ref["giou/loss"],
                             rtol=1e-5, atol=1e-6)
  assert ref["giou/loss"].min() < 1e-6 and ref["giou/loss"].max() > 1.2  # exact hit .. disjoint
  np.testing.assert_allclose(box_ops.centerness(ref["centerness/distances"]),
                             ref["centerness/targets"], rtol=1e-6)


def _eval_batch(ref):
  size = int(ref["eval/image_size"][0])
  batch = {"image": np.zeros((len(ref["eval/boxes"]), size, size, 3), np.float32),
           "boxes": ref["eval/boxes"], "box_classes": ref["eval/box_classes"],
           "box_ignore": ref["eval/box_ignore"]}
  predictions = {"boxes": ref["eval/det_boxes"], "scores": ref["eval/det_scores"],
                 "classes": ref["eval/det_classes"], "valid": ref["eval/det_valid"]}
  return batch, predictions


def test_coco_ap_with_crowds_matches_pycocotools(reference):
  """EVIDENCE. A partial case (5 images, 3 classes; misses, duplicates, false positives, poor
  localisation, detections on ignore regions): AP, AP50, AP75 and AR of the task's evaluator
  (faster-coco-eval, ignore rows as ``iscrowd``) equal pycocotools' on the same annotations."""
  batch, predictions = _eval_batch(reference)
  assert batch["box_ignore"].any()
  evaluator = detection.evaluator(num_classes=3)
  state = evaluator.update(evaluator.init(), predictions, batch)
  stats = reference["eval/coco_stats"]
  assert 0.1 < stats[1] < 0.9
  assert evaluator.result(state) == pytest.approx(
      {"ap": stats[0], "ap50": stats[1], "ap75": stats[2], "ar": stats[8]}, abs=1e-6)
  # Without the ignore flags the crowds count as objects to find: the AP changes.
  plain = {k: v for k, v in batch.items() if k != "box_ignore"}
  state = evaluator.update(evaluator.init(), predictions, plain)
  assert evaluator.result(state)["ap50"] != pytest.approx(stats[1], abs=1e-3)


def test_voc_map_matches_the_devkit_port(reference):
  """EVIDENCE. The same case through the VOC evaluator (ignore rows as ``difficult``): the
  per-class AP (VOC2007 11-point, VOC2010+ all-point) equals detectron2's ``voc_eval`` (the
  devkit's Python port), and ``voc_map``/``voc07_map`` are their means."""
  batch, predictions = _eval_batch(reference)
  task = detection.task(num_classes=3, max_boxes=6, ignore_regions=True, evaluation="voc")
  assert task.label_spec(None)["box_ignore"] == ((6,), jnp.int32)
  state = task.evaluator.update(task.evaluator.init(), predictions, batch)
  for klass in range(1, 4):
    recall, precision, npos = detection.voc_class_curve(state, klass)
    assert npos > 0
    assert detection.voc_ap(recall, precision) == pytest.approx(
        reference["eval/voc_class_ap"][klass - 1], abs=1e-12)
    assert detection.voc_ap(recall, precision, use_07_metric=True) == pytest.approx(
        reference["eval/voc07_class_ap"][klass - 1], abs=1e-12)
  result = task.evaluator.result(state)
  assert result == pytest.approx({"voc_map": reference["eval/voc_class_ap"].mean(),
                                  "voc07_map": reference["eval/voc07_class_ap"].mean()})
  assert result["voc_map"] != pytest.approx(result["voc07_map"], abs=1e-3)
  with pytest.raises(ValueError, match=r"evaluation: expected one of \('coco', 'voc'\)"):
    detection.task(num_classes=3, max_boxes=6, evaluation="pascal")


def _one_level(cls, box, ctr, size=32.0, stride=8.0):
  n = int(size // stride)
  ys, xs = np.meshgrid((np.arange(n) + 0.5) * stride, (np.arange(n) + 0.5) * stride,
                       indexing="ij")
  return [{"cls": jnp.asarray(cls, jnp.float32)[None], "box": jnp.asarray(box, jnp.float32)[None],
           "centerness": jnp.asarray(ctr, jnp.float32)[None],
           "points": jnp.asarray(np.stack([xs, ys], -1).reshape(-1, 2), jnp.float32),
           "stride": jnp.float32(stride), "range": jnp.array([0.0, jnp.inf]),
           "image_size": jnp.array([size, size], jnp.float32)}]


def test_decoding_thresholds_before_top_k_and_clips_before_nms():
  """As the authors' ``FCOSPostProcessor``: the top-k is taken among the points whose class
  probability passes the threshold (points with a high centerness but a low class score do
  not crowd them out), and boxes are clipped to the image before NMS."""
  logit = lambda p: float(np.log(p / (1 - p)))  # noqa: E731
  cls = np.full((16, 1), logit(0.01))
  ctr = np.full((16,), -8.0)
  cls[:12], ctr[:12] = logit(0.04), 8.0          # score sqrt(0.04 · 1) = 0.2, under threshold
  cls[12:], ctr[12:] = logit(0.2), -3.0          # score sqrt(0.2 · 0.047) ≈ 0.1: candidates
  box = np.full((16, 4), 2.0)
  predict = jax.jit(functools.partial(detection.predict_fn, pre_nms_top_k=4, max_detections=8))
  out = predict(_one_level(cls, box, ctr))
  assert int(out["valid"].sum()) == 4            # top-k first would keep 0 candidates of 12
  np.testing.assert_allclose(out["scores"][0, :4],
                             np.sqrt(0.2 * jax.nn.sigmoid(-3.0)), rtol=1e-5)
  # Two boxes at the image's right edge, 32 px: unclipped IoU 0.25, clipped to x ≤ 32 IoU 1.
  cls = np.full((16, 1), logit(0.01))
  cls[7], cls[11] = logit(0.9), logit(0.8)       # points (28, 12) and (28, 20)
  box = np.ones((16, 4))
  box[7] = (4.0, 4.0, 28.0, 4.0)                 # x 24..56, y 8..16
  box[11] = (4.0, 12.0, 4.0, -4.0)               # x 24..32, y 8..16
  out = predict(_one_level(cls, box, np.zeros(16)))
  assert int(out["valid"].sum()) == 1            # the clipped duplicates: one survives NMS
  np.testing.assert_allclose(out["boxes"][0, 0], [8 / 32, 24 / 32, 16 / 32, 1.0], atol=1e-6)


def test_head_initialisation_follows_fcos():
  """The towers' and outputs' convolutions N(0, 0.01²) with zero biases, the class logits'
  bias −log((1 − π)/π), the FPN's kaiming_uniform(a=1) (fcos_core's fcos.py and FPN)."""
  head = detection.FCOSHead(num_classes=3, hidden=32, feature_stages=2, min_stride=1)
  features = {"stage1": jnp.ones((1, 16, 16, 8)), "stage2": jnp.ones((1, 8, 8, 16))}
  init = jax.jit(head.init, static_argnums=(2, 3))
  params = init(jax.random.PRNGKey(0), features, (32, 32), False)["params"]
  for name in ("cls_conv0", "cls_conv1", "box_conv0", "box_conv1", "box_pred", "centerness",
               "cls_logits"):
    kernel = np.asarray(params[name]["kernel"])
    assert abs(kernel.std() - 0.01) < 0.0015 and abs(kernel.mean()) < 0.002, name
  np.testing.assert_allclose(params["cls_logits"]["bias"], -np.log(0.99 / 0.01), rtol=1e-6)
  assert not np.any(params["box_pred"]["bias"]) and not np.any(params["cls_conv0"]["bias"])
  fan_in = 9 * 32
  fpn = np.asarray(params["fpn0"]["kernel"])
  assert np.abs(fpn).max() <= np.sqrt(3 / fan_in) and fpn.std() > 0.8 / np.sqrt(fan_in)


@pytest.fixture(scope="module")
def det_seg_data(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def test_missing_evaluator_package_fails_at_build(det_seg_data, tmp_path, monkeypatch):
  """Without faster-coco-eval, a detection run fails at ``loop.build`` (before any data,
  compilation or training) naming the package and the extra; a run without detection builds."""
  import sys

  from mtjax.errors import UserError
  from mtjax.train import loop
  monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # `import` raises ImportError
  cfg = tiny_det_seg_config(det_seg_data)
  message = (r"config\.tasks: task 'detection': .*faster-coco-eval, which is not installed: "
             r"pip install -e \"\.\[detection\]\"")
  with pytest.raises(UserError, match=message):
    loop.build(cfg)
  with pytest.raises(UserError, match=message):
    loop.train(cfg, str(tmp_path / "run"), progress=False)
  assert not (tmp_path / "run").exists()
  with pytest.raises(ImportError, match="faster-coco-eval"):  # the evaluator itself says so too
    detection.evaluator(4).result(([{"id": 1}], [{"id": 1}], [{"id": 1}]))
  loop.build(tiny_det_seg_config(det_seg_data, tasks=("segmentation",)))


def test_loop_prediction_png_draws_the_boxes(det_seg_data, tmp_path, monkeypatch):
  """The loop's evaluation PNG of det_seg: the ground-truth boxes of each validation image
  (with the dataset's class names) and the detections, over the image and segmentation."""
  import types

  from mtjax.data import dataset_info
  from mtjax.tasks import detection_plot
  from mtjax.train import loop
  cfg = tiny_det_seg_config(det_seg_data, prediction_images=2)
  exp = loop.build(cfg)
  val = loop.load_data(cfg, "validation", exp.label_keys)
  calls = []
  draw = detection_plot.draw_boxes

  def spy(ax, boxes, classes, size, **kwargs):
    calls.append((np.asarray(classes), kwargs, draw(ax, boxes, classes, size, **kwargs)))
    return calls[-1][-1]

  monkeypatch.setattr(detection_plot, "draw_boxes", spy)
  variables = host_variables(exp.model, (SIZE, SIZE, 3))
  state = types.SimpleNamespace(params=variables["params"],
                                batch_stats=variables.get("batch_stats", {}))
  loop._prediction_shower(cfg, exp, str(tmp_path), val)(state, 7)
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
