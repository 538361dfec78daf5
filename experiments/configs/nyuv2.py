"""NYUv2 (13-class segmentation, depth, normals) with LibMTL's ResNet-50 DeepLab protocol.

    mtjax train --config experiments/configs/nyuv2.py:ew --workdir workdirs/nyuv2_ew \
        --config.dataset.data_dir=/data/nyuv2

Reproduces ../shared/REFERENCE.md "NYUv2 with DeepLabV3+/ResNet-50 at 288×384, batch 8"
(DB-MTL 2023, Table 1, built on LibMTL's examples/nyu): the preprocessed 795/654 split of MTAN
(`train|val/{image,label,depth,normal}/N.npy`), 288×384, batch 8, Adam 1e-4 with weight decay
1e-5, 200 epochs (99 steps each: 795 // 8, the remainder dropped), evaluated on val/ (the
"test" split here too: the papers have no other). Selection rule: LibMTL reports the epoch with
the best validation Δp, i.e. the best validation evaluation (`eval_every` = one epoch); MTAN and
Nash-MTL report the mean of the last 10 epochs — both are read off metrics.jsonl.

What differs from LibMTL, because mtjax does not have it (yet):
  * the encoder is mtjax's ResNet-50 with output stride 8 (dilated last two stages, as
    DeepLab), trained from scratch: ImageNet-pretrained weights are not loaded here;
  * the heads are mtjax's DenseHead (conv 3×3 + BN + ReLU, conv 1×1, bilinear upsampling)
    rather than ASPP;
  * LibMTL's StepLR (×0.5 every 100 epochs) is approximated by a constant learning rate
    (mtjax's schedules: constant, cosine, warmup_cosine).
Augmentation is off as in LibMTL's default (`--aug` off; MTAN recommends it): turn it on with
``--config.dataset.augment='("scale_crop", "hflip")'``.
"""


from mtjax import config as config_lib

STEPS_PER_EPOCH = 795 // 8



def get_config(arg=None):
  config = config_lib.sibling_config(__file__, "shapes.py", arg)
  config.dataset.name = "nyuv2"
  config.dataset.image_size = (288, 384)
  config.dataset.augment = ()
  config.dataset.num_workers = 4
  config.dataset.loader = "threads"
  config.tasks = ("segmentation", "depth", "normals")
  config.model.backbone = "resnet50"
  config.model.width = 64
  config.model.output_stride = 8
  config.model.stem = "imagenet"
  config.model.head_hidden = 256
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-4
  config.optimizer.weight_decay = 1e-5
  config.optimizer.schedule = "constant"
  config.batch_size = 8
  config.eval_batch_size = 8
  config.num_steps = 200 * STEPS_PER_EPOCH
  config.log_every = STEPS_PER_EPOCH
  config.eval_every = STEPS_PER_EPOCH
  config.checkpoint_every = STEPS_PER_EPOCH
  return config
