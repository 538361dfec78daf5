"""Cityscapes (7-class segmentation, depth) at 128×256: LibMTL's DeepLab protocol.

    mtjax train --config experiments/configs/cityscapes.py:ew --workdir workdirs/city_ew \
        --config.dataset.data_dir=/data/cityscapes \
        --config.model.pretrained=resnet50-19c8e357.pth

LibMTL's ``examples/cityscapes/main.py`` (GitHub HEAD 4336804): the NYUv2 protocol
(``nyuv2.py``, docs/protocols.md) with Cityscapes' data and tasks: the preprocessed
``train|val/{image,label,depth}/N.npy`` (2975/500 images, 128×256, labels in 7 classes, -1
unlabelled; ``examples/cityscapes/create_dataset.py``; MTAN's release names the label folder
``label_7``, read too), segmentation and depth with ``examples/nyu/utils.py``'s losses and
metrics, batch 64 with ``drop_last`` (46 steps an epoch), the same model (one DeepLabHead per
task), Adam 1e-4 with weight decay 1e-5, StepLR ×0.5 every 100 epochs, 200 epochs, evaluated on
val/ every epoch. 19 classes: ``--config.dataset.name=cityscapes_19`` (not LibMTL's protocol).
"""

from mtjax import config as config_lib

TRAIN_SIZE = 2975                                # the train/ split
BATCH_SIZE = 64                                  # main.py: --train_bs default 64
STEPS_PER_EPOCH = TRAIN_SIZE // BATCH_SIZE       # main.py: drop_last=True (46 steps)


def get_config(arg=None):
  config = config_lib.sibling_config(__file__, "nyuv2.py", arg)
  config.dataset.name = "cityscapes"
  config.dataset.image_size = (128, 256)         # main.py: process_preds img_size
  config.tasks = ("segmentation", "depth")       # main.py: task_dict
  config.optimizer.step_size = 100 * STEPS_PER_EPOCH   # LibMTL/config.py: --step_size 100
  config.batch_size = BATCH_SIZE
  config.eval_batch_size = 64                    # main.py: --test_bs default 64
  config.num_steps = 200 * STEPS_PER_EPOCH       # main.py: --epochs default 200
  config.log_every = STEPS_PER_EPOCH
  config.eval_every = STEPS_PER_EPOCH
  config.checkpoint_every = STEPS_PER_EPOCH
  return config
