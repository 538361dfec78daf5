"""The procedural renderer: determinism, label formats, and geometric consistency of the labels."""

import numpy as np
import pytest

from mtjax.data import shapes

H, W = 48, 64


def _scene(seed, height=H, width=W, max_objects=4):
  return shapes.render_scene(np.random.default_rng(seed), height, width, max_objects)


@pytest.fixture(scope="module")
def scenes():
  return [_scene([7, i]) for i in range(60)]


def _points(scene):
  """Camera-space 3D points of every pixel, from the depth map and the pinhole model."""
  h, w = scene["depth"].shape
  f = shapes.focal_length(h)
  jj, ii = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
  z = scene["depth"].astype(np.float64)
  return np.stack([(jj - w / 2) / f * z, (ii - h / 2) / f * z, z], axis=-1)


def test_deterministic_given_the_seed():
  a, b, c = _scene([1, 2]), _scene([1, 2]), _scene([1, 3])
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["image"], c["image"])
  assert not np.array_equal(a["depth"], c["depth"])


def test_shapes_dtypes_and_ranges(scenes):
  expected = {
      "image": ((H, W, 3), np.float32), "segmentation": ((H, W), np.int32),
      "instances": ((H, W), np.int32), "depth": ((H, W), np.float32),
      "depth_valid": ((H, W), np.bool_), "normals": ((H, W, 3), np.float32),
      "boxes": ((4, 4), np.float32), "box_classes": ((4,), np.int32),
      "labels": ((shapes.NUM_CLASSES - 1,), np.float32)}
  for s in scenes:
    assert {k: (v.shape, v.dtype) for k, v in s.items()} == expected
    assert s["image"].min() >= 0 and s["image"].max() <= 1
    # Quantised to 1/255, so a uint8 copy is lossless.
    np.testing.assert_array_equal(
        (np.round(s["image"] * 255).astype(np.uint8).astype(np.float32) / np.float32(255)),
        s["image"])
    assert set(np.unique(s["segmentation"])) <= set(range(shapes.NUM_CLASSES))
    assert s["depth_valid"].all()   # the camera looks down far enough that no sky is visible
    valid = s["depth_valid"]
    assert (s["depth"][valid] > 0.5).all() and (s["depth"][valid] < 30).all()
    n = np.linalg.norm(s["normals"][valid], axis=-1)
    np.testing.assert_allclose(n, 1.0, atol=1e-5)
    # Every visible surface faces the camera: n . P < 0 (P the camera-space point).
    facing = np.sum(s["normals"] * _points(s), axis=-1)[valid]
    assert (facing < 1e-4).all(), facing.max()
    assert len(shapes.CLASS_NAMES) == shapes.NUM_CLASSES == 5


def test_boxes_are_exactly_the_extent_of_each_visible_object(scenes):
  for s in scenes:
    seg, inst, boxes, cls = s["segmentation"], s["instances"], s["boxes"], s["box_classes"]
    n = int((cls > 0).sum())
    assert n >= 1 and (cls[:n] > 0).all() and (cls[n:] == 0).all()   # visible first
    np.testing.assert_array_equal(boxes[n:], 0.0)
    np.testing.assert_array_equal(np.unique(inst), np.arange(n + 1))
    np.testing.assert_array_equal(seg > 0, inst > 0)
    for k in range(n):
      rows, cols = np.nonzero(inst == k + 1)
      assert (seg[rows, cols] == cls[k]).all()
      np.testing.assert_allclose(
          boxes[k], [rows.min() / H, cols.min() / W, (rows.max() + 1) / H, (cols.max() + 1) / W],
          atol=1e-6)
    # The labels are the classes that have pixels.
    np.testing.assert_array_equal(
        s["labels"], [float((seg == c).any()) for c in range(1, shapes.NUM_CLASSES)])


def test_every_class_appears_and_objects_have_a_learnable_size():
  counts, scene_counts, widths = np.zeros(shapes.NUM_CLASSES), np.zeros(shapes.NUM_CLASSES), []
  for i in range(200):
    s = _scene([11, i], 64, 64)
    counts += np.bincount(s["segmentation"].ravel(), minlength=shapes.NUM_CLASSES)
    scene_counts[1:] += s["labels"]
    b = s["boxes"][s["box_classes"] > 0]
    widths += list((b[:, 3] - b[:, 1]) * 64)
  assert (counts > 0).all()
  # ~2.5 objects per scene, classes uniform: each class is in well over 40 of 200 scenes.
  assert (scene_counts[1:] > 40).all(), scene_counts
  assert 0.05 < counts[1:].sum() / counts.sum() < 0.5          # objects are a fair share
  assert 8 <= np.median(widths) <= 25, np.median(widths)


