"""Box operations for detection, in JAX: conversions, FCOS distance encoding, IoU/GIoU, NMS.

Boxes inside the detection task are pixel ``(x0, y0, x1, y1)``; the datasets store normalised
``(y0, x0, y1, x1)`` in [0, 1] (``mtjax.data.shapes``), converted by :func:`from_normalized` /
:func:`to_normalized`. Everything here is jittable, with fixed shapes.
"""

import jax
import jax.numpy as jnp

_EPS = 1e-7


def from_normalized(boxes, image_size):
  """Normalised ``(y0, x0, y1, x1)`` -> pixel ``(x0, y0, x1, y1)`` for an image (H, W)."""
  h, w = image_size
  y0, x0, y1, x1 = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([x0 * w, y0 * h, x1 * w, y1 * h], axis=-1)


def to_normalized(boxes, image_size):
  """Pixel ``(x0, y0, x1, y1)`` -> normalised ``(y0, x0, y1, x1)``, clipped to the image."""
  h, w = image_size
  x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
  out = jnp.stack([y0 / h, x0 / w, y1 / h, x1 / w], axis=-1)
  return jnp.clip(out, 0.0, 1.0)


def encode(points, boxes):
  """FCOS's regression target (Tian et al., 2019, eq. 1): distances ``(l, t, r, b)`` from the
  points ``(..., 2)`` (x, y) to the sides of the boxes ``(..., 4)``."""
  x, y = points[..., 0], points[..., 1]
  return jnp.stack([x - boxes[..., 0], y - boxes[..., 1], boxes[..., 2] - x, boxes[..., 3] - y],
                   axis=-1)


def decode(points, distances):
  """The inverse of :func:`encode`: boxes ``(x0, y0, x1, y1)`` from points and ``(l, t, r, b)``."""
  x, y = points[..., 0], points[..., 1]
  left, top, right, bottom = jnp.moveaxis(distances, -1, 0)
  return jnp.stack([x - left, y - top, x + right, y + bottom], axis=-1)


def area(boxes):
  return jnp.clip(boxes[..., 2] - boxes[..., 0], 0) * jnp.clip(boxes[..., 3] - boxes[..., 1], 0)


def centerness(distances):
  """FCOS's centerness target (eq. 3): ``sqrt(min(l,r)/max(l,r) · min(t,b)/max(t,b))``."""
  left, top, right, bottom = jnp.moveaxis(jnp.clip(distances, 0), -1, 0)
  lr = jnp.minimum(left, right) / jnp.maximum(jnp.maximum(left, right), _EPS)
  tb = jnp.minimum(top, bottom) / jnp.maximum(jnp.maximum(top, bottom), _EPS)
  return jnp.sqrt(lr * tb)


def iou(a, b):
  """Element-wise IoU of boxes ``a`` and ``b`` (broadcasting)."""
  lo = jnp.maximum(a[..., :2], b[..., :2])
  hi = jnp.minimum(a[..., 2:], b[..., 2:])
  inter = jnp.prod(jnp.clip(hi - lo, 0), axis=-1)
  return inter / jnp.maximum(area(a) + area(b) - inter, _EPS)


def pairwise_iou(a, b):
  """``(N, M)`` IoU of every box of ``a`` (N, 4) with every box of ``b`` (M, 4)."""
  return iou(a[:, None, :], b[None, :, :])


def giou(a, b):
  """Generalised IoU (Rezatofighi et al., 2019, Alg. 1), element-wise: IoU − |C \\ (A∪B)| / |C|."""
  lo = jnp.maximum(a[..., :2], b[..., :2])
  hi = jnp.minimum(a[..., 2:], b[..., 2:])
  inter = jnp.prod(jnp.clip(hi - lo, 0), axis=-1)
  union = area(a) + area(b) - inter
  hull = jnp.prod(jnp.maximum(a[..., 2:], b[..., 2:]) - jnp.minimum(a[..., :2], b[..., :2]),
                  axis=-1)
  return inter / jnp.maximum(union, _EPS) - (hull - union) / jnp.maximum(hull, _EPS)


def nms(boxes, scores, classes, valid, iou_threshold: float):
  """Class-aware greedy non-maximum suppression of one image, jittable: a keep mask ``(K,)``.

  Boxes are visited by decreasing score; a box is kept if it is valid and no kept box of the
  same class overlaps it with IoU > ``iou_threshold`` (torchvision's ``batched_nms``; FCOS's
  ``boxlist_ml_nms``). Each kept box suppresses the later boxes it overlaps: a
  ``lax.while_loop`` over the sorted valid candidates, O(K) memory (no K × K matrix); batch it
  with ``vmap``.
  """
  num = scores.shape[0]
  order = jnp.argsort(-jnp.where(valid, scores, -jnp.inf))
  b, c, v = boxes[order], classes[order], valid[order]
  later = jnp.arange(num)

  def visit(carry):
    i, keep, suppressed = carry
    kept = v[i] & ~suppressed[i]
    overlaps = (iou(b[i], b) > iou_threshold) & (c == c[i]) & (later > i)
    return i + 1, keep.at[i].set(kept), suppressed | (kept & overlaps)

  def more(carry):
    i = carry[0]
    return (i < num) & v[jnp.minimum(i, num - 1)]

  init = (jnp.zeros((), jnp.int32), jnp.zeros((num,), bool), jnp.zeros((num,), bool))
  _, keep_sorted, _ = jax.lax.while_loop(more, visit, init)
  return jnp.zeros((num,), bool).at[order].set(keep_sorted)
