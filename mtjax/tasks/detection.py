"""Object detection: FCOS (Tian et al., 2019), anchor-free, on a small feature pyramid.

What is taken from the paper (arXiv:1904.01355v5) and its "improvements" (§ 3.3 and Table 3
of v5, also the defaults of the authors' repository):

- **Pyramid**: the ``feature_stages`` (3) deepest backbone stages of stride ≥ ``min_stride``
  (4) — C3–C5 of a ResNet with the ImageNet stem; at 64×64 with the small stem, the stages of
  stride 4 and 8 (two levels: stride 2 would cost 4× the rest of the head) — each a
  lateral 1×1 convolution, a top-down pathway (nearest upsampling and sum) and a 3×3 output
  convolution (Lin et al., 2017, FPN). No P6/P7 (at 64×64 the image is 2×2 at stride 32).
- **Head**, shared across levels: a classification and a regression tower of ``tower_depth``
  3×3 convolutions with GroupNorm (4 in the paper, 2 here: CPU-sized), class logits with the
  prior bias ``-log((1 - π) / π)``, π = 0.01 (focal loss, Lin et al., 2017), box distances
  ``exp(s_l · x) · stride_l`` (a learned scale per level, eq. in § 3.1; regression normalised
  by the stride: improvement), centerness on the regression tower (improvement). Initialised
  as the authors' ``fcos.py``: tower and output convolutions N(0, 0.01²), biases 0; the FPN's
  convolutions kaiming_uniform(a=1) as maskrcnn-benchmark's FPN.
- **Targets** (§ 3.1–3.2): a point is a candidate for a box when it lies inside the box — with
  *center sampling* (improvement, radius 1.5 strides: inside the box and within 1.5 strides of
  its centre; ``center_sampling=0`` is the paper's plain rule) — and the largest of its four
  distances falls in its level's range; the ranges are those of the paper for a pyramid whose
  first level has stride s: ``[0, 8s], [8s, 16s], …, [.., ∞]`` (P3–P7: 0, 64, 128, 256, 512, ∞).
  A point with several candidate boxes regresses the one with the smallest area (§ 3.2).
- **Loss** (eq. 2): focal loss (α = 0.25, γ = 2) over every point and class, normalised by the
  number of positive points; GIoU loss (Rezatofighi et al., 2019; improvement over IoU loss)
  weighted by the centerness targets and normalised by their sum (authors' repository);
  centerness binary cross-entropy over the positive points. The parts are returned and logged.
- **Decoding** (the authors' ``FCOSPostProcessor``, ``fcos_core/modeling/rpn/fcos/inference.py``,
  and their defaults): per level, the (point, class) pairs with ``σ(class) > score_threshold``
  (0.05) are the candidates; among them the top ``pre_nms_top_k`` (1000) by
  ``σ(class) · σ(centerness)``; boxes clipped to the image; class-aware NMS at IoU 0.6 over all
  levels; at most ``max_detections`` (100) per image, scored ``sqrt(σ(class) · σ(centerness))``;
  all fixed-shape, batched, jittable.

Labels (``boxes`` (M, 4) normalised ``(y0, x0, y1, x1)``, ``box_classes`` (M,) in 1..C with 0
for padding rows, and with ``ignore_regions`` ``box_ignore`` (M,): 1 for an ignore region) have
a fixed ``max_boxes`` rows; an image with no object is valid. Ignore regions are no training
targets and are ignored by the evaluation. Evaluation (host-side :class:`Evaluator`): COCO AP,
AP50, AP75 and AR from ``faster-coco-eval`` (ignore regions as ``iscrowd``), or for VOC the
devkit's mAP@0.5, all-point (VOC2010+) and 11-point (VOC2007), ignore regions as
``difficult``. docs/detection.md lists each part with its reference and its test.
"""

import functools
import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtjax.tasks import box_ops
from mtjax.tasks.base import Evaluator, Task, example_mask, needs_classes

FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0   # Lin et al. (2017), used by FCOS
PRIOR = 0.01                           # π of the class logits' bias
CENTER_SAMPLING = 1.5                  # radius in strides (FCOS improvements)
NMS_IOU, SCORE_THRESHOLD = 0.6, 0.05   # FCOS inference
PRE_NMS_TOP_K, MAX_DETECTIONS = 1000, 100  # per level before NMS; per image after
# FCOS's initialisation (fcos_core/modeling/rpn/fcos/fcos.py): the towers' and the outputs'
# convolutions N(0, 0.01²), biases 0 (the class logits' bias: the prior); the FPN's convolutions
# kaiming_uniform(a=1) (maskrcnn-benchmark's conv_with_kaiming_uniform): U(±sqrt(3 / fan_in)).
HEAD_INIT = nn.initializers.normal(stddev=0.01)
FPN_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


def _norm_groups(channels: int) -> int:
  """GroupNorm groups: 32 as in FCOS where the width allows, at least 4 channels a group."""
  return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0 and channels // g >= 4
              or g == 1)


def _stage_index(name: str) -> int:
  return int(name[5:]) if name[5:].isdigit() else 0


class FCOSHead(nn.Module):
  """FPN over the deepest backbone stages and the FCOS head shared across its levels.

  ``features``: the dict ``{"stage<i>": (B, h, w, c)}`` the model gives a head with
  ``feature_stages > 1`` (or one array). Returns a list, one dict per level (shallow to deep):
  ``cls`` (B, P, C) logits, ``box`` (B, P, 4) distances ``(l, t, r, b)`` in pixels,
  ``centerness`` (B, P) logits, and the level's constants ``points`` (P, 2) (x, y) pixel centres,
  ``stride``, ``range`` (2,) (the regression range of its targets) and ``image_size`` (2,).
  """

  num_classes: int
  hidden: int = 64
  dtype: jnp.dtype = jnp.float32
  feature_stages: int = 3   # pyramid levels: read by the model (MultiTaskModel.encode)
  tower_depth: int = 2
  min_stride: int = 4       # finer stages are left out (their cost, ≥ 9 px objects at 64×64)

  @nn.compact
  def __call__(self, features, output_size, train: bool):
    del train  # GroupNorm only: no batch statistics
    if not isinstance(features, Mapping):
      features = {"stage": features}
    names = sorted(features, key=_stage_index)[-self.feature_stages:]
    maps = [features[n] for n in names]
    coarse = [m for m in maps if output_size[0] / m.shape[1] >= self.min_stride]
    maps = coarse or maps[-1:]
    conv = functools.partial(nn.Conv, dtype=self.dtype, kernel_init=FPN_INIT)
    head_conv = functools.partial(nn.Conv, dtype=self.dtype, kernel_init=HEAD_INIT)
    lateral = [conv(self.hidden, (1, 1), name=f"lateral{i}")(m) for i, m in enumerate(maps)]
    pyramid = [None] * len(maps)
    top = lateral[-1]
    for i in reversed(range(len(maps))):
      if i < len(maps) - 1:
        top = lateral[i] + jax.image.resize(top, lateral[i].shape, "nearest")
      pyramid[i] = conv(self.hidden, (3, 3), padding=1, name=f"fpn{i}")(top)

    def tower(prefix):
      layers = [(head_conv(self.hidden, (3, 3), padding=1, name=f"{prefix}_conv{k}"),
                 nn.GroupNorm(_norm_groups(self.hidden), dtype=self.dtype,
                              name=f"{prefix}_norm{k}")) for k in range(self.tower_depth)]
      def apply(x):
        for c, n in layers:
          x = nn.relu(n(c(x)))
        return x
      return apply

    cls_tower, box_tower = tower("cls"), tower("box")
    prior_bias = nn.initializers.constant(-math.log((1 - PRIOR) / PRIOR))
    cls_out = head_conv(self.num_classes, (3, 3), padding=1, bias_init=prior_bias,
                        name="cls_logits")
    box_out = head_conv(4, (3, 3), padding=1, name="box_pred")
    ctr_out = head_conv(1, (3, 3), padding=1, name="centerness")
    height, width = output_size
    first_stride = height / pyramid[0].shape[1]
    levels = []
    for i, p in enumerate(pyramid):
      batch, h, w, _ = p.shape
      stride = height / h
      scale = self.param(f"scale{i}", nn.initializers.ones, ())
      c, r = cls_tower(p), box_tower(p)
      distances = jnp.exp(jnp.clip(scale * box_out(r).astype(jnp.float32), -10.0, 10.0)) * stride
      ys, xs = jnp.meshgrid((jnp.arange(h) + 0.5) * (height / h),
                            (jnp.arange(w) + 0.5) * (width / w), indexing="ij")
      lo = 0.0 if i == 0 else 8.0 * first_stride * 2 ** (i - 1)
      hi = jnp.inf if i == len(pyramid) - 1 else 8.0 * first_stride * 2**i
      levels.append({
          "cls": cls_out(c).astype(jnp.float32).reshape(batch, h * w, self.num_classes),
          "box": distances.reshape(batch, h * w, 4),
          "centerness": ctr_out(r).astype(jnp.float32).reshape(batch, h * w),
          "points": jnp.stack([xs, ys], -1).reshape(h * w, 2).astype(jnp.float32),
          "stride": jnp.full((), stride, jnp.float32),
          "range": jnp.array([lo, hi], jnp.float32),
          "image_size": jnp.array([height, width], jnp.float32),
      })
    return levels


