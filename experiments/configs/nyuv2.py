"""NYUv2 (13-class segmentation, depth, normals): LibMTL's DeepLab protocol.

    mtjax train --config experiments/configs/nyuv2.py:ew --workdir workdirs/nyuv2_ew \
        --config.dataset.data_dir=/data/nyuv2 \
        --config.model.pretrained=resnet50-19c8e357.pth

LibMTL's ``examples/nyu`` (Lin & Zhang, 2023; the DeepLab rows of DB-MTL, ExcessMTL, FairGrad,
...), run as its README says (``python main.py --weighting W --arch HPS --scheduler step``).
Each setting and its source, in LibMTL at GitHub HEAD (4336804), and the test that shows mtjax
equal to it: docs/protocols.md. In short:

* data: MTAN's preprocessed 795/654 split (``train|val/{image,label,depth,normal}/N.npy``,
  288×384, ``examples/nyu/create_dataset.py``), images as stored (no normalisation), no
  augmentation (``--aug`` off), val/ is the evaluation split;
* model: ``resnet_dilated('resnet50')`` (output stride 8, ``LibMTL/model/resnet_dilated.py``)
  shared, one ``DeepLabHead(2048, classes)`` per task (``examples/nyu/aspp.py``), predictions
  upsampled bilinearly with ``align_corners=True`` (``main.py``, ``process_preds``); ImageNet
  weights: torchvision's ``resnet50-19c8e357.pth`` (``LibMTL/model/resnet.py``, ``model_urls``),
  given as ``config.model.pretrained`` (nothing is downloaded);
* optimisation: Adam, lr 1e-4, weight decay 1e-5 added to the gradient (``LibMTL/config.py``,
  ``torch.optim.Adam``), StepLR ×0.5 every 100 epochs (``--scheduler step``), batch 8 with the
  last partial batch dropped (``main.py``), 200 epochs, evaluated every epoch;
* losses and metrics: ``examples/nyu/utils.py`` (mtjax's segmentation, depth, normals tasks).

LibMTL reports the epoch with the best Δp on its evaluation split and MTAN-style papers the mean
of the last 10 epochs: both come from metrics.jsonl (docs/protocols.md has the command).
"""

from mtjax import config as config_lib

TRAIN_SIZE = 795                                 # MTAN's NYUv2 train/ split
BATCH_SIZE = 8                                   # main.py: --train_bs default 8
STEPS_PER_EPOCH = TRAIN_SIZE // BATCH_SIZE       # main.py: drop_last=True (99 steps)
EPOCHS = 200                                     # main.py: --epochs default 200


def get_config(arg=None):
  config = config_lib.sibling_config(__file__, "shapes.py", arg)
  config.dataset.name = "nyuv2"
  config.dataset.image_size = (288, 384)         # main.py: process_preds img_size
  config.dataset.augment = ()                    # main.py: --aug default False
  config.dataset.num_workers = 4
  config.dataset.loader = "threads"
  config.tasks = ("segmentation", "depth", "normals")   # main.py: task_dict
  config.model.backbone = "resnet50"             # main.py: resnet_dilated('resnet50')
  config.model.width = 64
  config.model.output_stride = 8                 # resnet_dilated: dilate_scale=8
  config.model.stem = "imagenet"
  config.model.head = "deeplab"                  # main.py: DeepLabHead(2048, classes)
  config.model.head_hidden = 256                 # aspp.py: out_channels = 256
  config.model.input_norm = "none"               # create_dataset.py: images as stored
  config.model.pretrained = ""                   # resnet.py: resnet50-19c8e357.pth (a file)
  config.optimizer.name = "adam"                 # LibMTL/config.py: --optim default 'adam'
  config.optimizer.learning_rate = 1e-4          # LibMTL/config.py: --lr default 1e-4
  config.optimizer.weight_decay = 1e-5           # LibMTL/config.py: --weight_decay default 1e-5
  config.optimizer.schedule = "step"             # README: --scheduler step (StepLR)
  config.optimizer.step_size = 100 * STEPS_PER_EPOCH   # LibMTL/config.py: --step_size 100
  config.optimizer.gamma = 0.5                   # LibMTL/config.py: --gamma 0.5
  config.optimizer.warmup_steps = 0
  config.optimizer.grad_clip = 0.0
  config.batch_size = BATCH_SIZE
  config.eval_batch_size = 8                     # main.py: --test_bs default 8
  config.num_steps = EPOCHS * STEPS_PER_EPOCH
  config.log_every = STEPS_PER_EPOCH
  config.eval_every = STEPS_PER_EPOCH            # LibMTL/trainer.py: self.test every epoch
  config.checkpoint_every = STEPS_PER_EPOCH
  return config
