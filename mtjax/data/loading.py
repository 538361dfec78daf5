"""The dataset registry: each dataset opens a split as a random-access :class:`Source`.

The embedded dataset is built once into the TFDS data dir (``data_dir``, else
``$MTJAX_DATA_DIR``, else ``~/tensorflow_datasets``) and read through its ArrayRecord data
source (whole into memory: it is small). Datasets on disk (NYUv2, Cityscapes) are read from
``data_dir``, else ``$MTJAX_DATA_DIR/<name>``, one example at a time (``mtjax.data.sources``).
"""

import contextlib
import logging
import os
from typing import NamedTuple

import numpy as np

from mtjax.data import catalog, shapes, shapes_tfds, sources


class DatasetSpec(NamedTuple):
  """What a registered dataset offers."""
  open: object                 # (split, image_size, data_dir, split_sizes) -> sources.Source
  class_names: tuple
  tasks: dict                  # task name -> its options (e.g. {"num_classes": 5})
  splits: tuple
  image_sizes: tuple           # the predefined sizes (the embedded one builds any in SIZE_RANGE)
  in_memory: bool = False      # read whole into memory (small), else lazily, batch by batch
  layout: str = ""             # the files expected in data_dir (for errors and docs)
  tfds: bool = False           # a TFDS catalog dataset: data_dir is the TFDS data dir


SIZE_RANGE = (8, 2048)         # allowed image height / width, inclusive
# A dataset marked in_memory is read whole only while the arrays a run reads fit in this many
# bytes; beyond it, it is read lazily, batch by batch (the embedded dataset at 512x512: ~4.2 MB
# an example for detection + segmentation, 17 GB for its 4000 training images).
IN_MEMORY_BYTES = 4 << 30


def _make_shapes_builder(image_size, split_sizes, data_dir):
  h, w = image_size
  config = shapes_tfds.make_config(h, w, split_sizes=split_sizes)
  if config.name in shapes_tfds.MtjaxShapes.builder_configs:
    config = config.name      # TFDS refuses a custom config named like a predefined one
  return shapes_tfds.MtjaxShapes(config=config, data_dir=data_dir)


def _open_shapes(split, image_size, data_dir, split_sizes):
  with _quiet_absl():
    builder = _make_shapes_builder(image_size, split_sizes, data_dir)
    builder.download_and_prepare()
    source = builder.as_data_source(split)
  return sources.Source(
      len(source), lambda i: shapes_tfds.decode_example(source[i]),
      lambda keys: [shapes_tfds.decode_example(e) for e in source.__getitems__(keys)])


def _open_preprocessed(**options):
  def open_split(split, image_size, data_dir, split_sizes):
    del image_size, split_sizes   # fixed by the files
    return sources.preprocessed_source(data_dir, split, **options)
  return open_split


def _open_cityscapes_official(split, image_size, data_dir, split_sizes):
  del split_sizes
  return sources.cityscapes_official_source(data_dir, split, image_size=image_size)


NYUV2_CLASSES = ("bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture",
                 "sofa", "table", "tv", "wall", "window")   # the 13 classes of Couprie et al.
CITYSCAPES_7_CLASSES = ("void", "flat", "construction", "object", "nature", "sky", "human+vehicle")
_SPLITS = ("train", "validation", "test")