def _concat_levels(levels):
  """Per-point arrays of all levels: cls, box, centerness, points, strides, ranges."""
  cat = functools.partial(jnp.concatenate, axis=1)
  sizes = [lv["points"].shape[0] for lv in levels]
  return (cat([lv["cls"] for lv in levels]), cat([lv["box"] for lv in levels]),
          cat([lv["centerness"] for lv in levels]),
          jnp.concatenate([lv["points"] for lv in levels]),
          jnp.concatenate([jnp.full((n,), lv["stride"]) for n, lv in zip(sizes, levels,
                                                                         strict=True)]),
          jnp.concatenate([jnp.broadcast_to(lv["range"], (n, 2))
                           for n, lv in zip(sizes, levels, strict=True)]))


def assign(points, strides, ranges, boxes, classes, center_sampling: float = CENTER_SAMPLING):
  """FCOS targets of one image: ``(labels (P,) in 0..C (0: background), distances (P, 4))``.

  ``points`` (P, 2) pixel (x, y); ``strides`` (P,); ``ranges`` (P, 2); ``boxes`` (M, 4) pixel
  ``(x0, y0, x1, y1)``; ``classes`` (M,) with 0 for padding rows. A point's candidates are the
  real boxes it lies in (within ``center_sampling`` strides of the centre if > 0) whose largest
  distance is in the point's range; the one of smallest area wins. Jittable, fixed shapes.
  """
  distances = box_ops.encode(points[:, None, :], boxes[None, :, :])        # (P, M, 4)
  inside = jnp.min(distances, axis=-1) > 0
  if center_sampling > 0:
    centre = 0.5 * (boxes[:, :2] + boxes[:, 2:])                            # (M, 2)
    radius = center_sampling * strides[:, None, None]                      # (P, 1, 1)
    lo = jnp.maximum(centre[None] - radius, boxes[None, :, :2])
    hi = jnp.minimum(centre[None] + radius, boxes[None, :, 2:])
    inside &= jnp.all((points[:, None] > lo) & (points[:, None] < hi), axis=-1)
  largest = jnp.max(distances, axis=-1)
  in_range = (largest >= ranges[:, 0:1]) & (largest <= ranges[:, 1:2])
  candidate = inside & in_range & (classes > 0)[None, :]
  areas = jnp.where(candidate, box_ops.area(boxes)[None, :], jnp.inf)
  best = jnp.argmin(areas, axis=-1)
  positive = jnp.any(candidate, axis=-1)
  labels = jnp.where(positive, classes[best], 0)
  targets = jnp.take_along_axis(distances, best[:, None, None], axis=1)[:, 0]
  return labels, targets


def target_classes(batch):
  """``box_classes`` with the ignore regions (``box_ignore`` > 0: COCO crowds, Cityscapes
  groups, VOC difficult objects) set to 0: they are no training targets, as the authors' data
  loaders drop them (FCOS's ``COCODataset`` keeps ``iscrowd == 0``; maskrcnn-benchmark's
  ``PascalVOCDataset`` trains without ``difficult`` objects); their points are background."""
  classes = jnp.asarray(batch["box_classes"], jnp.int32)
  if "box_ignore" in batch:
    classes = jnp.where(jnp.asarray(batch["box_ignore"]) > 0, 0, classes)
  return classes


def _image_size(levels):
  """(H, W) of the input image."""
  return levels[0]["image_size"][0], levels[0]["image_size"][1]


