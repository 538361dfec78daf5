"""Augmentations keep every label consistent with the image."""

import numpy as np
import pytest

from mtjax import tasks as tasks_lib
from mtjax.data import augment, shapes

# The tasks whose labels a shapes scene carries: each says how its labels follow the image.
TASKS = (tasks_lib.get("segmentation", num_classes=shapes.NUM_CLASSES),
         tasks_lib.get("depth"), tasks_lib.get("normals"),
         tasks_lib.get("detection", num_classes=shapes.NUM_CLASSES - 1, max_boxes=4))


@pytest.fixture(scope="module")
def scene():
  return shapes.render_scene(np.random.default_rng(4), 24, 32)


def _extents(instances, boxes, classes):
  """The box of each instance id k + 1 from its pixels (the renderer's own rule)."""
  h, w = instances.shape
  out = np.zeros_like(boxes)
  for k in np.flatnonzero(classes > 0):
    rows, cols = np.nonzero(instances == k + 1)
    if len(rows):
      out[k] = (rows.min() / h, cols.min() / w, (rows.max() + 1) / h, (cols.max() + 1) / w)
  return out


class _Always:
  """An rng whose first draw says 'flip'."""
  def random(self):
    return 0.0


def test_hflip_mirrors_every_label_negates_normals_x_and_mirrors_boxes(scene):
  out = augment.hflip(scene, _Always(), tasks=TASKS)
  for k in ("image", "segmentation", "instances", "depth", "depth_valid"):
    np.testing.assert_array_equal(out[k], scene[k][:, ::-1], err_msg=k)
  np.testing.assert_array_equal(out["normals"][..., 0], -scene["normals"][:, ::-1, 0])
  np.testing.assert_array_equal(out["normals"][..., 1:], scene["normals"][:, ::-1, 1:])
  # Boxes still bound their instance's pixels; padding rows stay zero; labels untouched.
  np.testing.assert_allclose(out["boxes"], _extents(out["instances"], out["boxes"],
                                                    out["box_classes"]), atol=1e-6)
  assert (out["boxes"][scene["box_classes"] == 0] == 0).all()
  np.testing.assert_array_equal(out["labels"], scene["labels"])
  # Surfaces still face the camera: at each pixel's camera-space point P (back-projected from
  # the flipped depth), the flipped normal n has n.P < 0, as every rendered surface does.
  h, w = out["depth"].shape
  f = shapes.focal_length(h)
  cols, rows = np.meshgrid(np.arange(w) + 0.5 - w / 2, np.arange(h) + 0.5 - h / 2)
  z = out["depth"]
  points = np.stack([cols * z / f, rows * z / f, z], -1)
  assert (np.sum(out["normals"] * points, -1) < 0).all()
  unflipped_x = out["normals"] * np.float32([-1, 1, 1])
  assert not (np.sum(unflipped_x * points, -1) < 0).all()   # without the negation: broken
  twice = augment.hflip(out, _Always(), tasks=TASKS)
  for k in scene:
    np.testing.assert_array_equal(twice[k], scene[k], err_msg=k)
  # Half the draws flip.
  flips = sum(not np.array_equal(augment.hflip(scene, np.random.default_rng(s))["image"],
                                 scene["image"]) for s in range(200))
  assert 70 < flips < 130


def test_scale_crop_divides_depth_by_the_scale_and_crops_every_label(scene):
  h, w = scene["image"].shape[:2]
  s = 1.5
  rng = np.random.default_rng(11)
  out = augment.scale_crop(scene, rng, scales=(s,), tasks=TASKS)
  rng = np.random.default_rng(11)
  rng.integers(1)                                   # the scale draw
  ch, cw = int(h / s), int(w / s)
  i, j = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
  # Nearest (torch's floor rule) for labels and depth; depth seen s times closer.
  rows = np.floor(np.arange(h) * ch / h).astype(int) + i
  cols = np.floor(np.arange(w) * cw / w).astype(int) + j
  np.testing.assert_array_equal(out["segmentation"], scene["segmentation"][rows][:, cols])
  np.testing.assert_array_equal(out["depth_valid"], scene["depth_valid"][rows][:, cols])
  np.testing.assert_allclose(out["depth"] * s, scene["depth"][rows][:, cols], rtol=1e-6)
  assert set(np.unique(out["instances"])) <= set(np.unique(scene["instances"]))
  # Bilinear with aligned corners: the four corners are the crop's corners exactly.
  for (a, b), (c, d) in (((0, 0), (i, j)), ((-1, -1), (i + ch - 1, j + cw - 1))):
    np.testing.assert_allclose(out["image"][a, b], scene["image"][c, d], rtol=1e-6)
    np.testing.assert_allclose(out["normals"][a, b], scene["normals"][c, d], rtol=1e-6)
  # Boxes follow the crop: within a pixel of their instance's pixels after resizing (a box
  # may be clipped to a corner its object does not reach; a box outside the crop is dropped).
  seen = np.isin(np.arange(1, len(out["boxes"]) + 1), out["instances"])
  assert seen.any() and (out["box_classes"][seen] == scene["box_classes"][seen]).all()
  np.testing.assert_allclose(out["boxes"][seen], _extents(out["instances"], out["boxes"],
                                                          out["box_classes"])[seen],
                             atol=1.5 / min(h, w))
  gone = (scene["box_classes"] > 0) & (out["box_classes"] == 0)
  assert (out["boxes"][gone] == 0).all() and not (seen & gone).any()
  # Scale 1 is the identity.
  same = augment.scale_crop(scene, np.random.default_rng(0), scales=(1.0,),
                            tasks=TASKS)
  for k in scene:
    np.testing.assert_array_equal(same[k], scene[k], err_msg=k)


