"""Augmentations that keep every label consistent with the image, on one example in numpy.

Each is ``fn(example, rng) -> example``: the example is a dict in mtjax's batch conventions
(``mtjax.data.sources``), ``rng`` a ``np.random.Generator`` (the pipeline draws it from
``(seed, epoch, index)``). Dense keys are those shaped (H, W, ...) like the image:
``image`` and ``normals`` are resampled bilinearly, everything else (class ids, instance ids,
depth, validity masks) by nearest neighbour, so that no label takes a value it never had.

  * :func:`hflip` (probability 1/2): mirrors every dense key, negates the x component of the
    normals (camera x points right) and mirrors the boxes.
  * :func:`scale_crop`: the random scale-crop of MTAN's / LibMTL's NYUv2 protocol (credited
    there to Jialong Wu, lorenmt/mtan#34): a scale ``s`` from (1.0, 1.2, 1.5), a random crop of
    ``(int(H / s), int(W / s))`` resized back to (H, W) (image and normals bilinear with
    ``align_corners=True``, labels and depth nearest as ``F.interpolate(mode="nearest")``), and
    depth divided by ``s`` (the scene seen ``s`` times closer). Boxes are cropped and clipped;
    a box that leaves the crop becomes padding.

:data:`AUGMENTATIONS` is the registry ``config.dataset.augment`` names, applied in its order
(LibMTL: ``("scale_crop", "hflip")``).
"""

import numpy as np

BILINEAR_KEYS = ("image", "normals")
SCALES = (1.0, 1.2, 1.5)   # LibMTL examples/nyu/create_dataset.py RandomScaleCrop


def _dense_keys(example):
  hw = example["image"].shape[:2]
  return [k for k, v in example.items() if np.ndim(v) >= 2 and np.shape(v)[:2] == hw]


def hflip(example: dict, rng: np.random.Generator, probability: float = 0.5) -> dict:
  """Mirrors the example left-right with ``probability``; normals' x negated, boxes mirrored."""
  if not rng.random() < probability:
    return example
  out = dict(example)
  for k in _dense_keys(example):
    out[k] = example[k][:, ::-1]      # a view: the batch's stacking copies it once
  if "normals" in out:
    out["normals"] = out["normals"] * np.array([-1.0, 1.0, 1.0], out["normals"].dtype)
  if "boxes" in out:
    boxes = example["boxes"]
    real = example["box_classes"][:, None] > 0 if "box_classes" in example else True
    mirrored = np.stack([boxes[:, 0], 1.0 - boxes[:, 3], boxes[:, 2], 1.0 - boxes[:, 1]], -1)
    out["boxes"] = np.where(real, mirrored, boxes).astype(boxes.dtype)
  return out


def _nearest_index(out_size: int, in_size: int) -> np.ndarray:
  """torch ``F.interpolate(mode="nearest")``: source ``floor(i * in / out)``."""
  return np.minimum(np.floor(np.arange(out_size) * (in_size / out_size)).astype(np.int64),
                    in_size - 1)


def _bilinear_weights(out_size: int, in_size: int):
  """``align_corners=True``: source ``i (in - 1) / (out - 1)``; (lo, hi, frac)."""
  if out_size == 1:
    pos = np.zeros(1)
  else:
    pos = np.arange(out_size) * ((in_size - 1) / (out_size - 1))
  lo = np.floor(pos).astype(np.int64)
  hi = np.minimum(lo + 1, in_size - 1)
  return lo, hi, (pos - lo).astype(np.float32)


def resize_bilinear(x: np.ndarray, size) -> np.ndarray:
  """(h, w, ...) float -> ``size`` + (...), bilinear with aligned corners."""
  (y0, y1, fy), (x0, x1, fx) = (_bilinear_weights(o, i) for o, i in zip(size, x.shape[:2],
                                                                         strict=True))
  extra = (1,) * (x.ndim - 2)
  fy, fx = fy.reshape(-1, 1, *extra), fx.reshape(1, -1, *extra)
  rows = x[y0] + (x[y1] - x[y0]) * fy           # separable: rows, then columns
  return (rows[:, x0] + (rows[:, x1] - rows[:, x0]) * fx).astype(x.dtype)


def resize_nearest(x: np.ndarray, size) -> np.ndarray:
  return x[_nearest_index(size[0], x.shape[0])][:, _nearest_index(size[1], x.shape[1])]


def scale_crop(example: dict, rng: np.random.Generator, scales=SCALES) -> dict:
  """The MTAN/LibMTL random scale-crop; depth divided by the scale, boxes cropped."""
  height, width = example["image"].shape[:2]
  s = scales[int(rng.integers(len(scales)))]
  h, w = int(height / s), int(width / s)
  i = int(rng.integers(0, height - h + 1))
  j = int(rng.integers(0, width - w + 1))
  out = dict(example)
  for k in _dense_keys(example):
    crop = example[k][i:i + h, j:j + w]
    resize = resize_bilinear if k in BILINEAR_KEYS else resize_nearest
    out[k] = resize(crop, (height, width))
  if "depth" in out:
    out["depth"] = (out["depth"] / np.float32(s)).astype(example["depth"].dtype)
  if "boxes" in out:
    boxes = example["boxes"].astype(np.float64)
    scale = np.array([height / h, width / w] * 2)
    shift = np.array([i / height, j / width] * 2)
    moved = np.clip((boxes - shift) * scale, 0.0, 1.0)
    keep = (moved[:, 2] > moved[:, 0]) & (moved[:, 3] > moved[:, 1])
    if "box_classes" in example:
      keep &= example["box_classes"] > 0
      out["box_classes"] = np.where(keep, example["box_classes"], 0).astype(
          example["box_classes"].dtype)
    out["boxes"] = np.where(keep[:, None], moved, 0.0).astype(example["boxes"].dtype)
  return out


AUGMENTATIONS = {"hflip": hflip, "scale_crop": scale_crop}


def compose(names) -> object:
  """One ``fn(example, rng)`` applying ``names`` in order; None for no augmentation."""
  names = tuple(names)
  unknown = [n for n in names if n not in AUGMENTATIONS]
  if unknown:
    raise ValueError(f"augment: unknown {unknown}; allowed: names from {sorted(AUGMENTATIONS)}, "
                     "applied in order (LibMTL's NYUv2: ('scale_crop', 'hflip'))")
  if not names:
    return None

  def transform(example, rng):
    for name in names:
      example = AUGMENTATIONS[name](example, rng)
    return example
  return transform
