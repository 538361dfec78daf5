"""Cityscapes (7-class segmentation, depth) at 128×256 with SegNet-MTAN: the MTAN SegNet protocol.

    mtjax train --config experiments/configs/cityscapes_segnet_mtan.py:ew \
        --workdir workdirs/city_segnet_ew --config.dataset.data_dir=/data/cityscapes

LibMTL has no SegNet example for Cityscapes; the rows of CAGrad, Nash-MTL and FAMO come from the
MTAN authors' network with two tasks, trained by FAMO's ``experiments/cityscapes/trainer.py``
(Cranial-XIX/FAMO, the code of CAGrad and Nash-MTL's Cityscapes runs), each setting from its
source line:

  * model: ``experiments/cityscapes/models.py``'s ``SegNetMtan``: LibMTL's SegNet-MTAN
    (``mtjax.models.segnet``, filters 64..512) with two attention branches
    (``range(2)``, ``models.py:189``) and 7 classes (``models.py:15``); its shared parameters
    are everything but the prediction layers (``shared_parameters``: ``"pred" not in n``);
  * data: MTAN's preprocessed release at 128×256 (``label_7/`` or LibMTL's ``label/``),
    2975/500 images, evaluated on val/; augmentation on (``trainer.py:276-277``
    ``--apply-augmentation`` default True: ``data.py``'s random scale-crop and flip);
  * batch 8 (``trainer.py:267``), 200 epochs (``trainer.py:266``), shuffled, no ``drop_last``
    (``trainer.py:67-68``; here the remainder of 2975 / 8 is dropped: 371 steps an epoch);
  * Adam, learning rate 1e-4 (``trainer.py:265``, ``trainer.py:82-85``), no weight decay;
  * StepLR, 100 epochs, ×0.5 (``trainer.py:88``), stepped once an epoch: ``step_size = 100 ×
    371`` optimizer steps;
  * evaluation every epoch on val/; these papers report the mean of the last 10 epochs (from
    ``metrics.jsonl``).

docs/protocols.md ("SegNet-MTAN") lists what is shown equal and by which test.
"""

from mtjax import config as config_lib

TRAIN_IMAGES = 2975
BATCH = 8
STEPS_PER_EPOCH = TRAIN_IMAGES // BATCH
EPOCHS = 200
STEP_EPOCHS = 100


def get_config(arg=None):
  """``nyuv2_segnet_mtan.py`` (same model, optimizer, schedule, augmentation) on Cityscapes."""
  config = config_lib.sibling_config(__file__, "nyuv2_segnet_mtan.py", arg)
  config.dataset.name = "cityscapes"
  config.dataset.image_size = (128, 256)
  config.tasks = ("segmentation", "depth")
  config.optimizer.step_size = STEP_EPOCHS * STEPS_PER_EPOCH
  config.batch_size = BATCH
  config.eval_batch_size = BATCH
  config.num_steps = EPOCHS * STEPS_PER_EPOCH
  config.log_every = STEPS_PER_EPOCH
  config.eval_every = STEPS_PER_EPOCH
  config.checkpoint_every = STEPS_PER_EPOCH
  return config
