"""Several datasets in one run, each labelling some of the tasks; a sampler picks one per step.

    mtjax train --config experiments/configs/multi_dataset.py --workdir workdirs/multi
    mtjax train --config experiments/configs/multi_dataset.py:pcgrad --workdir workdirs/multi_pc \
        --config.dataset_sampler=uniform

``config.datasets`` maps a key to a dataset and the tasks it labels (``tasks``); its other
fields (``name``, ``data_dir``, ``split_sizes``, ``augment``) default to ``config.dataset``'s,
whose ``image_size``, ``loader`` and ``num_workers`` are common to all (one model input, one
compiled step). Each step draws its whole batch from the dataset that
``config.dataset_sampler`` picks as a pure function of (seed, step): ``uniform`` (1/K),
``proportional`` (N_k / Σ N, the default) or ``annealed`` (∝ N_k^α, α from 1 to 0.2 over the
run; Stickland & Murray 2019, Eq. 7). The tasks that dataset does not label are masked out of
the loss (loss 0, zero gradient) and of the metrics; each task is evaluated on the validation
and test splits of the datasets that label it.

Here the embedded dataset stands in for two: segmentation from 3000 scenes, depth and normals
from 1000 others (a different build: the first 1000 scenes of each split are the same scenes,
only the labels each "dataset" gives differ). With real data, e.g. detection from
``voc_2012`` and segmentation from ``cityscapes_official`` (both read at ``image_size``):
``--config.datasets.a.name=voc_2012`` and so on, as long as every dataset opens at the common
``config.dataset.image_size``. The argument after ``:`` names the weighting method.
"""


import ml_collections

from mtjax import config as config_lib


def get_config(arg=None):
  config = config_lib.sibling_config(__file__, "shapes.py", arg)
  config.tasks = ("segmentation", "depth", "normals")
  config.datasets = ml_collections.ConfigDict({
      "scenes_seg": {"name": "shapes", "tasks": ("segmentation",),
                     "split_sizes": {"train": 3000, "validation": 500, "test": 500}},
      "scenes_geometry": {"name": "shapes", "tasks": ("depth", "normals"),
                          "split_sizes": {"train": 1000, "validation": 500, "test": 500}},
  })
  config.dataset_sampler = "proportional"   # or "uniform", "annealed"
  return config
