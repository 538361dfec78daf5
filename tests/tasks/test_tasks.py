"""Task losses and metrics against direct numpy computations, masks, padding, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import metrics, tasks
from mtjax.tasks import normals as normals_lib

RNG = np.random.default_rng(0)


def _seg_batch(b=4, h=6, w=5, c=3):
  labels = RNG.integers(0, c, (b, h, w)).astype(np.int32)
  labels[0, 0, :] = 255
  return {"segmentation": labels}, RNG.normal(size=(b, h, w, c)).astype(np.float32)


def test_segmentation_loss_ignores_label_255():
  batch, logits = _seg_batch()
  labels = batch["segmentation"]
  valid = labels != 255
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, np.where(valid, labels, 0)[..., None], -1)[..., 0]
  expected = nll[valid].mean()
  got = tasks.get("segmentation", 3).loss_fn(jnp.asarray(logits), batch)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_segmentation_metrics_miou_and_accuracy():
  batch, logits = _seg_batch()
  task = tasks.get("segmentation", 3)
  out = tasks.summarize(task, jax.device_get(task.metrics_fn(jnp.asarray(logits), batch)))
  labels, pred = batch["segmentation"], logits.argmax(-1)
  valid = labels != 255
  ious = [((pred == c) & (labels == c) & valid).sum()
          / (((pred == c) | (labels == c)) & valid).sum() for c in range(3)]
  np.testing.assert_allclose(out["miou"], np.mean(ious), rtol=1e-6)
  np.testing.assert_allclose(out["pixel_acc"], (pred == labels)[valid].mean(), rtol=1e-6)
  perfect = jax.nn.one_hot(np.where(valid, labels, 0), 3) * 10
  out = tasks.summarize(task, task.metrics_fn(perfect, batch))
  assert out["miou"] == 1.0 and out["pixel_acc"] == 1.0


def test_depth_loss_and_errors_on_valid_pixels():
  depth = RNG.uniform(1, 10, (3, 4, 4)).astype(np.float32)
  valid = RNG.random((3, 4, 4)) > 0.3
  pred = RNG.uniform(1, 10, (3, 4, 4, 1)).astype(np.float32)
  batch = {"depth": depth, "depth_valid": valid}
  task = tasks.get("depth")
  err = np.abs(pred[..., 0] - depth)[valid]
  np.testing.assert_allclose(task.loss_fn(pred, batch), err.mean(), rtol=1e-5)
  out = tasks.summarize(task, task.metrics_fn(pred, batch))
  np.testing.assert_allclose(out["abs_err"], err.mean(), rtol=1e-5)
  np.testing.assert_allclose(out["rel_err"], (err / depth[valid]).mean(), rtol=1e-5)


def test_normals_angles_median_and_thresholds():
  n = 2000
  target = RNG.normal(size=(1, n, 1, 3))
  target /= np.linalg.norm(target, axis=-1, keepdims=True)
  pred = target + 0.4 * RNG.normal(size=target.shape)
  batch = {"normals": target.astype(np.float32), "depth_valid": np.ones((1, n, 1), bool)}
  task = tasks.get("normals")
  unit = pred / np.linalg.norm(pred, axis=-1, keepdims=True)
  cos = np.clip((unit * target).sum(-1), -1, 1)
  angles = np.degrees(np.arccos(cos)).ravel()
  np.testing.assert_allclose(task.loss_fn(pred.astype(np.float32), batch), (1 - cos).mean(),
                             rtol=1e-4)
  out = tasks.summarize(task, task.metrics_fn(pred.astype(np.float32), batch))
  np.testing.assert_allclose(out["mean_angle"], angles.mean(), rtol=1e-4)
  assert abs(out["median_angle"] - np.median(angles)) <= normals_lib.BIN_DEGREES
  np.testing.assert_allclose(out["within_22_5"], 100 * (angles < 22.5).mean(), atol=0.1)


def test_classification_loss_and_accuracy():
  labels = (RNG.random((6, 4)) > 0.5).astype(np.float32)
  logits = RNG.normal(size=(6, 4)).astype(np.float32)
  task = tasks.get("classification")
  bce = np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits)))
  np.testing.assert_allclose(task.loss_fn(logits, {"labels": labels}), bce.mean(), rtol=1e-5)
  out = tasks.summarize(task, task.metrics_fn(logits, {"labels": labels}))
  np.testing.assert_allclose(out["accuracy"], ((logits > 0) == (labels > 0.5)).mean())


@pytest.mark.parametrize("name", ["segmentation", "depth", "normals", "classification"])
def test_missing_labels_give_zero_loss_not_nan(name):
  batch = {"segmentation": np.zeros((2, 4, 4), np.int32), "depth": np.ones((2, 4, 4), np.float32),
           "depth_valid": np.ones((2, 4, 4), bool), "normals": np.ones((2, 4, 4, 3), np.float32),
           "labels": np.ones((2, 4), np.float32), f"{name}_mask": np.zeros((2,), np.float32)}
  task = tasks.get(name, **{"segmentation": {"num_classes": 5},
                            "classification": {"num_classes": 4}}.get(name, {}))
  channels = {"segmentation": 5, "depth": 1, "normals": 3, "classification": 4}[name]
  output = jnp.ones((2, channels)) if name == "classification" else jnp.ones((2, 4, 4, channels))
  loss = task.loss_fn(output, batch)
  assert loss == 0.0
  grad = jax.grad(lambda o: task.loss_fn(o, batch))(output)
  assert np.all(np.isfinite(grad))


def test_metrics_are_exact_under_padding_and_batch_splitting():
  batch, logits = _seg_batch(b=6)
  task = tasks.get("segmentation", 3)
  whole = tasks.summarize(task, task.metrics_fn(jnp.asarray(logits), batch))
  totals = None
  for part in (slice(0, 4), slice(4, 6)):
    sub = {k: v[part] for k, v in batch.items()}
    sub_logits = logits[part]
    pad = 4 - len(sub_logits)
    if pad:  # pad like the eval pipeline: zero examples with mask 0
      sub = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in sub.items()}
      sub_logits = np.concatenate([sub_logits, np.ones((pad, *sub_logits.shape[1:]), np.float32)])
    sub["mask"] = (np.arange(4) < 4 - pad).astype(np.float32)
    totals = metrics.accumulate(totals, {"segmentation": task.metrics_fn(sub_logits, sub)})
  split = metrics.summarize({"segmentation": task}, totals)["segmentation"]
  for key in whole:
    np.testing.assert_allclose(split[key], whole[key], rtol=1e-6)


def test_unknown_task_lists_valid_names():
  with pytest.raises(ValueError, match=r"unknown task 'flow'.*'depth'"):
    tasks.get("flow")


def test_task_options_are_checked():
  with pytest.raises(ValueError, match=r"task 'depth': unknown option\(s\) \['num_classes'\]"):
    tasks.get("depth", num_classes=5)
  with pytest.raises(ValueError, match=r"task 'segmentation': num_classes: expected a positive"):
    tasks.get("segmentation").head(hidden=8)


@pytest.mark.parametrize("name,options,keys", [
    ("segmentation", {"num_classes": 5}, {"segmentation": ((6, 7), jnp.int32)}),
    ("depth", {}, {"depth": ((6, 7), jnp.float32), "depth_valid": ((6, 7), jnp.bool_)}),
    ("normals", {}, {"normals": ((6, 7, 3), jnp.float32), "depth_valid": ((6, 7), jnp.bool_)}),
    ("classification", {"num_classes": 4}, {"labels": ((4,), jnp.float32)}),
])
def test_each_task_owns_its_head_and_label_spec(name, options, keys):
  task = tasks.get(name, **options)
  assert task.label_spec((6, 7)) == keys
  assert tasks.label_keys(task) == tuple(keys)
  head = task.head(hidden=8, dtype=jnp.float32)
  features = jnp.ones((2, 3, 3, 4))
  out, _ = head.init_with_output(jax.random.PRNGKey(0), features, (6, 7), False)
  expected = {"segmentation": (2, 6, 7, 5), "depth": (2, 6, 7, 1), "normals": (2, 6, 7, 3),
              "classification": (2, 4)}[name]
  assert out.shape == expected


def test_check_batch_names_the_key_and_the_shape():
  spec = {n: tasks.get(n, **o) for n, o in (("segmentation", {"num_classes": 5}), ("depth", {}))}
  batch = {"image": np.zeros((2, 6, 7, 3)), "segmentation": np.zeros((2, 6, 7)),
           "depth": np.zeros((2, 6, 7)), "depth_valid": np.zeros((2, 6, 7), bool)}
  tasks.check_batch(spec, batch, (6, 7), 2)
  batch["segmentation"] = np.zeros((2, 6, 6))
  with pytest.raises(ValueError, match=r"batch\['segmentation'\].*\(2, 6, 6\).*\(2, 6, 7\)"):
    tasks.check_batch(spec, batch, (6, 7), 2)
  batch["segmentation"] = np.zeros((2, 6, 7))
  del batch["depth_valid"]
  with pytest.raises(ValueError, match="batch: missing 'depth_valid'"):
    tasks.check_batch(spec, batch, (6, 7), 2)