def test_colour_does_not_identify_the_class():
  """Mean object colour per class: the classes' colour distributions overlap (any hue)."""
  hues = {c: [] for c in range(1, shapes.NUM_CLASSES)}
  for s in _scenes_64():
    for k, c in enumerate(s["box_classes"]):
      if c:
        rgb = s["image"][s["instances"] == k + 1].mean(axis=0)
        hues[int(c)].append(int(np.argmax(rgb)))   # dominant channel
  for c, h in hues.items():
    assert len(set(h)) == 3, (c, h)    # every class shows up red-, green- and blue-dominant


def _scenes_64():
  return [_scene([13, i], 64, 64) for i in range(80)]


def test_ground_points_lie_on_one_plane_with_the_ground_normal(scenes):
  """Depth and normals come from the same hits: on the ground n . P is the plane offset."""
  for s in scenes[:20]:
    ground = s["segmentation"] == 0
    p, n = _points(s)[ground], s["normals"][ground].astype(np.float64)
    np.testing.assert_allclose(n, np.broadcast_to(n[0], n.shape), atol=1e-6)
    offset = p @ n[0]               # = -(camera height above the ground)
    np.testing.assert_allclose(offset, offset.mean(), atol=2e-4 * np.abs(p).max())
    assert 2.9 < -offset.mean() < 3.7


def test_sphere_normals_point_from_the_centre():
  """On a sphere P = C + r n for one centre C and radius r: least squares fits it exactly."""
  checked = 0
  for i in range(80):
    s = _scene([17, i])
    for k, c in enumerate(s["box_classes"]):
      mask = s["instances"] == k + 1
      if c != 1 or mask.sum() < 30:
        continue
      p, n = _points(s)[mask], s["normals"][mask].astype(np.float64)
      a = np.concatenate([np.tile(np.eye(3), (len(p), 1)), n.reshape(-1, 1)], axis=1)
      sol, *_ = np.linalg.lstsq(a, p.reshape(-1), rcond=None)
      resid = p - (sol[:3] + sol[3] * n)
      assert 0.4 < sol[3] < 0.9                           # the sampled radii
      assert np.abs(resid).max() < 1e-4 * np.abs(p).max(), np.abs(resid).max()
      checked += 1
  assert checked >= 5


def test_planar_faces_are_planes_and_curved_surfaces_are_tangent():
  """Cube faces / cylinder caps: n . P constant per face. On every object, the step to a
  horizontal neighbour is orthogonal to the mean of the two normals (exact on a sphere, whose
  chord r (n2 - n1) is orthogonal to n1 + n2; second order elsewhere)."""
  faces = 0
  for i in range(40):
    s = _scene([19, i])
    pts = _points(s)
    for k, c in enumerate(s["box_classes"]):
      mask = s["instances"] == k + 1
      if c in (2, 3):
        n = s["normals"][mask].astype(np.float64)
        keys, inv = np.unique(np.round(n, 4), axis=0, return_inverse=True)
        for f in range(len(keys)):
          sel = inv.ravel() == f
          if sel.sum() >= 6:
            off = pts[mask][sel] @ n[sel][0]
            assert np.ptp(off) < 1e-3, (c, np.ptp(off))
            faces += 1
      both = mask[:, 1:] & mask[:, :-1]
      step = (pts[:, 1:] - pts[:, :-1])[both]
      nrm = (s["normals"][:, :-1] + s["normals"][:, 1:])[both].astype(np.float64)
      cos = np.abs(np.sum(step * nrm, -1)) / np.linalg.norm(step, axis=-1) / np.maximum(
          np.linalg.norm(nrm, axis=-1), 1e-9)
      if len(cos) > 10:
        assert np.median(cos) < 0.02, (c, np.median(cos))
  assert faces >= 10


def test_rejects_bad_sizes():
  with pytest.raises(ValueError, match="height"):
    shapes.render_scene(np.random.default_rng(0), 0, 8)
