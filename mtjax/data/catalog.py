"""TFDS catalog datasets read through their random-access data sources (no TensorFlow).

``tfds.data_source(name, split)`` reads a dataset prepared in ArrayRecord files; preparing it
(``tfds build``: downloading and encoding the images) needs TensorFlow, an optional install.
Each dataset here is a converter from a TFDS record to mtjax's batch conventions:

  * ``celeb_a`` (Liu et al., 2015): the 40 binary attributes as 40 tasks (Sener & Koltun,
    2018, §5.2), ``attributes`` float32 (40,) in :data:`CELEBA_ATTRIBUTES` order; the
    218×178 image resized (bilinear) to ``image_size`` (the paper: 64×64).
  * ``multi_mnist`` from ``mnist`` (Sener & Koltun, 2018, §5.1, after Sabour et al., 2017):
    example ``i`` overlays digit ``i`` in the top-left and digit ``partner(i)`` in the
    bottom-right of a 36×36 canvas (pixelwise max), resized to ``image_size`` (28×28 in the
    paper) and repeated over 3 channels; tasks ``digit_left`` and ``digit_right`` (10 classes);
    the partner is a fixed permutation of the split.
    MNIST has no validation split: ``validation`` is the last 10% of train, ``train`` the
    rest, ``test`` MNIST's test split.
"""

import numpy as np

from mtjax.data import sources

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair",
    "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair",
    "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes",
    "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks",
    "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young")
CELEBA_TASKS = {f"attr_{a.lower()}": {"kind": "binary", "index": i,
                                      "num_attributes": len(CELEBA_ATTRIBUTES)}
                for i, a in enumerate(CELEBA_ATTRIBUTES)}
MULTI_MNIST_TASKS = {"digit_left": {"kind": "category", "num_classes": 10},
                     "digit_right": {"kind": "category", "num_classes": 10}}
CANVAS = 36     # MultiMNIST canvas; the right digit is offset by CANVAS - 28 in both axes


def prepare_hint(name: str, data_dir) -> str:
  where = f" --data_dir={data_dir}" if data_dir else ""
  return (f"prepare it once with TensorFlow installed (pip install tensorflow): "
          f"`tfds build {name} --file_format=array_record{where}`; mtjax then reads it "
          "without TensorFlow")


def data_source(name: str, split: str, data_dir=None):
  """``tfds.data_source`` of a prepared dataset; never downloads. A clear error otherwise."""
  import tensorflow_datasets as tfds
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                            builder_kwargs={"file_format": "array_record"})
  except ModuleNotFoundError as e:
    if "tensorflow" not in str(e):
      raise
    raise FileNotFoundError(
        f"TFDS dataset {name!r}: its TFDS builder imports TensorFlow, even to read it: install "
        f"it (pip install tensorflow) to use this dataset; prepare it with `tfds build {name} "
        f"--file_format=array_record{f' --data_dir={data_dir}' if data_dir else ''}`") from None
  except (NotImplementedError, AssertionError, KeyError, tfds.core.DatasetNotFoundError) as e:
    raise FileNotFoundError(
        f"TFDS dataset {name!r} is not prepared as ArrayRecord in "
        f"{data_dir or '~/tensorflow_datasets'!r} (expected <data_dir>/{name}/<version>/"
        f"*.array_record-*); {prepare_hint(name, data_dir)} ({type(e).__name__})") from None


def _resize_image(image: np.ndarray, size) -> np.ndarray:
  """uint8 (h, w, c) -> float32 (H, W, c) in [0, 1], bilinear (PIL)."""
  from PIL import Image
  image = np.asarray(image)
  if image.shape[:2] != tuple(size):
    channels = [np.asarray(Image.fromarray(image[..., c]).resize(
        (size[1], size[0]), resample=Image.BILINEAR)) for c in range(image.shape[-1])]
    image = np.stack(channels, -1)
  return image.astype(np.float32) / np.float32(255.0)


def celeba_example(record: dict, image_size) -> dict:
  """A TFDS ``celeb_a`` record -> ``image`` and ``attributes`` (40,) float32 in {0, 1}."""
  attributes = np.array([bool(record["attributes"][a]) for a in CELEBA_ATTRIBUTES], np.float32)
  return {"image": _resize_image(record["image"], image_size), "attributes": attributes}


def multi_mnist_example(left: dict, right: dict, image_size) -> dict:
  """Two ``mnist`` records -> the overlaid image and both digits."""
  canvas = np.zeros((CANVAS, CANVAS), np.uint8)
  a, b = np.asarray(left["image"])[..., 0], np.asarray(right["image"])[..., 0]
  off = CANVAS - a.shape[0]
  canvas[:a.shape[0], :a.shape[1]] = a
  canvas[off:, off:] = np.maximum(canvas[off:, off:], b)
  image = _resize_image(np.repeat(canvas[..., None], 3, -1), image_size)
  return {"image": image, "digit_left": np.int32(left["label"]),
          "digit_right": np.int32(right["label"])}


VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")
MAX_BOXES = 64


def voc_example(record: dict, image_size, max_boxes: int = MAX_BOXES) -> dict:
  """A TFDS ``voc`` record -> ``image``, ``boxes`` (K, 4), ``box_classes`` (K,) int32 and
  ``box_ignore`` (K,) int32 (1: the object is ``difficult``, which VOC's evaluation ignores).

  More than ``max_boxes`` objects raise a ValueError naming the count (no object is dropped).
  """
  objects = record["objects"]
  bbox = np.asarray(objects["bbox"], np.float32).reshape(-1, 4)
  label = np.asarray(objects["label"], np.int64).reshape(-1)
  difficult = np.asarray(objects.get("is_difficult", np.zeros(len(label))), bool).reshape(-1)
  n = min(len(bbox), len(label), len(difficult))   # equal in VOC (TFDS's mock data: not)
  if n > max_boxes:
    raise ValueError(f"voc: an image has {n} objects, more than max_boxes={max_boxes} rows "
                     f"(mtjax.data.catalog.MAX_BOXES, the detection task's max_boxes)")
  boxes = np.zeros((max_boxes, 4), np.float32)
  classes = np.zeros((max_boxes,), np.int32)
  ignore = np.zeros((max_boxes,), np.int32)
  boxes[:n], classes[:n], ignore[:n] = bbox[:n], label[:n] + 1, difficult[:n]
  return {"image": _resize_image(record["image"], image_size), "boxes": boxes,
          "box_classes": classes, "box_ignore": ignore}


def voc_source(split: str, image_size, data_dir=None) -> sources.Source:
  src = data_source("voc/2012", split, data_dir)
  return sources.Source(len(src), lambda i: voc_example(src[i], image_size))


def celeba_source(split: str, image_size, data_dir=None) -> sources.Source:
  src = data_source("celeb_a", split, data_dir)
  return sources.Source(len(src), lambda i: celeba_example(src[i], image_size))


def multi_mnist_source(split: str, image_size, data_dir=None) -> sources.Source:
  src = data_source("mnist", "test" if split == "test" else "train", data_dir)
  total = len(src)
  lo, hi = {"train": (0, total - total // 10), "validation": (total - total // 10, total),
            "test": (0, total)}[split]
  size = hi - lo
  order = np.random.default_rng([size, 2018]).permutation(size)

  def read(i):
    return multi_mnist_example(src[lo + i], src[lo + int(order[i])], image_size)
  return sources.Source(size, read)