def _terms(levels, batch, center_sampling):
  """Per-point loss terms and their normalisers (sums over the batch's labelled images)."""
  cls, box, ctr, points, strides, ranges = _concat_levels(levels)
  num_classes = cls.shape[-1]
  batch_size = cls.shape[0]
  gt = box_ops.from_normalized(jnp.asarray(batch["boxes"], jnp.float32), _image_size(levels))
  labels, targets = jax.vmap(assign, in_axes=(None, None, None, 0, 0, None))(
      points, strides, ranges, gt, target_classes(batch), center_sampling)
  mask = example_mask(batch, "detection", batch_size)                     # (B,)
  onehot = jax.nn.one_hot(labels - 1, num_classes)                         # background: zeros
  focal = optax.sigmoid_focal_loss(cls, onehot, alpha=FOCAL_ALPHA, gamma=FOCAL_GAMMA)
  positive = (labels > 0) * mask[:, None]                                  # (B, P)
  # Sanitised boxes where a point is negative: no NaN reaches the gradient through `where`.
  safe = jnp.where(positive[..., None] > 0, targets, 1.0)
  ctr_target = box_ops.centerness(safe) * positive
  pred_boxes = box_ops.decode(points, jnp.where(positive[..., None] > 0, box, 1.0))
  giou = box_ops.giou(pred_boxes, box_ops.decode(points, safe))
  bce = optax.sigmoid_binary_cross_entropy(ctr, ctr_target)
  return {
      "cls": (jnp.sum(focal * mask[:, None, None]), jnp.sum(positive)),
      "box": (jnp.sum((1.0 - giou) * ctr_target), jnp.sum(ctr_target)),
      "centerness": (jnp.sum(bce * positive), jnp.sum(positive)),
  }


def loss_fn(levels, batch, *, center_sampling=CENTER_SAMPLING):
  """FCOS loss (eq. 2) and its parts ``{"cls", "box", "centerness"}``; finite with no objects."""
  terms = _terms(levels, batch, center_sampling)
  parts = {name: total / jnp.maximum(count, 1e-6 if name == "box" else 1.0)
           for name, (total, count) in terms.items()}
  return sum(parts.values()), parts


def metrics_fn(levels, batch, *, center_sampling=CENTER_SAMPLING):
  """The loss parts as exact sums: focal loss per positive point, GIoU loss per unit of
  centerness, centerness BCE per positive point (COCO AP comes from the evaluator)."""
  terms = _terms(levels, batch, center_sampling)
  return {f"{name}_loss": pair for name, pair in terms.items()}


def _decode_image(cls, box, ctr, points, level_sizes, image_size, *, pre_nms_top_k,
                  score_threshold, nms_iou, max_detections):
  """One image's detections: (boxes (K, 4) pixels, scores (K,), classes (K,) 1..C, valid).

  As ``FCOSPostProcessor`` of the authors' code (``fcos_core/modeling/rpn/fcos/inference.py``):
  per level, the (point, class) pairs with ``σ(class) > score_threshold`` are the candidates,
  and the ``pre_nms_top_k`` of them with the highest ``σ(class) · σ(centerness)`` are kept;
  their boxes are clipped to the image; class-aware NMS over all levels; the
  ``max_detections`` best remain, scored ``sqrt(σ(class) · σ(centerness))``. Fixed shapes: a
  level keeps ``min(pre_nms_top_k, points × classes)`` slots, the ones that are not candidates
  marked invalid (never kept by NMS).
  """
  num_classes = cls.shape[-1]
  prob = jax.nn.sigmoid(cls)
  score = prob * jax.nn.sigmoid(ctr)[:, None]                               # (P, C)
  candidate = prob > score_threshold
  height, width = image_size
  cand_boxes, cand_scores, cand_classes, cand_valid = [], [], [], []
  start = 0
  for size in level_sizes:  # per-level top-k among the candidates (static sizes)
    s = jnp.where(candidate[start:start + size], score[start:start + size], -1.0).reshape(-1)
    k = min(pre_nms_top_k, s.shape[0])
    top, index = jax.lax.top_k(s, k)
    point = index // num_classes + start
    boxes = box_ops.decode(points[point], box[point])
    cand_boxes.append(jnp.clip(boxes, 0.0, jnp.stack([width, height, width, height])))
    cand_scores.append(jnp.sqrt(jnp.maximum(top, 0.0)))
    cand_classes.append(index % num_classes + 1)
    cand_valid.append(top >= 0)
    start += size
  boxes, scores = jnp.concatenate(cand_boxes), jnp.concatenate(cand_scores)
  classes, valid = jnp.concatenate(cand_classes), jnp.concatenate(cand_valid)
  keep = box_ops.nms(boxes, scores, classes, valid, nms_iou)
  k = min(max_detections, scores.shape[0])
  top, index = jax.lax.top_k(jnp.where(keep, scores, -1.0), k)
  return boxes[index], jnp.maximum(top, 0.0), classes[index], top >= 0


