"""Drawing detections: boxes with class and score, and a detection + segmentation panel.

Host-side matplotlib helpers (imported only when plotting). ``draw_boxes`` draws on any axes;
``detection_panel`` fills one row of axes with the image, the ground truth (boxes and the
segmentation over the image) and the prediction, for the evaluation PNG.
"""

import numpy as np

_COLORS = ("#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#a65628", "#f781bf")


def class_names_of(dataset_names, num_classes: int):
  """``names`` with ``names[c]`` the name of detection class ``c`` in 1..``num_classes``, from
  a dataset's class names: those with the background first (``shapes``: C + 1 names), or
  without it (VOC: C names); None (draw the class ids) when neither fits (Cityscapes' thing
  classes are a subset of its names)."""
  names = tuple(dataset_names or ())
  if len(names) == num_classes + 1:
    return names
  if len(names) == num_classes:
    return ("background", *names)
  return None


def draw_boxes(ax, boxes, classes, image_size, *, scores=None, valid=None, class_names=None,
               min_score: float = 0.3, offset=(0.0, 0.0)) -> int:
  """Draws normalised ``(y0, x0, y1, x1)`` ``boxes`` on ``ax``, labelled ``class [score]``;
  returns how many were drawn.

  ``classes`` in 1..C (0: padding, skipped); ``valid`` (optional) masks rows; detections with
  a score below ``min_score`` are not drawn. ``offset``: the (y, x) pixel position of the
  image on ``ax`` (a cell of a grid).
  """
  from matplotlib.patches import Rectangle

  height, width = image_size
  oy, ox = offset
  boxes, classes = np.asarray(boxes), np.asarray(classes)
  keep = classes > 0
  if valid is not None:
    keep &= np.asarray(valid, bool)
  if scores is not None:
    keep &= np.asarray(scores) >= min_score
  for i in np.flatnonzero(keep):
    y0, x0, y1, x1 = boxes[i] * np.array([height, width, height, width]) + [oy, ox, oy, ox]
    color = _COLORS[int(classes[i]) % len(_COLORS)]
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                           edgecolor=color, linewidth=1.2))
    c = int(classes[i])
    name = class_names[c] if class_names is not None and c < len(class_names) else str(c)
    label = name if scores is None else f"{name} {float(scores[i]):.2f}"
    ax.text(x0 - 0.5, y0 - 1.0, label, color="white", fontsize=6,
            bbox={"facecolor": color, "alpha": 0.8, "pad": 0.5, "linewidth": 0})
  return int(np.count_nonzero(keep))


def _overlay(ax, image, segmentation, num_classes):
  import matplotlib.pyplot as plt

  ax.imshow(image)
  if segmentation is not None:
    ax.imshow(np.ma.masked_equal(np.asarray(segmentation), 0), cmap=plt.get_cmap("tab10"),
              vmin=0, vmax=max(num_classes, 10) - 1, alpha=0.45, interpolation="nearest")
  ax.set_xticks([])
  ax.set_yticks([])


def detection_panel(axes, image, *, truth, prediction, class_names, seg_truth=None,
                    seg_prediction=None):
  """Two axes: ground truth (boxes, segmentation over the image) and prediction.

  ``truth``: ``{"boxes", "box_classes"}`` of one image; ``prediction``: ``{"boxes",
  "classes", "scores", "valid"}`` of one image (the detection task's ``predict_fn``).
  """
  size = np.asarray(image).shape[:2]
  gt_ax, pred_ax = axes
  _overlay(gt_ax, image, seg_truth, len(class_names))
  draw_boxes(gt_ax, truth["boxes"], truth["box_classes"], size, class_names=class_names)
  gt_ax.set_title("ground truth", fontsize=8)
  _overlay(pred_ax, image, seg_prediction, len(class_names))
  draw_boxes(pred_ax, prediction["boxes"], prediction["classes"], size,
             scores=prediction["scores"], valid=prediction["valid"], class_names=class_names)
  pred_ax.set_title("prediction", fontsize=8)
