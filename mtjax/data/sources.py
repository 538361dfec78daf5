"""Random-access sources over datasets on disk, read lazily one example at a time.

A :class:`Source` is ``(size, read)``: ``read(i)`` returns example ``i`` as a dict of numpy
arrays in mtjax's batch conventions, whatever the files store:

  * ``image`` float32 (H, W, 3); ``segmentation`` int32 (H, W), ``IGNORE_LABEL`` (255) where
    unlabelled; ``depth`` float32 (H, W) with ``depth_valid`` bool (H, W); ``normals`` float32
    (H, W, 3) with ``normals_valid`` bool (H, W); ``boxes`` float32 (K, 4) (y0, x0, y1, x1) in
    [0, 1] with ``box_classes`` int32 (K,) (0 = padding).

Nothing is read until ``read`` is called, so memory does not grow with the split. A missing
folder raises :class:`FileNotFoundError` naming it and the layout expected there; nothing is
ever downloaded.
"""

import glob
import json
import os
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

IGNORE_LABEL = 255   # mtjax.tasks.segmentation.IGNORE_LABEL
_READ_CHUNK = 256    # examples per bulk read


class Source(NamedTuple):
  """``size`` examples; ``read(i)`` -> {key: numpy array} of example ``i``; ``read_many(keys)``
  (optional) reads several at once where the storage has a faster bulk read."""
  size: int
  read: Callable[[int], dict]
  read_many: Callable | None = None


def read_examples(source: Source, indices) -> list:
  """Examples ``indices`` of ``source``, in that order."""
  indices = [int(i) for i in indices]
  if source.read_many is not None:
    return list(source.read_many(indices))
  return [source.read(i) for i in indices]


def array_source(arrays: dict) -> Source:
  """A source over arrays in memory (stacked along axis 0)."""
  size = len(next(iter(arrays.values())))
  return Source(size, lambda i: {k: v[i] for k, v in arrays.items()})


def read_all(source: Source, num_examples=None) -> dict:
  """The first ``num_examples`` (default all) examples of ``source``, stacked along axis 0."""
  n = source.size if num_examples is None else num_examples
  out = None
  for start in range(0, n, _READ_CHUNK):
    keys = range(start, min(start + _READ_CHUNK, n))
    for i, example in zip(keys, read_examples(source, keys), strict=True):
      if out is None:
        out = {k: np.empty((n, *np.shape(v)), np.asarray(v).dtype) for k, v in example.items()}
      for k, v in example.items():
        out[k][i] = v
  return out


def _missing(path: str, layout: str):
  return FileNotFoundError(
      f"dataset folder {path!r} does not exist (or has no .npy/.png files); expected the layout "
      f"{layout}. Set config.dataset.data_dir to the folder that holds it (nothing is downloaded)")


def _numbered(folder: str, layout: str) -> int:
  """The count of ``0.npy .. N-1.npy`` in ``folder``; raises if any is missing."""
  names = glob.glob(os.path.join(folder, "*.npy")) if os.path.isdir(folder) else []
  if not names:
    raise _missing(folder, layout)
  stems = sorted(int(os.path.basename(n)[:-4]) for n in names
                 if os.path.basename(n)[:-4].isdigit())
  if stems != list(range(len(names))):
    raise ValueError(f"{folder}: expected files 0.npy .. {len(names) - 1}.npy (the MTAN/LibMTL "
                     f"layout), found {len(names)} files, not numbered 0..N-1")
  return len(names)


def _labels(label: np.ndarray, num_classes: int) -> np.ndarray:
  """Stored class ids (float, -1 unlabelled) -> int32 with ``IGNORE_LABEL`` outside [0, C)."""
  label = np.asarray(label)
  ids = np.rint(label).astype(np.int32)
  return np.where((ids >= 0) & (ids < num_classes), ids, IGNORE_LABEL).astype(np.int32)


def _depth(depth: np.ndarray):
  """(H, W, 1) or (H, W) stored depth -> float32 (H, W) and where it is valid (non-zero)."""
  depth = np.asarray(depth, np.float32)
  if depth.ndim == 3:
    depth = depth[..., 0]
  return depth, depth != 0


# --- The preprocessed layouts of MTAN (Liu et al., 2019) and LibMTL (Lin & Zhang, 2023).
# Each split folder holds one numbered .npy per example and per label:
#   image/N.npy  (H, W, 3) float, RGB in [0, 1]     label/N.npy  (H, W) float class ids, -1 none
#   depth/N.npy  (H, W, 1) float, 0 = no depth      normal/N.npy (H, W, 3) float unit, 0 = none
# as LibMTL's examples/{nyu,cityscapes}/create_dataset.py read them (np.moveaxis(-1, 0) of the
# image, depth and normals; the label as is; its SegLoss ignores -1; its depth and normal losses
# mask the pixels whose channel sum is 0). Only train/ and val/ exist: the papers report on val.
PREPROCESSED_SPLITS = {"train": "train", "validation": "val", "test": "val"}