def _reference_hflip(example, rng):
  """The augmentation with every label's rule written out by key (normals' x negated, boxes
  mirrored): the values the tasks' own rules must reproduce bit for bit."""
  if not rng.random() < 0.5:
    return example
  out = dict(example)
  for k in augment._dense_keys(example):
    out[k] = example[k][:, ::-1]
  out["normals"] = out["normals"] * np.array([-1.0, 1.0, 1.0], out["normals"].dtype)
  boxes = example["boxes"]
  mirrored = np.stack([boxes[:, 0], 1.0 - boxes[:, 3], boxes[:, 2], 1.0 - boxes[:, 1]], -1)
  out["boxes"] = np.where(example["box_classes"][:, None] > 0, mirrored, boxes).astype(
      boxes.dtype)
  return out


def _reference_scale_crop(example, rng):
  """The scale-crop written out by key: image and normals bilinear, the rest nearest, depth
  divided by the scale, boxes moved, clipped and dropped when empty."""
  height, width = example["image"].shape[:2]
  s = augment.SCALES[int(rng.integers(len(augment.SCALES)))]
  h, w = int(height / s), int(width / s)
  i, j = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
  out = dict(example)
  for k in augment._dense_keys(example):
    resize = augment.resize_bilinear if k in ("image", "normals") else augment.resize_nearest
    out[k] = resize(example[k][i:i + h, j:j + w], (height, width))
  out["depth"] = (out["depth"] / np.float32(s)).astype(example["depth"].dtype)
  boxes = example["boxes"].astype(np.float64)
  moved = np.clip((boxes - np.array([i / height, j / width] * 2))
                  * np.array([height / h, width / w] * 2), 0.0, 1.0)
  keep = (moved[:, 2] > moved[:, 0]) & (moved[:, 3] > moved[:, 1]) & (example["box_classes"] > 0)
  out["box_classes"] = np.where(keep, example["box_classes"], 0).astype(
      example["box_classes"].dtype)
  out["boxes"] = np.where(keep[:, None], moved, 0.0).astype(example["boxes"].dtype)
  return out


def test_the_tasks_rules_give_the_by_key_values_bit_for_bit():
  """EVIDENCE: LibMTL's order (scale_crop then hflip) through the tasks' rules equals the
  rules written by key, bit for bit, on 12 scenes and seeds (every scale and both flips
  drawn); without the tasks only the maps move (normals mirrored, not negated)."""
  transform = augment.compose(("scale_crop", "hflip"), TASKS)
  drawn = set()
  for seed in range(12):
    example = shapes.render_scene(np.random.default_rng(100 + seed), 24, 32)
    rng, ref_rng = np.random.default_rng(seed), np.random.default_rng(seed)
    out = transform(example, rng)
    ref = _reference_hflip(_reference_scale_crop(example, ref_rng), ref_rng)
    assert rng.random() == ref_rng.random()                 # the same draws were made
    assert out.keys() == ref.keys()
    for k in ref:
      assert out[k].dtype == ref[k].dtype, k
      np.testing.assert_array_equal(out[k], ref[k], err_msg=f"seed {seed} {k}")
    draws = np.random.default_rng(seed)                     # which scale and flip were drawn
    k = int(draws.integers(3))
    h, w = int(24 / augment.SCALES[k]), int(32 / augment.SCALES[k])
    draws.integers(0, 24 - h + 1), draws.integers(0, 32 - w + 1)
    drawn |= {("scale", k), ("flip", bool(draws.random() < 0.5))}
  assert len(drawn) == 5                                    # 3 scales, flipped and not
  flipped = augment.hflip(example, _Always())
  np.testing.assert_array_equal(flipped["normals"], example["normals"][:, ::-1])
  np.testing.assert_array_equal(flipped["boxes"], example["boxes"])


def test_bilinear_matches_a_float64_reference():
  x = np.random.default_rng(0).normal(size=(5, 7, 2))
  out = augment.resize_bilinear(x, (9, 4))
  for r in range(9):
    for c in range(4):
      y, z = r * 4 / 8, c * 6 / 3                   # (in - 1) / (out - 1)
      y0, z0 = int(np.floor(y)), int(np.floor(z))
      y1, z1 = min(y0 + 1, 4), min(z0 + 1, 6)
      fy, fz = y - y0, z - z0
      ref = ((1 - fy) * ((1 - fz) * x[y0, z0] + fz * x[y0, z1])
             + fy * ((1 - fz) * x[y1, z0] + fz * x[y1, z1]))
      np.testing.assert_allclose(out[r, c], ref, rtol=1e-6, atol=1e-6)


def test_compose_names_and_errors():
  assert augment.compose((), ()) is None
  with pytest.raises(ValueError, match=r"augment: unknown \['rotate'\]; allowed.*hflip"):
    augment.compose(("hflip", "rotate"), ())
