"""The sharing architectures on the embedded dataset, CPU-sized (the architecture sweep's config).

    mtjax train --config experiments/configs/architectures.py:mtan --workdir workdirs/mtan
    mtjax train --config experiments/configs/architectures.py:cross_stitch:nash_mtl ...
    python experiments/sweep_architectures.py --config experiments/configs/architectures.py \
        --workdir workdirs/architectures --architectures all --methods ew,nash_mtl --seeds 0,1,2

The argument after ``:`` is ``ARCHITECTURE[:METHOD]`` (default ``hard:ew``). The
architecture's hyperparameters become ``config.model`` fields with their builders' defaults
(``mtjax.config.model_config``), e.g. ``--config.model.branch_stage=1``. Everything else is the
default experiment (``shapes.py``) at 32×32 pixels, width 8 and smaller splits, so that the
3-seed sweep of every architecture fits a shared 2-core CPU.
"""


import ml_collections

from mtjax import config as config_lib
from mtjax.config import model_config


def get_config(arg=None):
  architecture, _, method = (arg or "hard").partition(":")
  config = config_lib.sibling_config(__file__, "shapes.py", method or "ew")
  common = {k: v for k, v in config.model.items() if k != "architecture"}
  common.update(width=8, head_hidden=16)
  config.model = model_config(architecture, **common)
  config.dataset.image_size = (32, 32)
  config.dataset.split_sizes = ml_collections.ConfigDict(
      {"train": 2000, "validation": 100, "test": 300})
  config.batch_size = 16
  config.num_steps = 300
  config.optimizer.warmup_steps = 20
  config.log_every = 25
  config.eval_every = 0
  config.checkpoint_every = 0
  config.eval_batch_size = 100
  return config