def preprocessed_layout(label_dirs, normals: bool) -> str:
  folders = ["image", label_dirs[0], "depth"] + (["normal"] if normals else [])
  return ("<data_dir>/{train,val}/{" + ",".join(folders) + "}/N.npy (N = 0, 1, ...), as in "
          "MTAN/LibMTL's preprocessed release")


def preprocessed_source(root: str, split: str, *, num_classes: int, label_dirs=("label",),
                        normals: bool = False) -> Source:
  """NYUv2 (13 classes, normals) or Cityscapes (7/19 classes) in the MTAN/LibMTL layout.

  ``label_dirs``: the label folders to look for, first found wins (MTAN's Cityscapes release
  has ``label_7`` and ``label_19``, LibMTL's ``label``).
  """
  layout = preprocessed_layout(label_dirs, normals)
  if not os.path.isdir(root):
    raise _missing(root, layout)
  split_dir = os.path.join(root, PREPROCESSED_SPLITS[split])
  size = _numbered(os.path.join(split_dir, "image"), layout)
  label_dir = next((d for d in label_dirs if os.path.isdir(os.path.join(split_dir, d))), None)
  if label_dir is None:
    raise _missing(os.path.join(split_dir, label_dirs[0]), layout)
  folders = {"image": "image", "label": label_dir, "depth": "depth"}
  if normals:
    folders["normal"] = "normal"
  for key, folder in folders.items():
    n = _numbered(os.path.join(split_dir, folder), layout)
    if n != size:
      raise ValueError(f"{os.path.join(split_dir, folder)}: {n} files, but image/ has {size}; "
                       f"expected one file per example in each of {sorted(folders.values())}")
    del key

  def read(i):
    def load(folder):
      return np.load(os.path.join(split_dir, folder, f"{i}.npy"))
    depth, valid = _depth(load("depth"))
    out = {"image": np.asarray(load("image"), np.float32),
           "segmentation": _labels(load(label_dir), num_classes),
           "depth": depth, "depth_valid": valid}
    if normals:
      normal = np.asarray(load("normal"), np.float32)
      out["normals"] = normal
      out["normals_valid"] = normal.sum(axis=-1) != 0   # LibMTL's NormalLoss mask
    return out

  return Source(size, read)


# --- Cityscapes, the official release (Cordts et al., 2016):
#   leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
#   gtFine/<split>/<city>/<...>_gtFine_labelIds.png, <...>_gtFine_instanceIds.png
#   disparity/<split>/<city>/<...>_disparity.png, camera/<split>/<city>/<...>_camera.json
# The 19 training classes and their label ids come from cityscapesScripts' labels.py.
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
                        23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                      "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
                      "truck", "bus", "train", "motorcycle", "bicycle")
CITYSCAPES_THING_IDS = (24, 25, 26, 27, 28, 31, 32, 33)   # the classes with instances
OFFICIAL_SPLITS = {"train": "train", "validation": "val", "test": "val"}
OFFICIAL_LAYOUT = ("<data_dir>/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png, "
                   "gtFine/<split>/<city>/*_gtFine_{labelIds,instanceIds}.png, "
                   "disparity/<split>/<city>/*_disparity.png, camera/<split>/<city>/*_camera.json "
                   "(the official Cityscapes release)")
MAX_BOXES = 64


def _train_id_lut() -> np.ndarray:
  lut = np.full(256, IGNORE_LABEL, np.int32)
  for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
    lut[label_id] = train_id
  return lut


def disparity_to_depth(stored: np.ndarray, baseline: float, fx: float):
  """Cityscapes disparity PNG (uint16) -> depth in metres and its validity.

  disparity = (p - 1) / 256 for p > 0 (p = 0: none); depth = baseline fx / disparity
  (cityscapesScripts' README, "Disparity").
  """
  p = np.asarray(stored, np.float32)
  valid = p > 1
  disparity = np.where(valid, (p - 1.0) / 256.0, 1.0)
  return np.where(valid, baseline * fx / disparity, 0.0).astype(np.float32), valid


