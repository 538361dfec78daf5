"""Augmentations keep every label consistent with the image."""

import numpy as np
import pytest

from mtjax.data import augment, shapes


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
  out = augment.hflip(scene, _Always())
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
  unflipped_x = augment.hflip(scene, _Always())["normals"] * np.float32([-1, 1, 1])
  assert not (np.sum(unflipped_x * points, -1) < 0).all()   # without the negation: broken
  twice = augment.hflip(out, _Always())
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
  out = augment.scale_crop(scene, rng, scales=(s,))
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
  same = augment.scale_crop(scene, np.random.default_rng(0), scales=(1.0,))
  for k in scene:
    np.testing.assert_array_equal(same[k], scene[k], err_msg=k)


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
  assert augment.compose(()) is None
  with pytest.raises(ValueError, match=r"augment: unknown \['rotate'\]; allowed.*hflip"):
    augment.compose(("hflip", "rotate"))
