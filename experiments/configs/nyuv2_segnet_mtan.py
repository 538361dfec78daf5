"""NYUv2 (13-class segmentation, depth, normals) with SegNet-MTAN: the MTAN SegNet protocol.

    mtjax train --config experiments/configs/nyuv2_segnet_mtan.py:ew \
        --workdir workdirs/nyuv2_segnet_ew --config.dataset.data_dir=/data/nyuv2

The protocol of the MTAN SegNet rows (MTAN, CAGrad, Nash-MTL, FAMO) as LibMTL runs it
(``examples/nyu/README.md``: ``python main_segnet.py --weighting W --dataset_path PATH/nyuv2
--scheduler step --aug --weight_decay 0``), each setting from its source line:

  * model: ``examples/nyu/segnet_mtan.py``'s SegNet-MTAN, filters 64..512
    (``mtjax.models.segnet``; the whole encoder, attention included, is shared);
  * data: MTAN's preprocessed 795/654 split at 288×384, evaluated on val/
    (``create_dataset.py`` NYUv2, ``mode='test'`` reads val/); ``--aug``: random scale-crop
    (scales 1.0, 1.2, 1.5) and horizontal flip (``create_dataset.py`` ``RandomScaleCrop``, flip);
    images not normalised (``np.load`` as is);
  * batch 2 (``main_segnet.py:16`` ``--train_bs`` default 2), ``drop_last=True``
    (``main_segnet.py:35``): 795 // 2 = 397 steps an epoch; 200 epochs (``main_segnet.py:18``);
    test batch 2 (``main_segnet.py:17``);
  * Adam (``LibMTL/config.py:24``), learning rate 1e-4 (``config.py:26``), weight decay 0
    (the README's ``--weight_decay 0``; LibMTL's default 1e-5, ``config.py:28``);
  * StepLR, step 100 epochs, ×0.5 (``config.py:32-33``; ``--scheduler step``), stepped once an
    epoch by LibMTL's trainer (``LibMTL/trainer.py:300``): ``step_size = 100 × 397`` steps;
  * losses: ``examples/nyu/utils.py`` (cross-entropy ignoring unlabelled pixels, L1 and
    1 − cos on the pixels whose target is non-zero);
  * evaluation every epoch on val/; LibMTL reports the best epoch by Δp, MTAN and Nash-MTL the
    mean of the last 10 epochs: both from ``metrics.jsonl``.

The MTAN authors' ``im2im_pred/model_segnet_mtan.py`` differs in: no ``drop_last`` (398 steps,
the last of one image), no augmentation by default (``--apply_augmentation``), no weight decay.
docs/protocols.md ("SegNet-MTAN") lists what is shown equal and by which test.
"""

import ml_collections

from mtjax import config as config_lib

TRAIN_IMAGES = 795
BATCH = 2
STEPS_PER_EPOCH = TRAIN_IMAGES // BATCH      # drop_last
EPOCHS = 200
STEP_EPOCHS = 100


def get_config(arg=None):
  config = config_lib.sibling_config(__file__, "shapes.py", arg)
  config.dataset.name = "nyuv2"
  config.dataset.image_size = (288, 384)
  config.dataset.augment = ("scale_crop", "hflip")
  config.dataset.num_workers = 4
  config.dataset.loader = "threads"
  config.tasks = ("segmentation", "depth", "normals")
  config.model = config_lib.model_config(
      "segnet_mtan", backbone="segnet", width=64, output_stride=32, stem="imagenet",
      head_hidden=64, dtype="float32", pretrained="")   # a LibMTL model file (best.pt)
  config.optimizer = ml_collections.ConfigDict({
      "name": "adam", "learning_rate": 1e-4, "schedule": "step",
      "step_size": STEP_EPOCHS * STEPS_PER_EPOCH, "gamma": 0.5, "warmup_steps": 0,
      "momentum": 0.9, "weight_decay": 0.0, "grad_clip": 0.0, "lr_scale": (), "frozen": ()})
  config.batch_size = BATCH
  config.eval_batch_size = BATCH
  config.num_steps = EPOCHS * STEPS_PER_EPOCH
  config.log_every = STEPS_PER_EPOCH
  config.eval_every = STEPS_PER_EPOCH
  config.checkpoint_every = STEPS_PER_EPOCH
  return config