def instance_boxes(instance_ids: np.ndarray, max_boxes: int = MAX_BOXES):
  """Instance id image -> boxes (K, 4) in [0, 1], train-id + 1 classes and ignore flags (K,).

  One box per instance of a "thing" class (id ``label id * 1000 + k``), the extent of its
  pixels, in instance-id order; then one *ignore* box (flag 1) per thing class with group
  pixels (id = the label id alone: a crowd the annotators did not separate, which Cityscapes'
  instance evaluation ignores), the extent of that class's group pixels; zero rows after
  (class 0 = padding). More than ``max_boxes`` boxes raise a ValueError naming the count.
  """
  height, width = instance_ids.shape
  present = np.unique(instance_ids)
  ids = [int(i) for i in present if i >= 1000 and i // 1000 in CITYSCAPES_THING_IDS]
  groups = [int(i) for i in present if i in CITYSCAPES_THING_IDS]
  if len(ids) + len(groups) > max_boxes:
    raise ValueError(f"cityscapes: an image has {len(ids)} thing instances and {len(groups)} "
                     f"group regions, more than max_boxes={max_boxes} rows "
                     f"(mtjax.data.sources.MAX_BOXES, the detection task's max_boxes)")
  boxes = np.zeros((max_boxes, 4), np.float32)
  classes = np.zeros((max_boxes,), np.int32)
  ignore = np.zeros((max_boxes,), np.int32)
  for row, inst in enumerate(ids + groups):
    rows, cols = np.nonzero(instance_ids == inst)
    boxes[row] = (rows.min() / height, cols.min() / width, (rows.max() + 1) / height,
                  (cols.max() + 1) / width)
    classes[row] = CITYSCAPES_TRAIN_IDS[inst // 1000 if inst >= 1000 else inst] + 1
    ignore[row] = int(inst < 1000)
  return boxes, classes, ignore


def _read_png(path):
  from PIL import Image
  with Image.open(path) as im:
    return np.asarray(im)


def _resize(array, size, nearest: bool):
  """(H, W[, C]) -> ``size``; nearest for labels, bilinear for images."""
  from PIL import Image
  if array.shape[:2] == tuple(size):
    return array
  h, w = size
  resample = Image.NEAREST if nearest else Image.BILINEAR
  if array.ndim == 3:
    return np.stack([_resize(array[..., c], size, nearest) for c in range(array.shape[-1])], -1)
  return np.asarray(Image.fromarray(array).resize((w, h), resample=resample))


def cityscapes_official_source(root: str, split: str, *, image_size=None) -> Source:
  """The official Cityscapes layout; images and labels resized to ``image_size`` if given.

  Labels: 19 train ids (255 elsewhere), depth from disparity with each image's camera
  baseline and fx (0 and invalid where no disparity), boxes of the instances of the 8 thing
  classes. Resizing keeps the labels exact (nearest) and the boxes (relative coordinates).
  """
  image_root = os.path.join(root, "leftImg8bit", OFFICIAL_SPLITS[split])
  images = sorted(glob.glob(os.path.join(image_root, "*", "*_leftImg8bit.png")))
  if not images:
    raise _missing(image_root, OFFICIAL_LAYOUT)
  lut = _train_id_lut()

  def sibling(path, folder, suffix):
    city, name = path.split(os.sep)[-2:]
    stem = name[:-len("_leftImg8bit.png")]
    out = os.path.join(root, folder, OFFICIAL_SPLITS[split], city, stem + suffix)
    if not os.path.exists(out):
      raise _missing(out, OFFICIAL_LAYOUT)
    return out

  def read(i):
    path = images[i]
    image = _read_png(path)[..., :3]
    labels = lut[_read_png(sibling(path, "gtFine", "_gtFine_labelIds.png"))]
    instances = _read_png(sibling(path, "gtFine", "_gtFine_instanceIds.png")).astype(np.int32)
    with open(sibling(path, "camera", "_camera.json")) as f:
      camera = json.load(f)
    depth, valid = disparity_to_depth(_read_png(sibling(path, "disparity", "_disparity.png")),
                                      camera["extrinsic"]["baseline"],
                                      camera["intrinsic"]["fx"])
    boxes, box_classes, box_ignore = instance_boxes(instances)
    if image_size is not None:
      image = _resize(image, image_size, nearest=False)
      labels = _resize(labels.astype(np.uint8), image_size, nearest=True).astype(np.int32)
      depth = _resize(depth, image_size, nearest=True)
      valid = depth > 0
    return {"image": image.astype(np.float32) / np.float32(255.0), "segmentation": labels,
            "depth": depth, "depth_valid": valid, "boxes": boxes, "box_classes": box_classes,
            "box_ignore": box_ignore}

  return Source(len(images), read)


def write_preprocessed(root: str, split: str, examples, *, label_dir: str = "label") -> None:
  """Writes ``examples`` (dicts of ``image``, ``label``, ``depth`` and optionally ``normal``
  arrays, stored as given) as ``<root>/<split>/<folder>/N.npy``: the MTAN/LibMTL layout, for
  converting other data or writing mock data."""
  for i, example in enumerate(examples):
    for key, array in example.items():
      folder = os.path.join(root, split, label_dir if key == "label" else key)
      os.makedirs(folder, exist_ok=True)
      np.save(os.path.join(folder, f"{i}.npy"), array)
