"""Augmentations that keep every label consistent with the image, on one example in numpy.

Each is ``fn(example, rng, tasks=()) -> example``: the example is a dict in mtjax's batch
conventions (``mtjax.data.sources``), ``rng`` a ``np.random.Generator`` (the pipeline draws it
from ``(seed, epoch, index)``), ``tasks`` the :class:`~mtjax.tasks.base.Task` values whose labels
the example carries. Dense keys are those shaped (H, W, ...) like the image: ``image`` and the
tasks' ``bilinear_keys`` are resampled bilinearly, everything else (class ids, instance ids,
depth, validity masks) by nearest neighbour, so that no label takes a value it never had. What
else a label needs (the x of a normal negated, depth divided by the scale, boxes mirrored or
cropped) is its task's ``augment[name](labels, **params)``.

  * :func:`hflip` (probability 1/2): mirrors every dense key.
  * :func:`scale_crop`: the random scale-crop of MTAN's / LibMTL's NYUv2 protocol (credited
    there to Jialong Wu, lorenmt/mtan#34): a scale ``s`` from (1.0, 1.2, 1.5), a random crop of
    ``(int(H / s), int(W / s))`` resized back to (H, W) (bilinear with ``align_corners=True``,
    nearest as ``F.interpolate(mode="nearest")``); the tasks receive ``scale``, ``crop`` and
    ``size``.

:data:`AUGMENTATIONS` is the registry ``config.dataset.augment`` names, applied in its order
(LibMTL: ``("scale_crop", "hflip")``).
"""

import numpy as np

from mtjax.tasks.base import label_keys

SCALES = (1.0, 1.2, 1.5)   # LibMTL examples/nyu/create_dataset.py RandomScaleCrop


def _dense_keys(example):
  hw = example["image"].shape[:2]
  return [k for k, v in example.items() if np.ndim(v) >= 2 and np.shape(v)[:2] == hw]


def _by_tasks(name: str, out: dict, tasks, **params) -> dict:
  """``out`` with each task's ``augment[name]`` applied to its labels present in ``out``."""
  for task in tasks:
    fn = (task.augment or {}).get(name)
    keys = [k for k in label_keys(task) if k in out]
    if fn is not None and keys:
      out.update(fn({k: out[k] for k in keys}, **params))
  return out


def hflip(example: dict, rng: np.random.Generator, probability: float = 0.5,
          tasks=()) -> dict:
  """Mirrors the example left-right with ``probability``; then each task's ``hflip``."""
  if not rng.random() < probability:
    return example
  out = dict(example)
  for k in _dense_keys(example):
    out[k] = example[k][:, ::-1]      # a view: the batch's stacking copies it once
  return _by_tasks("hflip", out, tasks)


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


def scale_crop(example: dict, rng: np.random.Generator, scales=SCALES, tasks=()) -> dict:
  """The MTAN/LibMTL random scale-crop; then each task's ``scale_crop``."""
  height, width = example["image"].shape[:2]
  s = scales[int(rng.integers(len(scales)))]
  h, w = int(height / s), int(width / s)
  i = int(rng.integers(0, height - h + 1))
  j = int(rng.integers(0, width - w + 1))
  bilinear = {"image", *(k for task in tasks for k in task.bilinear_keys)}
  out = dict(example)
  for k in _dense_keys(example):
    crop = example[k][i:i + h, j:j + w]
    resize = resize_bilinear if k in bilinear else resize_nearest
    out[k] = resize(crop, (height, width))
  return _by_tasks("scale_crop", out, tasks, scale=s, crop=(i, j, h, w), size=(height, width))


AUGMENTATIONS = {"hflip": hflip, "scale_crop": scale_crop}


def compose(names, tasks) -> object:
  """One ``fn(example, rng)`` applying ``names`` in order, with the labels of ``tasks`` (their
  ``augment`` rules: normals' x negated under a flip, depth divided by the scale, boxes moved;
  required, so that no caller silently leaves them out; ``()`` moves the maps only); None for
  no augmentation."""
  names, tasks = tuple(names), tuple(tasks)
  unknown = [n for n in names if n not in AUGMENTATIONS]
  if unknown:
    raise ValueError(f"augment: unknown {unknown}; allowed: names from {sorted(AUGMENTATIONS)}, "
                     "applied in order (LibMTL's NYUv2: ('scale_crop', 'hflip'))")
  if not names:
    return None

  def transform(example, rng):
    for name in names:
      example = AUGMENTATIONS[name](example, rng, tasks=tasks)
    return example
  return transform
