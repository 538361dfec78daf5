"""Data: the embedded procedural dataset (renderer, TFDS builder) and loading splits into memory."""

from mtjax.data.loading import DATASETS, dataset_info, load_split
from mtjax.data.shapes import CLASS_NAMES, NUM_CLASSES, render_scene

__all__ = ["CLASS_NAMES", "DATASETS", "NUM_CLASSES", "dataset_info", "load_split", "render_scene"]
