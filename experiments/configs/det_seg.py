"""Object detection (FCOS) jointly with semantic segmentation on one shared ResNet.

    mtjax train --config experiments/configs/det_seg.py --workdir workdirs/det_seg
    mtjax train --config experiments/configs/det_seg.py:pcgrad --workdir workdirs/det_seg_pcgrad
    # single-task rows: --config.tasks='("segmentation",)'  or  '("detection",)'

ResNet-50 at 512×512 on one GPU (the image with jax 0.11.2; not run yet), from a checkout:

    pip install -e ".[detection,torch]"     # faster-coco-eval, safetensors; torch reads .pth
    mtjax train --config experiments/configs/det_seg.py:gpu,ew --workdir workdirs/det_seg_r50 \
        --config.model.pretrained=resnet50-0676ba61.pth --config.model.frozen_bn=True

(``resnet50-0676ba61.pth``: torchvision's ``ResNet50_Weights.IMAGENET1K_V1`` file, or the same
tensors as ``.safetensors``, which needs no torch; another method: ``det_seg.py:gpu,pcgrad``.)

The argument after ``:`` is a comma-separated list: a weighting method (default ``ew``) and
optionally ``gpu``. The CPU default is a small ResNet (``resnet_tiny``, width 16, 3×3/2 stem) on
64×64 images: of its three stages (strides 2, 4, 8) the two of stride ≥ 4 feed the FCOS pyramid
(two levels, P of stride 4 and 8: the head's ``min_stride``), its last one the segmentation
head. ``gpu``: ResNet-50 with the ImageNet stem at 512×512, the pyramid on C3–C5
(strides 8, 16, 32), batch 32 — with ``config.model.pretrained`` pointing at torchvision's
ImageNet weights (``.pth`` or ``.safetensors``), optionally ``config.model.frozen_bn=True``.
The embedded dataset is rendered at that size on first use (not timed at 512×512 yet).
Each evaluation, and the end of the run, writes ``predictions/step_<N>.png``: the first
``prediction_images`` validation images with the ground-truth and predicted boxes (class,
score) over the image and its segmentation.
"""

import ml_collections

from mtjax.config import weighting_config


def get_config(arg=None):
  options = [a for a in (arg or "").split(",") if a]
  gpu = "gpu" in options
  methods = [a for a in options if a != "gpu"]
  config = ml_collections.ConfigDict()
  config.seed = 0
  size = (512, 512) if gpu else (64, 64)
  config.dataset = ml_collections.ConfigDict({
      "name": "shapes", "image_size": size, "data_dir": "",
      "split_sizes": {"train": 4000, "validation": 500, "test": 500}})
  config.tasks = ("detection", "segmentation")
  config.model = ml_collections.ConfigDict({
      "backbone": "resnet50" if gpu else "resnet_tiny", "width": 64 if gpu else 16,
      "output_stride": 32, "stem": "imagenet" if gpu else "small",
      "head_hidden": 128 if gpu else 32, "dtype": "bfloat16" if gpu else "float32",
      # A torchvision ResNet state dict (.pth, needs torch) or .safetensors file; "" for none.
      # torchvision's ImageNet weights expect its mean/std normalisation (inside the model).
      "pretrained": "", "frozen_bn": False, "input_norm": "imagenet" if gpu else "none"})
  config.weighting = weighting_config(methods[0] if methods else "ew")
  config.grad_level = "parameter"
  config.task_chunk = 0
  config.meta_split = "train"
  config.optimizer = ml_collections.ConfigDict({
      "name": "adam", "learning_rate": 2e-3, "schedule": "warmup_cosine", "warmup_steps": 100,
      "momentum": 0.9, "weight_decay": 0.0, "grad_clip": 10.0, "lr_scale": (), "frozen": ()})
  config.nonfinite = "stop"
  config.max_consecutive_skips = 10
  config.batch_size = 32 if gpu else 16
  config.num_steps = 5000 if gpu else 800
  config.log_every = 50
  config.eval_every = 0
  config.checkpoint_every = 500
  config.keep_checkpoints = 1
  config.eval_batch_size = 64 if gpu else 100
  config.prediction_images = 4
  # Single-task rows of this CPU config (validation, 800 steps, seed 0:
  # experiments/results/det_seg/), the reference of Δm%; none for the gpu variant.
  config.baselines = ml_collections.ConfigDict() if gpu else ml_collections.ConfigDict({
      "detection": {"ap": 0.5759, "ap50": 0.7544},
      "segmentation": {"miou": 0.5902, "pixel_acc": 0.9264}})
  config.deterministic = True     # XLA's deterministic GPU kernels (mtjax.runtime)
  config.compilation_cache = "auto"  # the persistent compilation cache: "auto", "none", a folder
  return config