def predict_fn(levels, *, pre_nms_top_k=PRE_NMS_TOP_K, score_threshold=SCORE_THRESHOLD,
               nms_iou=NMS_IOU, max_detections=MAX_DETECTIONS):
  """Batched detections: ``boxes`` (B, K, 4) normalised ``(y0, x0, y1, x1)``, ``scores``,
  ``classes`` (1..C), ``valid`` (B, K); K = ``max_detections`` (fewer only if there are fewer
  candidates). Fixed shapes whatever the number of objects: compiles once."""
  cls, box, ctr, points, _, _ = _concat_levels(levels)
  sizes = tuple(lv["points"].shape[0] for lv in levels)
  decode_one = functools.partial(_decode_image, points=points, level_sizes=sizes,
                                 image_size=_image_size(levels),
                                 pre_nms_top_k=pre_nms_top_k, score_threshold=score_threshold,
                                 nms_iou=nms_iou, max_detections=max_detections)
  boxes, scores, classes, valid = jax.vmap(decode_one)(cls, box, ctr)
  return {"boxes": box_ops.to_normalized(boxes, _image_size(levels)), "scores": scores,
          "classes": classes, "valid": valid}


# --- COCO evaluation on the host ------------------------------------------------------------

def _coco_boxes(boxes, height, width):
  """Normalised (y0, x0, y1, x1) -> COCO pixel (x, y, w, h)."""
  boxes = np.asarray(boxes, np.float64)
  x0, y0 = boxes[:, 1] * width, boxes[:, 0] * height
  return np.stack([x0, y0, boxes[:, 3] * width - x0, boxes[:, 2] * height - y0], axis=1)


def _ignore_rows(batch, b):
  """(M,) bool: the rows of image ``b`` that are ignore regions (``box_ignore``; none if absent)."""
  if "box_ignore" not in batch:
    return np.zeros(np.shape(batch["box_classes"][b]), bool)
  return np.asarray(batch["box_ignore"][b]) > 0


def _labelled_images(batch):
  """Indices of the batch's real, labelled images and their (height, width) in pixels."""
  size = len(batch["boxes"])
  height, width = np.asarray(batch["image"]).shape[1:3] if "image" in batch else (1, 1)
  keep = np.ones(size, bool)
  for key in ("mask", "detection_mask"):
    if key in batch:
      keep &= np.asarray(batch[key]).reshape(size) > 0
  return np.flatnonzero(keep), int(height), int(width)


def coco_update(state, predictions, batch):
  """Adds one host batch: ground truth and detections of its real, labelled images; the ignore
  regions (``box_ignore``) as COCO crowd annotations (``iscrowd`` 1: a detection matched to one
  is neither a true nor a false positive, cocoapi's ``COCOeval.evaluateImg``)."""
  images, annotations, detections = state
  indices, height, width = _labelled_images(batch)
  for b in indices:
    image_id = len(images) + 1
    images.append({"id": image_id, "height": int(height), "width": int(width)})
    real = np.asarray(batch["box_classes"][b]) > 0
    crowd = _ignore_rows(batch, b)[real]
    for xywh, c, ignore in zip(_coco_boxes(batch["boxes"][b][real], height, width),
                               np.asarray(batch["box_classes"][b])[real], crowd, strict=True):
      annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                          "category_id": int(c), "bbox": [float(v) for v in xywh],
                          "area": float(xywh[2] * xywh[3]), "iscrowd": int(ignore)})
    valid = np.asarray(predictions["valid"][b], bool)
    for xywh, s, c in zip(_coco_boxes(predictions["boxes"][b][valid], height, width),
                          np.asarray(predictions["scores"][b])[valid],
                          np.asarray(predictions["classes"][b])[valid], strict=True):
      detections.append({"image_id": image_id, "category_id": int(c),
                         "bbox": [float(v) for v in xywh], "score": float(s)})
  return state


