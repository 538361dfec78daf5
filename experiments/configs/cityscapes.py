"""Cityscapes (7-class segmentation, depth) at 128×256, the MTAN / Nash-MTL protocol.

    mtjax train --config experiments/configs/cityscapes.py:ew --workdir workdirs/city_ew \
        --config.dataset.data_dir=/data/cityscapes

Reproduces ../shared/REFERENCE.md "Cityscapes (7-class seg + depth, 128×256, MTAN; Nash-MTL
Table 3)" and the LibMTL/ResNet-50 row (DB-MTL 2023): MTAN's preprocessed release
(`train|val/{image,label_7,depth}/N.npy`, or LibMTL's `label/`), 2975/500 images, batch 64,
Adam 1e-4 (weight decay 1e-5 in LibMTL), 200 epochs (46 steps each: 2975 // 64), evaluated on
val/. Selection rule: Nash-MTL reports the mean of the last 10 epochs' validation metrics;
LibMTL the best validation epoch (both from metrics.jsonl, ``eval_every`` = one epoch).
19 classes: ``--config.dataset.name=cityscapes_19`` (MTAN's label_19/).

Differences, as for nyuv2.py: mtjax's ResNet-50 (output stride 8, no ImageNet weights) and
DenseHeads instead of the SegNet/MTAN or DeepLab heads; a constant learning rate.
"""


from mtjax import config as config_lib

STEPS_PER_EPOCH = 2975 // 64



def get_config(arg=None):
  config = config_lib.sibling_config(__file__, "shapes.py", arg)
  config.dataset.name = "cityscapes"
  config.dataset.image_size = (128, 256)
  config.dataset.augment = ()
  config.dataset.num_workers = 4
  config.dataset.loader = "threads"
  config.tasks = ("segmentation", "depth")
  config.model.backbone = "resnet50"
  config.model.width = 64
  config.model.output_stride = 8
  config.model.stem = "imagenet"
  config.model.head_hidden = 256
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-4
  config.optimizer.weight_decay = 1e-5
  config.optimizer.schedule = "constant"
  config.batch_size = 64
  config.eval_batch_size = 64
  config.num_steps = 200 * STEPS_PER_EPOCH
  config.log_every = STEPS_PER_EPOCH
  config.eval_every = STEPS_PER_EPOCH
  config.checkpoint_every = STEPS_PER_EPOCH
  return config
