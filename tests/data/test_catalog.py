"""TFDS catalog datasets through tfds.testing.mock_data (no TensorFlow, nothing downloaded)."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mtjax import config as config_lib
from mtjax import data, tasks
from mtjax.data import catalog, pipeline
from mtjax.train import loop


@pytest.fixture
def mocked():
  with tfds.testing.mock_data(num_examples=12):
    yield


def test_celeba_40_attributes_as_40_tasks(mocked):
  info = data.dataset_info("celeb_a")
  assert len(info["tasks"]) == 40 and "attr_smiling" in info["tasks"]
  raw = tfds.data_source("celeb_a", split="train")
  assert set(raw[0]["attributes"]) == set(catalog.CELEBA_ATTRIBUTES)
  source = data.open_split("celeb_a", "train", image_size=(16, 16))
  batch = pipeline.train_batch(source, seed=0, step=0, batch_size=4)
  assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.float32
  assert 0 <= batch["image"].min() and batch["image"].max() <= 1
  assert batch["attributes"].shape == (4, 40) and batch["attributes"].dtype == np.float32
  idx = pipeline.batch_indices(source.size, seed=0, step=0, batch_size=4)
  smiling = catalog.CELEBA_ATTRIBUTES.index("Smiling")
  np.testing.assert_array_equal(batch["attributes"][:, smiling],
                                [float(raw[int(i)]["attributes"]["Smiling"]) for i in idx])
  built = {n: tasks.get(n, **o) for n, o in info["tasks"].items()}
  tasks.check_batch(built, batch, (16, 16), 4)
  # Task "attr_smiling" reads its column only: perfect logits there give accuracy 1.
  logits = np.where(batch["attributes"][:, smiling:smiling + 1] > 0, 9.0, -9.0)
  correct, count = built["attr_smiling"].metrics_fn(logits, batch)["accuracy"]
  assert float(correct) == float(count) == 4.0


def test_multi_mnist_overlays_two_digits(mocked):
  info = data.dataset_info("multi_mnist")
  assert info["tasks"] == catalog.MULTI_MNIST_TASKS
  raw = tfds.data_source("mnist", split="train")
  train = data.open_split("multi_mnist", "train", image_size=(36, 36))
  val = data.open_split("multi_mnist", "validation", image_size=(36, 36))
  assert train.size + val.size == len(raw) and val.size == len(raw) // 10
  ex = train.read(3)
  assert ex["image"].shape == (36, 36, 3) and ex["digit_left"].dtype == np.int32
  assert int(ex["digit_left"]) == int(raw[3]["label"])
  left = raw[3]["image"][..., 0].astype(np.float32) / 255
  # The top-left 8×8 only the left digit reaches; the bottom-right 8×8 only the right one.
  np.testing.assert_allclose(ex["image"][:8, :8, 0], left[:8, :8], rtol=1e-6)
  right = [r for r in range(len(raw)) if np.allclose(
      raw[r]["image"][20:, 20:, 0] / 255, ex["image"][28:, 28:, 0])]
  assert any(int(raw[r]["label"]) == int(ex["digit_right"]) for r in right)
  small = data.open_split("multi_mnist", "test", image_size=(28, 28)).read(0)
  assert small["image"].shape == (28, 28, 3)
  built = {n: tasks.get(n, **o) for n, o in info["tasks"].items()}
  batch = pipeline.train_batch(train, seed=0, step=0, batch_size=4)
  tasks.check_batch(built, batch, (36, 36), 4)
  logits = np.eye(10)[batch["digit_right"]] * 30
  assert float(built["digit_right"].loss_fn(logits, batch)) < 1e-3


def test_celeba_config_validates_and_an_unprepared_dataset_says_how(tmp_path):
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).parents[2] / "experiments" / "configs" / "celeba.py"
  spec = importlib.util.spec_from_file_location("celeba_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  config_lib.validate(cfg)
  assert len(cfg.tasks) == 40 and tuple(cfg.dataset.image_size) == (64, 64)
  cfg.dataset.data_dir = str(tmp_path)
  with pytest.raises(ValueError, match=r"config.dataset.data_dir: TFDS dataset 'celeb_a' is "
                                       r"not prepared.*tfds build celeb_a "
                                       r"--file_format=array_record"):
    loop.load_data(cfg, "train", ())


def test_voc_boxes_and_classes(mocked):
  raw = tfds.data_source("voc/2012", split="train")[1]
  ex = data.open_split("voc_2012", "train", image_size=(24, 24)).read(1)
  assert ex["image"].shape == (24, 24, 3) and ex["boxes"].shape == (catalog.MAX_BOXES, 4)
  n = min(len(raw["objects"][k]) for k in ("bbox", "label", "is_difficult"))
  np.testing.assert_array_equal(ex["boxes"][:n], raw["objects"]["bbox"][:n])
  np.testing.assert_array_equal(ex["box_classes"][:n], raw["objects"]["label"][:n] + 1)
  assert (ex["box_classes"][n:] == 0).all() and ex["box_classes"].dtype == np.int32
  # VOC's `difficult` objects are ignore regions (box_ignore 1), for the loss and the evaluation
  np.testing.assert_array_equal(ex["box_ignore"][:n], raw["objects"]["is_difficult"][:n])
  assert (ex["box_ignore"][n:] == 0).all()
  assert data.dataset_info("voc_2012")["tasks"] == {
      "detection": {"num_classes": 20, "max_boxes": catalog.MAX_BOXES, "ignore_regions": True,
                    "evaluation": "voc"}}
  # No silent truncation: more objects than label rows is an error naming the count.
  three = {"bbox": np.full((3, 4), 0.5, np.float32), "label": np.zeros(3, np.int64),
           "is_difficult": np.zeros(3, bool)}
  with pytest.raises(ValueError, match=r"voc: an image has 3 objects, more than max_boxes=2"):
    catalog.voc_example(dict(raw, objects=three), (24, 24), max_boxes=2)
