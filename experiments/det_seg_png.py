"""The evaluation PNG of a det_seg run: predicted boxes (class, score) and segmentation over the
image, next to the ground truth, for the first validation images.

    python3 experiments/det_seg_png.py --config experiments/configs/det_seg.py \
        --workdir workdirs/det_seg --out workdirs/det_seg/predictions.png

Restores the newest checkpoint of ``--workdir`` (written by ``mtjax train`` with the same
config). It made ``experiments/results/det_seg/predictions_ew.png``, before the loop's own
prediction grid drew detections: now every run writes ``predictions/step_<N>.png`` with the
same boxes and segmentation (``config.prediction_images``), and ``mtjax eval`` redraws it.
"""

import argparse

import jax
import numpy as np

from mtjax import data
from mtjax.tasks.detection_plot import detection_panel
from mtjax.train import loop, setup


def _config(path):
  import importlib.util

  file, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location("det_seg_config", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def main():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--images", type=int, default=4)
  args = parser.parse_args()
  cfg = _config(args.config)
  run = setup.resolve(cfg)
  exp = run.experiment
  trainer = setup.make_trainer(cfg, exp, run.mesh, run.step_options)
  state = loop.initial_state(run, trainer, args.workdir, loop.check_workdir(run, args.workdir))
  arrays = setup.load_data(cfg, "validation", (*exp.label_keys, "segmentation", "boxes",
                                               "box_classes"))
  batch = {k: v[:args.images] for k, v in arrays.items()}
  outputs = exp.model.apply({"params": state.params, "batch_stats": state.batch_stats},
                            batch["image"], train=False)
  detections = jax.device_get(exp.tasks["detection"].predict_fn(outputs["detection"]))
  segmentation = (np.asarray(jax.device_get(outputs["segmentation"])).argmax(-1)
                  if "segmentation" in outputs else None)
  names = data.dataset_info(cfg.dataset.name)["class_names"]
  fig, axes = plt.subplots(2, args.images, figsize=(2.4 * args.images, 5.0), squeeze=False)
  for i in range(args.images):
    detection_panel(axes[:, i], batch["image"][i],
                    truth={"boxes": batch["boxes"][i], "box_classes": batch["box_classes"][i]},
                    prediction={k: v[i] for k, v in detections.items()}, class_names=names,
                    seg_truth=batch["segmentation"][i],
                    seg_prediction=None if segmentation is None else segmentation[i])
  fig.suptitle(f"det_seg, step {int(state.step)}, method {cfg.weighting.name}: ground truth "
               "(top), prediction (bottom)", fontsize=9)
  fig.tight_layout()
  fig.savefig(args.out, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
