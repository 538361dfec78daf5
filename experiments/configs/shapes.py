"""The default experiment: segmentation, depth and normals on the embedded shapes dataset.

    mtjax train --config experiments/configs/shapes.py --workdir workdirs/shapes
    mtjax train --config experiments/configs/shapes.py:pcgrad --workdir workdirs/pcgrad \
        --config.grad_level=representation

The argument after ``:`` names the weighting method; its hyperparameters become fields of
``config.weighting`` with the paper's defaults, overridable on the command line.
"""

import ml_collections

from mtjax.config import weighting_config


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.dataset = ml_collections.ConfigDict({
      "name": "shapes", "image_size": (64, 64), "data_dir": "",
      "split_sizes": {"train": 4000, "validation": 500, "test": 500}})
  config.tasks = ("segmentation", "depth", "normals")
  # architecture: one of mtjax.models.names() ("hard": one backbone, one head per task); its
  # hyperparameters are further config.model fields (mtjax.config.model_config adds them).
  config.model = ml_collections.ConfigDict({
      "architecture": "hard", "backbone": "resnet_tiny", "width": 16, "output_stride": 4,
      "stem": "small", "head_hidden": 64, "dtype": "float32"})
  config.weighting = weighting_config(arg or "ew")
  config.grad_level = "parameter"  # or "representation": where gradient methods act
  # > 0: at the parameter level, the Gram matrix of a Gram-matrix method (mgda, imtl, ...) is
  # computed this many tasks at a time (bounded memory for many tasks, one more backward pass).
  config.task_chunk = 0
  # The device mesh: the batch is split over data x fsdp devices, parameters and optimizer
  # state over fsdp (FSDP); -1: the devices left. fsdp=1: pure data parallelism.
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
  # Meta-level methods (auto_lambda): the split their meta batches are drawn from (an
  # independent order); "validation" holds it out, but then validation metrics are not held out.
  config.meta_split = "train"
  config.optimizer = ml_collections.ConfigDict({
      "name": "adam", "learning_rate": 5e-3, "schedule": "warmup_cosine", "warmup_steps": 50,
      "momentum": 0.9, "weight_decay": 0.0, "grad_clip": 0.0,
      # Parameter groups are the model's labels ("shared", "shared/stage2", a task name):
      # ((prefix, scale), ...) scales their learning rate; (prefix, ...) freezes them.
      "lr_scale": (), "frozen": ()})
  # A step whose task losses, gradient or updated parameters are not finite: "stop" ends the
  # run with an error naming the step and the tasks (nothing non-finite is saved); "skip" skips
  # the update and counts it, and stops after max_consecutive_skips skips in a row.
  config.nonfinite = "stop"
  config.max_consecutive_skips = 10
  # How the parameter groups train over the steps (mtjax/train/strategies.py): "end_to_end",
  # "alternating", "alternating_taskwise" or "progressive" (the last three: loss-level methods).
  config.strategy = "end_to_end"
  config.phases = ml_collections.ConfigDict({
      "specific_steps": 50, "shared_steps": 50,   # alternating: heads, then the shared part
      "initial_tasks": 1, "add_every": 100,       # progressive: tasks at step 0, then one more
      "freeze_shared": False})                    # progressive: freeze the backbone once adding
  # Task relations (mtjax/relations.py): gradient conflict at every logging step (conflict),
  # at conflict_level "auto" (a gradient method's own level; a loss-level method's, e.g. ew:
  # the shared features, ≈ 0.3 s more a logging step of this model on the 2-core CPU), or
  # "parameter" / "representation" (the parameter level costs a loss-level method a per-task
  # backward pass through the backbone, ≈ 15-33 s a logging step here); TAG's inter-task
  # affinity every affinity_every steps (0: off) with the lookahead rate affinity_lr (0: the
  # optimizer's learning rate at the step). A pair of tasks counts as conflicting in
  # conflict/fraction when its gradient cosine is below conflict_threshold (-0.05:
  # mtjax.relations.CONFLICT_THRESHOLD says why; 0 is PCGrad's cos < 0). None of them changes
  # the training trajectory.
  config.relations = ml_collections.ConfigDict({
      "conflict": True, "conflict_level": "auto", "conflict_threshold": -0.05,
      "affinity_every": 0, "affinity_lr": 0.0})
  config.batch_size = 32
  config.num_steps = 1000
  config.log_every = 50
  config.eval_every = 100  # validation metrics 10 times a run: curves, not two points
  config.checkpoint_every = 500
  config.keep_checkpoints = 2
  # At each evaluation, predictions/step_<N>.png: this many validation images with every task's
  # target and prediction (0: none). TensorBoard event files next to metrics.jsonl (needs the
  # optional extra: pip install 'mtjax[tensorboard]').
  config.prediction_images = 4
  config.tensorboard = False
  # XLA's deterministic GPU kernels: the same config and seed give the same bits on a GPU too
  # (mtjax.runtime; no effect on a CPU). The persistent compilation cache: "auto" (JAX's own
  # setting, $JAX_COMPILATION_CACHE_DIR, else ~/.cache/mtjax/jax), "none", or a folder.
  config.deterministic = True
  config.compilation_cache = "auto"
  config.eval_batch_size = 128  # a multiple of the device count (1, 2, 4, 8, …)
  # Single-task results of the same model, steps and seed (Δm% is computed against them).
  config.baselines = ml_collections.ConfigDict()
  return config
