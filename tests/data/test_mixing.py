"""Partial labels and the dataset sampler."""

import numpy as np
import pytest

from mtjax import tasks
from mtjax.data import mixing, sources

HW = (4, 6)


def _data(n, offset, keys):
  rng = np.random.default_rng(offset)
  out = {"image": rng.uniform(size=(n, *HW, 3)).astype(np.float32),
         "index": np.arange(offset, offset + n)}
  if "segmentation" in keys:
    out["segmentation"] = rng.integers(0, 3, (n, *HW)).astype(np.int32)
  if "depth" in keys:
    out["depth"] = rng.uniform(1, 2, (n, *HW)).astype(np.float32)
    out["depth_valid"] = np.ones((n, *HW), bool)
  return out


def test_probabilities_and_the_schedule():
  sizes = [100, 300]
  np.testing.assert_allclose(mixing.probabilities(sizes, "uniform"), [0.5, 0.5])
  np.testing.assert_allclose(mixing.probabilities(sizes, "proportional"), [0.25, 0.75])
  # annealed: proportional at the start, towards uniform (alpha 0.2) at the end
  np.testing.assert_allclose(mixing.probabilities(sizes, "annealed", 0, 11), [0.25, 0.75])
  end = mixing.probabilities(sizes, "annealed", 10, 11)
  np.testing.assert_allclose(end[1] / end[0], 3 ** 0.2)
  s = mixing.dataset_schedule(sizes, "proportional", seed=0, stop=6000, num_steps=6000)
  assert abs(np.mean(s == 1) - 0.75) < 0.03
  # a pure function of (seed, step): a prefix is the same, another seed differs
  np.testing.assert_array_equal(
      mixing.dataset_schedule(sizes, "proportional", seed=0, stop=5000, num_steps=6000),
      s[:5000])
  assert not np.array_equal(
      mixing.dataset_schedule(sizes, "proportional", seed=1, stop=6000, num_steps=6000), s)
  a = mixing.dataset_schedule(sizes, "annealed", seed=0, stop=6000, num_steps=6000)
  assert np.mean(a[:1000] == 1) > np.mean(a[-1000:] == 1) + 0.1
  with pytest.raises(ValueError, match=r"sampler: got 'greedy', allowed"):
    mixing.probabilities(sizes, "greedy")


def test_partial_labels_are_masked_out_of_loss_and_metrics():
  seg, depth = tasks.get("segmentation", num_classes=3), tasks.get("depth")
  specs = {"segmentation": seg.label_spec(HW), "depth": depth.label_spec(HW)}
  datasets = [(_data(8, 0, ("segmentation",)), ("segmentation",)),
              (sources.array_source(_data(12, 100, ("depth",))), ("depth",))]
  seen = {0: [], 1: []}
  for step in range(12):
    k, batch = mixing.mixed_batch(datasets, seed=0, step=step, batch_size=4,
                                  sampler="uniform", num_steps=12, label_specs=specs)
    seen[k].extend(batch["index"].tolist())
    assert set(batch) >= {"image", "segmentation", "depth", "depth_valid", "segmentation_mask",
                          "depth_mask"}
    missing = "depth" if k == 0 else "segmentation"
    assert (batch[f"{missing}_mask"] == 0).all()
    assert (batch[f"{'segmentation' if k == 0 else 'depth'}_mask"] == 1).all()
    if len(seen[k]) > 4:
      continue
    # The missing task contributes nothing, whatever the prediction.
    wild = np.full((4, *HW, 3), 7.0, np.float32)
    task = depth if missing == "depth" else seg
    assert float(task.loss_fn(wild[..., :1] if missing == "depth" else wild, batch)) == 0.0
    assert all(float(np.sum(c)) == 0 for _, c in task.metrics_fn(
        wild[..., :1] if missing == "depth" else wild, batch).values())
  # Each dataset goes through its own epochs: no example twice before all were seen.
  for k, n in ((0, 8), (1, 12)):
    first = seen[k][:n - n % 4]
    assert len(set(first)) == len(first)
  assert seen[0] and seen[1]


def test_plan_read_ahead_and_every_datasets_position():
  sizes = [8, 12]
  steps = mixing.plan(sizes, "annealed", seed=2, stop=40, num_steps=40)
  for k in range(2):   # the n-th draw of dataset k reads its n-th batch
    np.testing.assert_array_equal(steps.draw[steps.schedule == k],
                                  np.arange(np.sum(steps.schedule == k)))
  # annealed, vectorized over steps: each step's probabilities as probabilities() gives them
  np.testing.assert_allclose(mixing.probabilities(sizes, "annealed", np.arange(40), 40)[17],
                             mixing.probabilities(sizes, "annealed", 17, 40))
  seg, depth = tasks.get("segmentation", num_classes=3), tasks.get("depth")
  specs = {"segmentation": seg.label_spec(HW), "depth": depth.label_spec(HW)}
  datasets = [(_data(8, 0, ("segmentation",)), ("segmentation",)),
              (sources.array_source(_data(12, 100, ("depth",))), ("depth",))]
  kw = dict(seed=2, start=5, stop=40, batch_size=4, sampler="annealed", num_steps=40,
            label_specs=specs)
  ahead = list(mixing.batches(datasets, num_workers=2, **kw))
  for (s, a), (t, b) in zip(mixing.batches(datasets, **kw), ahead, strict=True):
    assert s == t and a.keys() == b.keys()
    assert all(np.array_equal(a[key], b[key]) for key in a)
  # The position of every dataset, and a changed one refused.
  named = {"a": 8, "b": 12}
  pos = mixing.position(steps, 23, named, batch_size=4, seed=2, sampler="annealed", num_steps=40)
  assert pos["datasets"]["a"]["draws"] + pos["datasets"]["b"]["draws"] == 23
  assert pos["datasets"]["b"]["epoch"] == pos["datasets"]["b"]["draws"] // 3
  kw = dict(batch_size=4, seed=2, sampler="annealed", num_steps=40)
  assert mixing.resume_step(pos, steps, named, **kw) == 23
  with pytest.raises(ValueError, match=r"datasets.b.num_examples saved 12, now 16"):
    mixing.resume_step(pos, steps, {"a": 8, "b": 16}, **kw)
  with pytest.raises(ValueError, match=r"sampler saved annealed, now uniform"):
    mixing.resume_step(pos, steps, named, **{**kw, "sampler": "uniform"})