def coco_library():
  """The ``faster_coco_eval`` module, or an ImportError naming it and the extra that installs it
  (the evaluator's ``check``: ``setup.build`` calls it before anything is compiled)."""
  try:
    import faster_coco_eval
  except ImportError as e:
    raise ImportError(
        "the detection task's COCO metrics (AP, AP50, AP75, AR) need the package "
        "faster-coco-eval, which is not installed: pip install -e \".[detection]\" in a "
        "checkout of mtjax (or pip install 'mtjax[detection]')") from e
  return faster_coco_eval


def coco_result(state, num_classes: int) -> dict[str, float]:
  """COCO AP (IoU .50:.95), AP50, AP75 and AR (100 detections) by ``faster-coco-eval``.

  No ground-truth object in the split: NaN. No detection: 0.
  """
  coco = coco_library()
  images, annotations, detections = state
  names = ("ap", "ap50", "ap75", "ar")
  if not annotations:
    return dict.fromkeys(names, float("nan"))
  if not detections:
    return dict.fromkeys(names, 0.0)
  gt = coco.COCO()
  gt.dataset = {"images": images, "annotations": annotations,
                "categories": [{"id": c} for c in range(1, num_classes + 1)]}
  gt.createIndex()
  evaluation = coco.COCOeval_faster(gt, gt.loadRes(detections), "bbox",
                                    print_function=lambda *a: None)
  evaluation.evaluate()
  evaluation.accumulate()
  evaluation.summarize()
  stats = evaluation.stats
  return {"ap": float(stats[0]), "ap50": float(stats[1]), "ap75": float(stats[2]),
          "ar": float(stats[8])}


# --- PASCAL VOC evaluation on the host -------------------------------------------------------

def _pixel_boxes(boxes, height, width):
  """Normalised (y0, x0, y1, x1) -> pixel (x0, y0, x1, y1), float64."""
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  return np.stack([boxes[:, 1] * width, boxes[:, 0] * height, boxes[:, 3] * width,
                   boxes[:, 2] * height], axis=1)


def voc_update(state, predictions, batch):
  """Adds one host batch: per real, labelled image, its ground truth (pixel boxes, classes, the
  ``difficult`` flags from ``box_ignore``) and its detections (boxes, scores, classes)."""
  indices, height, width = _labelled_images(batch)
  for b in indices:
    real = np.asarray(batch["box_classes"][b]) > 0
    valid = np.asarray(predictions["valid"][b], bool)
    state.append({
        "boxes": _pixel_boxes(batch["boxes"][b], height, width)[real],
        "classes": np.asarray(batch["box_classes"][b])[real],
        "difficult": _ignore_rows(batch, b)[real],
        "det_boxes": _pixel_boxes(predictions["boxes"][b], height, width)[valid],
        "det_scores": np.asarray(predictions["scores"][b], np.float64)[valid],
        "det_classes": np.asarray(predictions["classes"][b])[valid],
    })
  return state


def voc_ap(recall, precision, use_07_metric: bool = False) -> float:
  """AP from a precision/recall curve as the PASCAL VOC devkit computes it (``VOCevaldet.m``;
  its Python port ``voc_ap`` of py-faster-rcnn and detectron2). VOC2007: the mean of the
  highest precision at recall ≥ t for the 11 t = 0, 0.1, …, 1 (``np.arange(0, 1.1, 0.1)``, as
  the port); VOC2010 and later: the area under the precision envelope (all points)."""
  recall, precision = np.asarray(recall, np.float64), np.asarray(precision, np.float64)
  if use_07_metric:
    return float(sum(np.max(precision[recall >= t], initial=0.0)
                     for t in np.arange(0.0, 1.1, 0.1)) / 11.0)
  mrec = np.concatenate(([0.0], recall, [1.0]))
  mpre = np.concatenate(([0.0], precision, [0.0]))
  mpre = np.maximum.accumulate(mpre[::-1])[::-1]                 # the precision envelope
  change = np.flatnonzero(mrec[1:] != mrec[:-1])
  return float(np.sum((mrec[change + 1] - mrec[change]) * mpre[change + 1]))


