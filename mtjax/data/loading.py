"""Loading a split of an embedded dataset into memory as stacked numpy arrays.

The dataset is built once into the TFDS data dir (``data_dir``, else ``$MTJAX_DATA_DIR``, else
``~/tensorflow_datasets``) and then read through its ArrayRecord data source.
"""

import contextlib
import logging
import os
from typing import NamedTuple

import numpy as np

from mtjax.data import shapes, shapes_tfds


class DatasetSpec(NamedTuple):
  """What a registered dataset offers."""
  make_builder: object         # (image_size, split_sizes, data_dir) -> tfds builder
  decode: object               # stored example -> arrays in the renderer's dtypes
  class_names: tuple
  tasks: dict                  # task name -> its options (e.g. {"num_classes": 5})
  splits: tuple
  image_sizes: tuple           # the predefined configs (any size in SIZE_RANGE may be built)


SIZE_RANGE = (8, 1024)         # allowed image height / width, inclusive
_READ_CHUNK = 256              # examples per bulk read


def _make_shapes_builder(image_size, split_sizes, data_dir):
  h, w = image_size
  config = shapes_tfds.make_config(h, w, split_sizes=split_sizes)
  if config.name in shapes_tfds.MtjaxShapes.builder_configs:
    config = config.name      # TFDS refuses a custom config named like a predefined one
  return shapes_tfds.MtjaxShapes(config=config, data_dir=data_dir)


DATASETS = {
    "shapes": DatasetSpec(
        make_builder=_make_shapes_builder,
        decode=shapes_tfds.decode_example,
        class_names=shapes.CLASS_NAMES,
        tasks={
            "segmentation": {"num_classes": shapes.NUM_CLASSES},      # background included
            "depth": {},
            "normals": {},
            "classification": {"num_classes": shapes.NUM_CLASSES - 1},  # one label per object class
            "detection": {"num_classes": shapes.NUM_CLASSES - 1, "max_boxes": 4},
            "instances": {},
        },
        splits=tuple(shapes_tfds.SPLIT_IDS),
        image_sizes=tuple((c.height, c.width) for c in shapes_tfds.MtjaxShapes.BUILDER_CONFIGS),
    ),
}


def _spec(name):
  if name not in DATASETS:
    raise ValueError(f"name: unknown dataset {name!r}; valid names: {sorted(DATASETS)}")
  return DATASETS[name]


def dataset_info(name: str) -> dict:
  """Class names, the tasks it labels with each task's options, splits, predefined sizes."""
  spec = _spec(name)
  return {"class_names": spec.class_names,
          "tasks": {task: dict(options) for task, options in spec.tasks.items()},
          "splits": spec.splits, "image_sizes": spec.image_sizes}


@contextlib.contextmanager
def _quiet_absl():
  """TFDS logs INFO/WARNING lines through absl (e.g. 'Using custom data configuration')."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def load_split(name: str, split: str, *, image_size=(64, 64), data_dir=None,
               num_examples=None, split_sizes=None) -> dict[str, np.ndarray]:
  """The first ``num_examples`` (default: all) examples of ``split``, stacked along axis 0.

  Builds the dataset into ``data_dir`` first if it is not there. ``split_sizes`` (e.g.
  ``{"train": 8}``) selects a build with other split sizes than the defaults. Arrays have the
  renderer's dtypes (``image`` float32 in [0, 1], ids int32, see ``mtjax.data.shapes``).
  """
  spec = _spec(name)
  if split not in spec.splits:
    raise ValueError(f"split: unknown split {split!r} of {name!r}, allowed: {list(spec.splits)}")
  lo, hi = SIZE_RANGE
  if (not isinstance(image_size, (tuple, list)) or len(image_size) != 2
      or not all(isinstance(s, (int, np.integer)) and lo <= s <= hi for s in image_size)):
    raise ValueError(f"image_size: got {image_size!r}, allowed: (height, width) ints in "
                     f"[{lo}, {hi}], e.g. the predefined {list(spec.image_sizes)}")
  if data_dir is None:
    data_dir = os.environ.get("MTJAX_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
  with _quiet_absl():
    builder = spec.make_builder(tuple(int(s) for s in image_size), split_sizes, data_dir)
    builder.download_and_prepare()
    source = builder.as_data_source(split)
  total = len(source)
  if num_examples is None:
    num_examples = total
  if not isinstance(num_examples, (int, np.integer)) or not 0 < num_examples <= total:
    raise ValueError(f"num_examples: got {num_examples!r}, allowed: an int in [1, {total}] "
                     f"(the size of {name!r} {split!r})")
  out = None
  for start in range(0, num_examples, _READ_CHUNK):
    keys = list(range(start, min(start + _READ_CHUNK, num_examples)))
    for i, example in zip(keys, source.__getitems__(keys), strict=True):
      example = spec.decode(example)
      if out is None:
        out = {k: np.empty((num_examples, *v.shape), v.dtype) for k, v in example.items()}
      for k, v in example.items():
        out[k][i] = v
  return out
