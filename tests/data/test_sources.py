"""Datasets on disk: NYUv2 and Cityscapes in their real layouts, written here in miniature."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from mtjax import config as config_lib
from mtjax import data, tasks
from mtjax.data import pipeline, sources
from mtjax.errors import UserError

HW = (12, 16)


def _preprocessed_example(rng, num_classes, normals):
  """As MTAN/LibMTL store them: float64 image HWC, float label with -1, depth HW1 0 = none."""
  label = rng.integers(-1, num_classes, HW).astype(np.float64)
  depth = rng.uniform(0.5, 10.0, (*HW, 1))
  depth[0, :3] = 0.0                                    # no depth here
  out = {"image": rng.uniform(0, 1, (*HW, 3)), "label": label, "depth": depth}
  if normals:
    n = rng.normal(size=(*HW, 3))
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    n[1, :2] = 0.0                                      # no normal here
    out["normal"] = n.astype(np.float32)
  return out


@pytest.fixture(scope="module")
def nyu_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("nyuv2"))
  rng = np.random.default_rng(0)
  for split, n in (("train", 6), ("val", 3)):
    sources.write_preprocessed(root, split, [_preprocessed_example(rng, 13, True)
                                             for _ in range(n)])
  return root


def test_nyuv2_reads_the_libmtl_layout(nyu_root):
  info = data.dataset_info("nyuv2")
  assert set(info["tasks"]) == {"segmentation", "depth", "normals"}
  assert info["tasks"]["segmentation"] == {"num_classes": 13} and len(info["class_names"]) == 13
  source = data.open_split("nyuv2", "train", data_dir=nyu_root)
  assert source.size == 6
  for i in (0, 5):
    ex = source.read(i)
    raw = {k: np.load(os.path.join(nyu_root, "train", k, f"{i}.npy"))
           for k in ("image", "label", "depth", "normal")}
    assert ex["image"].dtype == np.float32 and ex["image"].shape == (*HW, 3)
    np.testing.assert_allclose(ex["image"], raw["image"], rtol=1e-6)
    assert ex["segmentation"].dtype == np.int32
    np.testing.assert_array_equal(ex["segmentation"] == 255, raw["label"] == -1)
    np.testing.assert_array_equal(ex["segmentation"][raw["label"] >= 0],
                                  raw["label"][raw["label"] >= 0])
    assert ex["depth"].shape == HW and ex["depth"].dtype == np.float32
    np.testing.assert_array_equal(ex["depth_valid"], raw["depth"][..., 0] != 0)
    assert not ex["depth_valid"][0, :3].any() and ex["depth_valid"][1:].all()
    np.testing.assert_array_equal(ex["normals_valid"], raw["normal"].sum(-1) != 0)
    assert not ex["normals_valid"][1, :2].any()
  # validation and test are both val/ (the papers report on it); stacked reads agree
  val = data.load_split("nyuv2", "validation", data_dir=nyu_root)
  test = data.load_split("nyuv2", "test", data_dir=nyu_root)
  assert val["image"].shape == (3, *HW, 3)
  np.testing.assert_array_equal(val["depth"], test["depth"])


def test_nyuv2_batch_feeds_the_tasks_and_masks_what_is_missing(nyu_root):
  source = pipeline.select(data.open_split("nyuv2", "train", data_dir=nyu_root),
                           ("segmentation", "depth", "depth_valid", "normals"))
  batch = pipeline.train_batch(source, seed=0, step=1, batch_size=4)
  assert set(batch) == {"image", "segmentation", "depth", "depth_valid", "normals",
                        "normals_valid"}
  info = data.dataset_info("nyuv2")["tasks"]
  built = {n: tasks.get(n, **info[n]) for n in info}
  tasks.check_batch(built, batch, HW, 4)
  rng = np.random.default_rng(1)
  # Predictions that are exact wherever a label exists: every loss is 0 (masked pixels,
  # whatever garbage they hold, count for nothing).
  logits = np.where(np.arange(13) == np.where(batch["segmentation"] == 255, 0,
                                               batch["segmentation"])[..., None], 50.0, -50.0)
  logits[batch["segmentation"] == 255] = rng.normal(size=13)
  depth = np.where(batch["depth_valid"], batch["depth"], 99.0)[..., None]
  normals = np.where(batch["normals_valid"][..., None], batch["normals"], rng.normal(size=3))
  assert float(built["segmentation"].loss_fn(logits, batch)) < 1e-6
  assert float(built["depth"].loss_fn(depth, batch)) == 0.0
  assert float(built["normals"].loss_fn(normals, batch)) < 1e-6


def test_missing_dataset_names_the_folder_and_the_layout(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nope.*image,label,depth,normal.*N.npy"):
    data.open_split("nyuv2", "train", data_dir=str(tmp_path / "nope"))
  os.makedirs(tmp_path / "nyu" / "train" / "image")
  with pytest.raises(FileNotFoundError, match=r"train/image"):
    data.open_split("nyuv2", "train", data_dir=str(tmp_path / "nyu"))
  rng = np.random.default_rng(0)
  sources.write_preprocessed(str(tmp_path / "nyu"), "train",
                             [_preprocessed_example(rng, 13, True) for _ in range(2)])
  os.remove(tmp_path / "nyu" / "train" / "depth" / "1.npy")
  with pytest.raises(ValueError, match=r"depth: 1 files, but image/ has 2"):
    data.open_split("nyuv2", "train", data_dir=str(tmp_path / "nyu"))


def test_cityscapes_preprocessed_7_and_19_classes(tmp_path):
  rng = np.random.default_rng(2)
  examples = [_preprocessed_example(rng, 19, False) for _ in range(2)]
  for split in ("train", "val"):
    sources.write_preprocessed(str(tmp_path / "mtan"), split, examples, label_dir="label_19")
    sources.write_preprocessed(str(tmp_path / "mtan"), split,
                               [{"label": np.minimum(e["label"], 6)} for e in examples],
                               label_dir="label_7")
    sources.write_preprocessed(str(tmp_path / "libmtl"), split,
                               [{**e, "label": np.minimum(e["label"], 6)} for e in examples])
  for name, root, classes in (("cityscapes", "mtan", 7), ("cityscapes", "libmtl", 7),
                              ("cityscapes_19", "mtan", 19)):
    assert data.dataset_info(name)["tasks"] == {"segmentation": {"num_classes": classes},
                                                "depth": {}}
    ex = data.open_split(name, "validation", data_dir=str(tmp_path / root)).read(1)
    assert set(ex) == {"image", "segmentation", "depth", "depth_valid"}
    labels = ex["segmentation"][ex["segmentation"] != 255]
    assert labels.max() == classes - 1 and labels.min() == 0
  with pytest.raises(FileNotFoundError, match="label_19"):
    data.open_split("cityscapes_19", "train", data_dir=str(tmp_path / "libmtl"))


def test_a_task_the_dataset_does_not_label_is_a_config_error():
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).parents[2] / "experiments" / "configs" / "shapes.py"
  spec = importlib.util.spec_from_file_location("shapes_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  cfg.dataset.name = "cityscapes"
  with pytest.raises(UserError, match=r"config.tasks: got 'normals'.*labels: \['depth', "
                                      r"'segmentation'\]"):
    config_lib.validate(cfg)


def _png(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def official_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("cityscapes")
  h, w = 16, 32
  stem = "aachen_000000_000019"
  image = np.random.default_rng(3).integers(0, 256, (h, w, 3), dtype=np.uint8)
  label_ids = np.full((h, w), 7, np.uint8)          # road -> train id 0
  label_ids[:4] = 0                                  # unlabeled -> 255
  label_ids[8:12, 4:12] = 26                           # a car -> train id 13
  label_ids[8:16, 20:24] = 24                         # a person -> 11
  label_ids[4:6, 26:31] = 24                          # a group of persons (id 24, no instance)
  instances = label_ids.astype(np.uint16)          # 16-bit PNGs, as released
  instances[8:12, 4:12] = 26000
  instances[8:16, 20:24] = 24001
  disparity = np.zeros((h, w), np.uint16)            # 0: no disparity
  disparity[h // 2:] = 257                           # disparity (257 - 1) / 256 = 1 px
  for split in ("train", "val"):
    _png(root / "leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png", image)
    _png(root / "gtFine" / split / "aachen" / f"{stem}_gtFine_labelIds.png", label_ids)
    _png(root / "gtFine" / split / "aachen" / f"{stem}_gtFine_instanceIds.png", instances)
    _png(root / "disparity" / split / "aachen" / f"{stem}_disparity.png", disparity)
    os.makedirs(root / "camera" / split / "aachen", exist_ok=True)
    with open(root / "camera" / split / "aachen" / f"{stem}_camera.json", "w") as f:
      json.dump({"extrinsic": {"baseline": 0.2}, "intrinsic": {"fx": 2000.0}}, f)
  return str(root), image


def test_cityscapes_official_layout(official_root):
  root, image = official_root
  source = data.open_split("cityscapes_official", "train", image_size=(16, 32), data_dir=root)
  assert source.size == 1
  ex = source.read(0)
  np.testing.assert_allclose(ex["image"], image / 255.0, rtol=1e-6)
  seg = ex["segmentation"]
  assert seg.dtype == np.int32 and (seg[:4] == 255).all() and seg[15, 0] == 0
  assert (seg[8:12, 4:12] == 13).all() and (seg[8:16, 20:24] == 11).all()
  np.testing.assert_array_equal(ex["depth_valid"], np.arange(16)[:, None] >= 8 + 0 * seg)
  np.testing.assert_allclose(ex["depth"][8:], 0.2 * 2000.0)   # baseline fx / disparity
  assert (ex["depth"][:8] == 0).all()
  # boxes of the two thing instances (instance-id order), classes train id + 1
  np.testing.assert_allclose(ex["boxes"][:2], [[4 / 8, 10 / 16, 1.0, 12 / 16],
                                               [4 / 8, 2 / 16, 6 / 8, 6 / 16]])
  assert ex["box_classes"][:4].tolist() == [12, 14, 12, 0]
  # then the group region of persons: an ignore box (Cityscapes' instance evaluation ignores it)
  np.testing.assert_allclose(ex["boxes"][2], [4 / 16, 26 / 32, 6 / 16, 31 / 32])
  assert ex["box_ignore"][:4].tolist() == [0, 0, 1, 0]
  with pytest.raises(ValueError, match=r"2 thing instances and 1 group regions, more than "
                                       r"max_boxes=2 .*sources.MAX_BOXES"):
    sources.instance_boxes(np.asarray(Image.open(
        os.path.join(root, "gtFine/train/aachen/aachen_000000_000019_gtFine_instanceIds.png")),
        np.int32), max_boxes=2)
  small = data.open_split("cityscapes_official", "validation", image_size=(8, 16),
                          data_dir=root).read(0)
  assert small["image"].shape == (8, 16, 3) and small["segmentation"].shape == (8, 16)
  assert set(np.unique(small["segmentation"])) <= {0, 11, 13, 255}   # nearest: no new ids
  np.testing.assert_array_equal(small["boxes"], ex["boxes"])
  with pytest.raises(FileNotFoundError, match=r"leftImg8bit.*gtFine"):
    data.open_split("cityscapes_official", "train", data_dir=root + "/nope")


def _protocol_config(name):
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).parents[2] / "experiments" / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"{name}_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("pcgrad")


def test_protocol_configs_validate_and_read_their_dataset(nyu_root, tmp_path):
  from mtjax.train import loop
  for name, size, batch in (("nyuv2", (288, 384), 8), ("cityscapes", (128, 256), 64)):
    cfg = _protocol_config(name)
    config_lib.validate(cfg)
    assert tuple(cfg.dataset.image_size) == size and cfg.batch_size == batch
    assert cfg.optimizer.learning_rate == 1e-4 and cfg.weighting.name == "pcgrad"
    assert cfg.num_steps == 200 * cfg.eval_every          # 200 epochs, evaluated each epoch
    cfg.dataset.data_dir = str(tmp_path / "absent")
    with pytest.raises(UserError, match=r"config.dataset.data_dir: dataset folder .*absent.* "
                                        r"does not exist.*expected the layout"):
      loop.load_data(cfg, "train", ())
  cfg = _protocol_config("nyuv2")
  cfg.dataset.data_dir, cfg.dataset.image_size, cfg.batch_size = nyu_root, HW, 4
  exp_keys = ("segmentation", "depth", "depth_valid", "normals")
  train = loop.load_data(cfg, "train", exp_keys)
  assert isinstance(train, sources.Source) and train.size == 6
  info = data.dataset_info("nyuv2")["tasks"]
  tasks.check_batch({n: tasks.get(n, **info[n]) for n in cfg.tasks},
                    pipeline.train_batch(train, seed=0, step=0, batch_size=4), HW, 4)


def test_the_prediction_grid_reads_only_its_first_examples_of_a_lazy_split():
  """``loop.first_examples``: a dataset read lazily (NYUv2, Cityscapes) gives the prediction grid
  its first n examples without reading the rest; arrays in memory are sliced; n <= 0: None."""
  from mtjax.train import loop

  arrays = {"image": np.arange(10 * 2, dtype=np.float32).reshape(10, 2),
            "depth": np.arange(10, dtype=np.float32)}
  read = []
  lazy = sources.Source(10, lambda i: (read.append(i), {k: v[i] for k, v in arrays.items()})[1])
  got = loop.first_examples(lazy, 3)
  assert read == [0, 1, 2]
  for key, value in arrays.items():
    np.testing.assert_array_equal(got[key], value[:3])
  assert loop.first_examples(lazy, 0) is None and len(read) == 3
  np.testing.assert_array_equal(loop.first_examples(arrays, 20)["depth"], arrays["depth"])