def voc_class_curve(images, klass: int, iou_threshold: float = 0.5):
  """Recall and precision of class ``klass`` over ``images`` (:func:`voc_update`'s records) by
  the devkit's rules: detections in decreasing score (a stable sort over all images); each is
  matched to the ground truth of its class in its image with the highest IoU; IoU >
  ``iou_threshold`` with a ``difficult`` object: ignored (neither true nor false positive);
  with an object not matched yet: true positive; already matched, or IoU ≤ the threshold:
  false positive. Only the objects that are not difficult count for recall. IoU of continuous
  pixel boxes (the devkit adds 1 to widths and heights of its integer pixel boxes). Returns
  ``(recall, precision, npos)``."""
  gts, dets = [], []
  for n, image in enumerate(images):
    mine = image["classes"] == klass
    gts.append((image["boxes"][mine], image["difficult"][mine]))
    d = image["det_classes"] == klass
    dets.extend((score, n, box) for score, box in zip(image["det_scores"][d],
                                                      image["det_boxes"][d], strict=True))
  npos = int(sum(np.count_nonzero(~difficult) for _, difficult in gts))
  order = np.argsort([-score for score, _, _ in dets], kind="stable")
  matched = [np.zeros(len(boxes), bool) for boxes, _ in gts]
  tp, fp = np.zeros(len(dets)), np.zeros(len(dets))
  for rank, d in enumerate(order):
    _, n, box = dets[d]
    boxes, difficult = gts[n]
    best = -np.inf
    if len(boxes):
      lo = np.maximum(boxes[:, :2], box[:2])
      hi = np.minimum(boxes[:, 2:], box[2:])
      inter = np.prod(np.clip(hi - lo, 0.0, None), axis=1)
      union = (np.prod(box[2:] - box[:2]) + np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
               - inter)
      overlaps = inter / union
      j = int(np.argmax(overlaps))
      best = overlaps[j]
    if best > iou_threshold:
      if not difficult[j]:
        if matched[n][j]:
          fp[rank] = 1.0
        else:
          tp[rank], matched[n][j] = 1.0, True
    else:
      fp[rank] = 1.0
  tp, fp = np.cumsum(tp), np.cumsum(fp)
  recall = tp / max(npos, 1)
  precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
  return recall, precision, npos


def voc_result(state, num_classes: int, iou_threshold: float = 0.5) -> dict[str, float]:
  """PASCAL VOC mAP at IoU 0.5: ``voc_map`` (VOC2010+ all-point AP, the VOC2012 metric) and
  ``voc07_map`` (VOC2007 11-point AP), each the mean over the classes with at least one object
  that is not difficult in the split (the devkit evaluates every class; a class absent from a
  small split would be NaN there). No such object: NaN."""
  aps, aps07 = [], []
  for klass in range(1, num_classes + 1):
    recall, precision, npos = voc_class_curve(state, klass, iou_threshold)
    if npos:
      aps.append(voc_ap(recall, precision))
      aps07.append(voc_ap(recall, precision, use_07_metric=True))
  if not aps:
    return {"voc_map": float("nan"), "voc07_map": float("nan")}
  return {"voc_map": float(np.mean(aps)), "voc07_map": float(np.mean(aps07))}


EVALUATIONS = ("coco", "voc")


def evaluator(num_classes: int, evaluation: str = "coco") -> Evaluator:
  """The split's metrics, fed with :func:`predict_fn`'s output and the host batches:
  ``"coco"``: COCO AP, AP50, AP75, AR (faster-coco-eval; ignore regions as crowds);
  ``"voc"``: PASCAL VOC mAP@0.5, all-point and 11-point (ignore regions as ``difficult``)."""
  if evaluation == "voc":
    return Evaluator(init=list, update=voc_update,
                     result=functools.partial(voc_result, num_classes=num_classes))
  if evaluation != "coco":
    raise ValueError(f"task 'detection': evaluation: expected one of {EVALUATIONS}, got "
                     f"{evaluation!r}")
  return Evaluator(init=lambda: ([], [], []), update=coco_update,
                   result=functools.partial(coco_result, num_classes=num_classes),
                   check=coco_library)


