"""CelebA: the 40 binary attributes as 40 tasks, 64×64 (Sener & Koltun, 2018).

    mtjax train --config experiments/configs/celeba.py:mgda --workdir workdirs/celeba_mgda \
        --config.dataset.data_dir=~/tensorflow_datasets

The setting of Sener & Koltun (2018, §5.2, their CelebA table: the error of each attribute and
the mean over the 40; also Nash-MTL's and FAMO's CelebA experiments): TFDS ``celeb_a``
(162,770 / 19,867 / 19,962 images, prepared once with ``tfds build celeb_a
--file_format=array_record``, which needs TensorFlow), images resized to 64×64, a ResNet-18
encoder shared by 40 linear binary heads. ../shared/REFERENCE.md holds no CelebA figures yet;
the numbers to compare with are in those papers' tables. Selection rule: the best validation
epoch (evaluated each epoch), reported on test.

Training values here (batch 256, Adam 1e-3, 50 epochs) are mtjax's choice where the papers'
code differs between them; change them on the command line.
"""


from mtjax import config as config_lib
from mtjax.data import catalog

STEPS_PER_EPOCH = 162770 // 256



def get_config(arg=None):
  config = config_lib.sibling_config(__file__, "shapes.py", arg)
  config.dataset.name = "celeb_a"
  config.dataset.image_size = (64, 64)
  config.dataset.augment = ()
  config.dataset.num_workers = 4
  config.dataset.loader = "threads"
  config.tasks = tuple(catalog.CELEBA_TASKS)
  config.model.backbone = "resnet18"
  config.model.width = 64
  config.model.output_stride = 32
  config.model.stem = "imagenet"
  config.model.head_hidden = 64
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.schedule = "constant"
  config.batch_size = 256
  config.eval_batch_size = 256
  config.num_steps = 50 * STEPS_PER_EPOCH
  config.log_every = STEPS_PER_EPOCH
  config.eval_every = STEPS_PER_EPOCH
  config.checkpoint_every = STEPS_PER_EPOCH
  return config
