"""Data: the dataset registry and sources (embedded procedural scenes, NYUv2, Cityscapes),
the input pipeline and label-consistent augmentations."""

from mtjax.data.loading import DATASETS, dataset_info, load_split, open_split, reads_whole
from mtjax.data.shapes import CLASS_NAMES, NUM_CLASSES, render_scene

__all__ = ["CLASS_NAMES", "DATASETS", "NUM_CLASSES", "dataset_info", "load_split", "open_split",
           "reads_whole", "render_scene"]