def hflip(labels, **_):
  """Boxes mirrored left-right (``x -> 1 - x``, the corners swapped); padding rows (class 0)
  kept."""
  boxes = labels["boxes"]
  real = labels["box_classes"][:, None] > 0 if "box_classes" in labels else True
  mirrored = np.stack([boxes[:, 0], 1.0 - boxes[:, 3], boxes[:, 2], 1.0 - boxes[:, 1]], -1)
  return {"boxes": np.where(real, mirrored, boxes).astype(boxes.dtype)}


def scale_crop(labels, *, crop, size, **_):
  """Boxes under a crop ``(i, j, h, w)`` of an image of ``size`` resized back to ``size``:
  moved and clipped to the crop; a box left empty becomes padding (class 0, zeros)."""
  (height, width), (i, j, h, w) = size, crop
  boxes = labels["boxes"].astype(np.float64)
  scale = np.array([height / h, width / w] * 2)
  shift = np.array([i / height, j / width] * 2)
  moved = np.clip((boxes - shift) * scale, 0.0, 1.0)
  keep = (moved[:, 2] > moved[:, 0]) & (moved[:, 3] > moved[:, 1])
  out = {}
  if "box_classes" in labels:
    keep &= labels["box_classes"] > 0
    out["box_classes"] = np.where(keep, labels["box_classes"], 0).astype(
        labels["box_classes"].dtype)
  out["boxes"] = np.where(keep[:, None], moved, 0.0).astype(labels["boxes"].dtype)
  return out


def draw(ax, target, prediction, *, image_size, offsets, class_names, num_classes: int):
  """One example's boxes on the prediction grid: the ground truth (``boxes``,
  ``box_classes``) on the cell at ``offsets[0]``, the detections scoring at least 0.3 with
  class and score on ``offsets[1]`` (:func:`mtjax.tasks.detection_plot.draw_boxes`);
  ``class_names``: the dataset's (:func:`~mtjax.tasks.detection_plot.class_names_of`)."""
  from mtjax.tasks import detection_plot
  names = detection_plot.class_names_of(class_names, num_classes)
  detection_plot.draw_boxes(ax, target["boxes"], target["box_classes"], image_size,
                            class_names=names, offset=offsets[0])
  detection_plot.draw_boxes(ax, prediction["boxes"], prediction["classes"], image_size,
                            scores=prediction["scores"], valid=prediction["valid"],
                            class_names=names, offset=offsets[1])


def task(num_classes: int | None = None, max_boxes: int | None = None,
         center_sampling: float = CENTER_SAMPLING, ignore_regions: bool = False,
         evaluation: str = "coco") -> Task:
  """``num_classes``: object classes (no background); ``max_boxes``: rows of the box labels;
  ``ignore_regions``: the dataset labels ignore regions (a ``box_ignore`` (M,) label: COCO's
  ``iscrowd``, Cityscapes' group instances, VOC's ``difficult``); ``evaluation``: ``"coco"`` or
  ``"voc"`` (:func:`evaluator`). All from the dataset's per-task info."""
  def label_spec(size):
    del size
    if not isinstance(max_boxes, (int, np.integer)) or max_boxes < 1:
      raise ValueError(f"task 'detection': max_boxes: expected a positive int (from the "
                       f"dataset's per-task info), got {max_boxes!r}")
    spec = {"boxes": ((int(max_boxes), 4), jnp.float32),
            "box_classes": ((int(max_boxes),), jnp.int32)}
    if ignore_regions:
      spec["box_ignore"] = ((int(max_boxes),), jnp.int32)
    return spec

  classes = needs_classes("detection", num_classes)
  metrics = evaluator(classes, evaluation)   # an unknown evaluation fails here, when built
  higher = ({"voc_map": True, "voc07_map": True} if evaluation == "voc"
            else {"ap": True, "ap50": True})
  return Task(
      name="detection",
      head=lambda **kw: FCOSHead(classes, **kw),
      loss_fn=functools.partial(loss_fn, center_sampling=center_sampling),
      metrics_fn=functools.partial(metrics_fn, center_sampling=center_sampling),
      predict_fn=predict_fn,
      label_spec=label_spec,
      higher_is_better=higher,
      evaluator=metrics,
      augment={"hflip": hflip, "scale_crop": scale_crop},
      draw=functools.partial(draw, num_classes=classes),
  )
