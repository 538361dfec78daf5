"""TFDS builder ``mtjax_shapes``: the procedural scenes of ``mtjax.data.shapes``, written once.

Built and read without TensorFlow: ``tfds.features.Tensor`` features (zlib-compressed labels,
raw uint8 image) in ArrayRecord files. Example ``i`` of split ``s`` is
``render_scene(np.random.default_rng([SPLIT_IDS[s], i]), H, W, max_objects)``, so a dataset is a
pure function of its config; the same index at two resolutions is the same scene. The files keep
that order (``disable_shuffling``).

Usage::

  builder = MtjaxShapes(config="64x64", data_dir=...)   # or config=make_config(96, 128, ...)
  builder.download_and_prepare()
  source = builder.as_data_source("train")              # random access, numpy
  scene = decode_example(source[0])                      # == render_scene(...) exactly
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mtjax.data import shapes

SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}
DEFAULT_SPLIT_SIZES = {"train": 4000, "validation": 500, "test": 500}

# Stored dtype of each feature where it differs from the renderer's: lossless (the image is a
# multiple of 1/255, class and instance ids are small).
_STORED = {"image": np.uint8, "segmentation": np.uint8, "instances": np.uint8,
           "box_classes": np.uint8}


@dataclasses.dataclass(eq=False)
class MtjaxShapesConfig(tfds.core.BuilderConfig):
  """Image size, objects per scene and split sizes of one build."""
  height: int = 64
  width: int = 64
  max_objects: int = 4
  num_train: int = DEFAULT_SPLIT_SIZES["train"]
  num_validation: int = DEFAULT_SPLIT_SIZES["validation"]
  num_test: int = DEFAULT_SPLIT_SIZES["test"]

  def split_sizes(self):
    return {"train": self.num_train, "validation": self.num_validation, "test": self.num_test}


def config_name(height, width, max_objects=4, split_sizes=None):
  """``"HxW"`` for the default objects and split sizes, else e.g. ``"32x32-o4-n8-4-4"``."""
  sizes = {**DEFAULT_SPLIT_SIZES, **(split_sizes or {})}
  name = f"{height}x{width}"
  if max_objects != 4 or sizes != DEFAULT_SPLIT_SIZES:
    name += f"-o{max_objects}-n{sizes['train']}-{sizes['validation']}-{sizes['test']}"
  return name


def make_config(height, width, max_objects=4, split_sizes=None) -> MtjaxShapesConfig:
  """A config for any size; ``split_sizes`` overrides some of ``DEFAULT_SPLIT_SIZES``."""
  sizes = {**DEFAULT_SPLIT_SIZES, **(split_sizes or {})}
  if set(sizes) != set(SPLIT_IDS):
    raise ValueError(f"split_sizes: unknown split(s) {sorted(set(sizes) - set(SPLIT_IDS))}, "
                     f"allowed: {list(SPLIT_IDS)}")
  if not all(isinstance(n, (int, np.integer)) and n >= 1 for n in sizes.values()):
    raise ValueError(f"split_sizes: got {sizes}, allowed: ints >= 1")
  if not 1 <= max_objects <= 255:
    raise ValueError(f"max_objects: got {max_objects}, allowed: 1..255 (ids are stored as uint8)")
  return MtjaxShapesConfig(
      name=config_name(height, width, max_objects, sizes),
      description=f"{height}x{width} scenes of 1..{max_objects} primitives, splits {sizes}",
      height=height, width=width, max_objects=max_objects, num_train=sizes["train"],
      num_validation=sizes["validation"], num_test=sizes["test"])


def feature_specs(height, width, max_objects):
  """{name: (shape, stored dtype)} of one example."""
  specs = {
      "image": ((height, width, 3), np.float32),
      "segmentation": ((height, width), np.int32),
      "instances": ((height, width), np.int32),
      "depth": ((height, width), np.float32),
      "depth_valid": ((height, width), np.bool_),
      "normals": ((height, width, 3), np.float32),
      "boxes": ((max_objects, 4), np.float32),
      "box_classes": ((max_objects,), np.int32),
      "labels": ((shapes.NUM_CLASSES - 1,), np.float32),
  }
  return {k: (shape, _STORED.get(k, dtype)) for k, (shape, dtype) in specs.items()}


def encode_example(scene):
  """Renderer output -> stored arrays (lossless)."""
  out = dict(scene)
  out["image"] = np.round(scene["image"] * 255.0).astype(np.uint8)
  for k in ("segmentation", "instances", "box_classes"):
    out[k] = scene[k].astype(np.uint8)
  return out


def decode_example(example):
  """Stored arrays -> the renderer's dtypes, bit-identical to ``render_scene``'s output."""
  out = dict(example)
  out["image"] = example["image"].astype(np.float32) / np.float32(255.0)
  for k in ("segmentation", "instances", "box_classes"):
    out[k] = example[k].astype(np.int32)
  return out


def render_example(split, index, height, width, max_objects=4):
  """The scene stored at ``index`` of ``split``."""
  rng = np.random.default_rng([SPLIT_IDS[split], index])
  return shapes.render_scene(rng, height, width, max_objects)


class MtjaxShapes(tfds.core.GeneratorBasedBuilder):
  """Procedural 3D primitives on a ground plane: segmentation, depth, normals, boxes, labels."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [make_config(64, 64), make_config(128, 128), make_config(288, 384)]
  DEFAULT_CONFIG_NAME = "64x64"

  def __init__(self, *, file_format="array_record", **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # TFDS derives it from the top-level package's resources, which fails for a namespace
    # package installed in editable mode; this file is what it means.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    specs = feature_specs(c.height, c.width, c.max_objects)
    # zlib shrinks the labels 7-60x; the noisy image only 1.6x at half the build's CPU time.
    features = tfds.features.FeaturesDict({
        k: tfds.features.Tensor(shape=shape, dtype=dtype,
                                encoding="bytes" if k == "image" else "zlib")
        for k, (shape, dtype) in specs.items()})
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__.split("\n")[0], features=features,
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split, n)
            for split, n in self.builder_config.split_sizes().items()}

  def _generate_examples(self, split, num_examples):
    c = self.builder_config
    for i in range(num_examples):
      yield i, encode_example(render_example(split, i, c.height, c.width, c.max_objects))