DATASETS = {
    "shapes": DatasetSpec(
        open=_open_shapes,
        in_memory=True,
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
    # Liu et al. 2019 (MTAN) / LibMTL: the 795/654 split, 288x384, 13 classes.
    "nyuv2": DatasetSpec(
        open=_open_preprocessed(num_classes=13, normals=True),
        class_names=NYUV2_CLASSES,
        tasks={"segmentation": {"num_classes": 13}, "depth": {}, "normals": {}},
        splits=_SPLITS, image_sizes=((288, 384),),
        layout=sources.preprocessed_layout(("label",), normals=True)),
    # MTAN's 128x256 release (label_7/, label_19/) or LibMTL's (label/, 7 classes); (inverse) depth.
    "cityscapes": DatasetSpec(
        open=_open_preprocessed(num_classes=7, label_dirs=("label_7", "label")),
        class_names=CITYSCAPES_7_CLASSES,
        tasks={"segmentation": {"num_classes": 7}, "depth": {}},
        splits=_SPLITS, image_sizes=((128, 256),),
        layout=sources.preprocessed_layout(("label_7", "label"), normals=False)),
    "cityscapes_19": DatasetSpec(
        open=_open_preprocessed(num_classes=19, label_dirs=("label_19",)),
        class_names=sources.CITYSCAPES_CLASSES,
        tasks={"segmentation": {"num_classes": 19}, "depth": {}},
        splits=_SPLITS, image_sizes=((128, 256),),
        layout=sources.preprocessed_layout(("label_19",), normals=False)),
    # The official release: 19 train ids, depth from disparity, boxes of the thing instances.
    "cityscapes_official": DatasetSpec(
        open=_open_cityscapes_official,
        class_names=sources.CITYSCAPES_CLASSES,
        tasks={"segmentation": {"num_classes": 19}, "depth": {},
               "detection": {"num_classes": len(sources.CITYSCAPES_THING_IDS),
                             "max_boxes": sources.MAX_BOXES, "ignore_regions": True}},
        splits=_SPLITS, image_sizes=((1024, 2048), (512, 1024), (256, 512), (128, 256)),
        layout=sources.OFFICIAL_LAYOUT),
    # TFDS catalog datasets, prepared as ArrayRecord (mtjax.data.catalog).
    "celeb_a": DatasetSpec(
        open=lambda split, image_size, data_dir, split_sizes: catalog.celeba_source(
            split, image_size, data_dir),
        class_names=catalog.CELEBA_ATTRIBUTES, tasks=catalog.CELEBA_TASKS, splits=_SPLITS,
        image_sizes=((64, 64),), tfds=True,
        layout="<data_dir>/celeb_a/<version>/*.array_record-* (tfds build celeb_a)"),
    "multi_mnist": DatasetSpec(
        open=lambda split, image_size, data_dir, split_sizes: catalog.multi_mnist_source(
            split, image_size, data_dir),
        class_names=tuple(str(d) for d in range(10)), tasks=catalog.MULTI_MNIST_TASKS,
        splits=_SPLITS, image_sizes=((28, 28),), tfds=True,
        layout="<data_dir>/mnist/<version>/*.array_record-* (tfds build mnist)"),
    "voc_2012": DatasetSpec(
        open=lambda split, image_size, data_dir, split_sizes: catalog.voc_source(
            split, image_size, data_dir),
        class_names=catalog.VOC_CLASSES,
        tasks={"detection": {"num_classes": len(catalog.VOC_CLASSES),
                             "max_boxes": catalog.MAX_BOXES, "ignore_regions": True,
                             "evaluation": "voc"}},
        splits=_SPLITS, image_sizes=((384, 384),), tfds=True,
        layout="<data_dir>/voc/2012/<version>/*.array_record-* (tfds build voc/2012)"),
}


# Catalog datasets asked for that are not registered, and why (said by the error).
NOT_REGISTERED = {
    "coco": "COCO's TFDS builder (coco/2017, also its panoptic variant) needs TensorFlow even "
            "to read its prepared files, and TensorFlow is never required here",
}


def _spec(name):
  if name not in DATASETS:
    why = next((v for k, v in NOT_REGISTERED.items() if str(name).startswith(k)), None)
    raise ValueError(f"name: unknown dataset {name!r}{f' ({why})' if why else ''}; valid "
                     f"names: {sorted(DATASETS)}")
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


def _data_dir(name, data_dir):
  if data_dir:
    return data_dir
  root = os.environ.get("MTJAX_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
  spec = _spec(name)
  if spec.tfds:
    return os.environ.get("MTJAX_DATA_DIR") or None   # None: TFDS's own default
  return root if spec.in_memory else os.path.join(root, name)


def open_split(name: str, split: str, *, image_size=(64, 64), data_dir=None,
               split_sizes=None) -> sources.Source:
  """A random-access :class:`~mtjax.data.sources.Source` over ``split`` (nothing read yet).

  The embedded dataset is built into ``data_dir`` first if it is not there; a dataset on disk
  that is missing raises FileNotFoundError naming the folder and the layout expected.
  """
  spec = _spec(name)
  if split not in spec.splits:
    raise ValueError(f"split: unknown split {split!r} of {name!r}, allowed: {list(spec.splits)}")
  lo, hi = SIZE_RANGE
  if (not isinstance(image_size, (tuple, list)) or len(image_size) != 2
      or not all(isinstance(s, (int, np.integer)) and lo <= s <= hi for s in image_size)):
    raise ValueError(f"image_size: got {image_size!r}, allowed: (height, width) ints in "
                     f"[{lo}, {hi}], e.g. the predefined {list(spec.image_sizes)}")
  return spec.open(split, tuple(int(s) for s in image_size), _data_dir(name, data_dir),
                   split_sizes)


def reads_whole(name: str, source: sources.Source) -> bool:
  """Whether ``source`` (of dataset ``name``, its keys already selected) is read whole into
  memory: the dataset is marked ``in_memory`` and its examples fit in :data:`IN_MEMORY_BYTES`
  (estimated from the first example, nothing else is read)."""
  if not _spec(name).in_memory or source.size == 0:
    return False
  example = source.read(0)
  return source.size * sum(np.asarray(v).nbytes for v in example.values()) <= IN_MEMORY_BYTES


def load_split(name: str, split: str, *, image_size=(64, 64), data_dir=None,
               num_examples=None, split_sizes=None) -> dict[str, np.ndarray]:
  """The first ``num_examples`` (default: all) examples of ``split``, stacked along axis 0.

  Builds the dataset into ``data_dir`` first if it is not there. ``split_sizes`` (e.g.
  ``{"train": 8}``) selects a build with other split sizes than the defaults. Arrays have the
  renderer's dtypes (``image`` float32 in [0, 1], ids int32, see ``mtjax.data.shapes``).
  """
  source = open_split(name, split, image_size=image_size, data_dir=data_dir,
                      split_sizes=split_sizes)
  total = source.size
  if num_examples is None:
    num_examples = total
  if not isinstance(num_examples, (int, np.integer)) or not 0 < num_examples <= total:
    raise ValueError(f"num_examples: got {num_examples!r}, allowed: an int in [1, {total}] "
                     f"(the size of {name!r} {split!r})")
  return sources.read_all(source, num_examples)
