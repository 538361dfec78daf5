"""The loop reads only the keys a run needs, and a large embedded dataset lazily."""

import numpy as np

from mtjax import data
from mtjax.data import loading, sources
from mtjax.train import setup
from tests import helpers


def test_load_data_picks_keys_first_and_reads_a_large_split_lazily(tmp_path, monkeypatch):
  cfg = helpers.tiny_det_seg_config(tmp_path)
  exp = setup.build(cfg)
  whole = setup.load_data(cfg, "train", exp.label_keys)
  assert isinstance(whole, dict)      # 8 examples at 32x32: read whole
  assert "depth" not in whole and "normals" not in whole and "instances" not in whole
  assert {"image", "segmentation", "boxes", "box_classes"} <= set(whole)
  every = data.load_split("shapes", "train", image_size=(32, 32), data_dir=str(tmp_path),
                          split_sizes=dict(cfg.dataset.split_sizes))
  for key, value in whole.items():
    np.testing.assert_array_equal(value, every[key])
  example_bytes = sum(v[0].nbytes for v in whole.values())
  monkeypatch.setattr(loading, "IN_MEMORY_BYTES", 8 * example_bytes - 1)  # one byte too few
  lazy = setup.load_data(cfg, "train", exp.label_keys)
  assert isinstance(lazy, sources.Source) and lazy.size == 8
  fifth = sources.read_examples(lazy, [5])[0]
  assert set(fifth) == set(whole)
  for key, value in fifth.items():
    np.testing.assert_array_equal(value, whole[key][5])
