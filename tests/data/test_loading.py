"""The TFDS builder (built and read without TensorFlow) and ``load_split``."""

import numpy as np
import pytest

from mtjax.data import dataset_info, load_split, shapes, shapes_tfds

SIZES = {"train": 8, "validation": 4, "test": 3}
HW = (32, 32)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def builder(data_dir):
  config = shapes_tfds.make_config(*HW, split_sizes=SIZES)
  b = shapes_tfds.MtjaxShapes(config=config, data_dir=data_dir)
  b.download_and_prepare()
  return b


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype, k
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_builder_reads_back_exactly_the_rendered_scenes(builder):
  assert builder.info.file_format.value == "array_record"
  for split, n in SIZES.items():
    source = builder.as_data_source(split)
    assert len(source) == n
    for i in range(n):   # in index order (no shuffling), bit-identical after decoding
      _assert_same(shapes_tfds.decode_example(source[i]), shapes_tfds.render_example(split, i, *HW))


def test_splits_are_different_scenes(builder):
  train = builder.as_data_source("train")[0]["image"]
  val = builder.as_data_source("validation")[0]["image"]
  assert not np.array_equal(train, val)


def test_load_split_stacks_the_split(builder, data_dir):
  del builder   # built already: load_split reuses it
  out = load_split("shapes", "train", image_size=HW, data_dir=data_dir, split_sizes=SIZES)
  expected = [shapes_tfds.render_example("train", i, *HW) for i in range(SIZES["train"])]
  _assert_same(out, {k: np.stack([e[k] for e in expected]) for k in expected[0]})
  assert out["image"].shape == (8, *HW, 3) and out["boxes"].shape == (8, 4, 4)
  first = load_split("shapes", "test", image_size=HW, data_dir=data_dir, split_sizes=SIZES,
                     num_examples=2)
  assert first["segmentation"].shape == (2, *HW)
  np.testing.assert_array_equal(
      first["depth"][1], shapes_tfds.render_example("test", 1, *HW)["depth"])


def test_load_split_builds_into_the_env_data_dir(tmp_path, monkeypatch):
  monkeypatch.setenv("MTJAX_DATA_DIR", str(tmp_path))
  sizes = {"train": 2, "validation": 1, "test": 1}
  out = load_split("shapes", "validation", image_size=(16, 24), split_sizes=sizes)
  assert out["image"].shape == (1, 16, 24, 3)
  assert (tmp_path / "mtjax_shapes" / shapes_tfds.config_name(16, 24, 4, sizes)).is_dir()


@pytest.mark.parametrize("kwargs, field", [
    (dict(name="nope"), "name"),
    (dict(split="val"), "split"),
    (dict(image_size=(4, 32)), "image_size"),
    (dict(image_size=64), "image_size"),
    (dict(num_examples=0), "num_examples"),
    (dict(num_examples=SIZES["train"] + 1), "num_examples"),
    (dict(split_sizes={"eval": 3}), "split_sizes"),
    (dict(split_sizes={"train": 0}), "split_sizes"),
])
def test_errors_name_the_field_and_the_allowed_values(builder, data_dir, kwargs, field):
  del builder
  args = dict(name="shapes", split="train", image_size=HW, data_dir=data_dir,
              split_sizes=SIZES) | kwargs
  with pytest.raises(ValueError, match=f"^{field}:.*allowed|^{field}:.*valid") as e:
    load_split(args.pop("name"), args.pop("split"), **args)
  if field == "name":
    assert "shapes" in str(e.value)
  if field == "split":
    assert "validation" in str(e.value)


def test_dataset_info():
  info = dataset_info("shapes")
  assert info["class_names"] == shapes.CLASS_NAMES
  assert {"segmentation", "depth", "normals", "classification", "detection"} <= set(info["tasks"])
  # Each task's own class count: segmentation counts the background, the labels do not.
  assert info["tasks"]["segmentation"] == {"num_classes": 5}
  assert info["tasks"]["classification"] == {"num_classes": 4}
  assert info["tasks"]["depth"] == {}
  assert info["splits"] == ("train", "validation", "test")
  with pytest.raises(ValueError, match=r"name: unknown dataset 'nyu'"):
    dataset_info("nyu")
