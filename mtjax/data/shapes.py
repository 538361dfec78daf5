"""Procedural multi-task scenes: 3D primitives on a ground plane, ray-cast analytically in numpy.

One ray per pixel is intersected in closed form with a ground plane and 1..``max_objects``
primitives (sphere, cube rotated about the vertical axis, capped vertical cylinder, vertical cone
standing on its base). The nearest hit of each ray gives, from the same numbers, the class mask,
the instance mask, the camera-space depth, the surface normal and the Lambertian shading (with a
cast shadow from a second, shadow ray towards the light), so all the labels are mutually
consistent.

Conventions:
  * world: y up, ground plane ``y = 0``; the camera stands at ``(0, h, 0)`` and looks along +z,
    pitched down so far that every pixel sees the ground or an object (no sky is ever visible,
    so class 0 is exactly "ground" and ``depth_valid`` is all True; the mask exists for the same
    contract as real datasets with holes);
  * camera coordinates follow OpenCV: x right, y down, z forward; ``depth`` is the camera-space
    z of the hit point (not the ray length) and ``normals`` are unit vectors in these
    coordinates (every visible surface faces the camera: n . P < 0 at its camera-space point P);
  * camera height 3.0-3.6, pitch 34-40 degrees down, vertical field of view 45 degrees (see
    ``focal_length``); objects 0.45-0.85 in radius / half-size, 3.5-9 ahead (about 9-28 px wide
    at 64x64); the class and the HSV colour are drawn independently;
  * ``image`` is quantised to multiples of 1/255, so storing it as uint8 is lossless.
"""

import functools

import numpy as np

CLASS_NAMES = ("background", "sphere", "cube", "cylinder", "cone")
NUM_CLASSES = len(CLASS_NAMES)

_VFOV = np.deg2rad(45.0)   # vertical field of view; focal length f = (H / 2) / tan(vfov / 2)
_EPS = 1e-9
_FAR = np.inf


def _unit(v):
  return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), _EPS)


def _hsv_to_rgb(h, s, v):
  """Single colour, h in [0, 1)."""
  i = int(h * 6.0) % 6
  f = h * 6.0 - int(h * 6.0)
  p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
  return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


# --- Closed-form ray intersections. o, d: origins and unit directions (world), each (N, 3) or
# (1, 3) (one origin or one direction shared by all rays). Each returns t (N,), the distance to
# the nearest hit in front of the origin (inf on a miss); _normal_* give the outward unit normal
# at points on the surface.

def _rows(o, d):
  return max(len(o), len(d))


def _dot(a, b):
  """Row-wise dot product of (N, 3) or (1, 3) arrays, by columns (numpy is slow on (N, 3))."""
  return a[:, 0] * b[:, 0] + a[:, 1] * b[:, 1] + a[:, 2] * b[:, 2]


def _hit_sphere(o, d, obj):
  oc = o - obj["center"]
  b = _dot(oc, d)
  disc = b * b - (_dot(oc, oc) - obj["radius"] ** 2)
  t = -b - np.sqrt(np.maximum(disc, 0.0))
  return np.where((disc >= 0) & (t > 0), t, _FAR)


def _normal_sphere(p, obj):
  return (p - obj["center"]) / obj["radius"]


def _rot_y(theta):
  c, s = np.cos(theta), np.sin(theta)
  return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _hit_cube(o, d, obj):
  """Slab method (Kay & Kajiya, 1986) in the cube's frame; the cube is rotated about y."""
  rot, s = _rot_y(obj["angle"]), obj["half"]
  ol = (o - obj["center"]) @ rot          # world -> local: rot.T @ v, as row vectors v @ rot
  dl = d @ rot
  dl = np.where(np.abs(dl) < _EPS, _EPS, dl)
  t1, t2 = (-s - ol) / dl, (s - ol) / dl
  lo, hi = np.minimum(t1, t2), np.maximum(t1, t2)
  tnear = np.maximum(np.maximum(lo[:, 0], lo[:, 1]), lo[:, 2])
  tfar = np.minimum(np.minimum(hi[:, 0], hi[:, 1]), hi[:, 2])
  return np.where((tnear <= tfar) & (tnear > 0), tnear, _FAR)


def _normal_cube(p, obj):
  rot = _rot_y(obj["angle"])
  pl = (p - obj["center"]) @ rot
  axis = np.abs(pl).argmax(axis=-1)       # the face the point lies on
  nl = np.zeros_like(pl)
  rows = np.arange(len(pl))
  nl[rows, axis] = np.sign(pl[rows, axis])
  return nl @ np.ascontiguousarray(rot.T)  # local -> world


def _hit_cylinder(o, d, obj):
  """Vertical cylinder on the ground, radius r, height h, with its top cap."""
  (cx, _, cz), r, h = obj["center"], obj["radius"], obj["height"]
  ox, oy, oz = o[:, 0] - cx, o[:, 1], o[:, 2] - cz
  dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]
  a = np.maximum(dx * dx + dz * dz, _EPS)
  b = ox * dx + oz * dz
  disc = b * b - a * (ox * ox + oz * oz - r * r)
  t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
  y = oy + t_side * dy
  t_side = np.where((disc >= 0) & (t_side > 0) & (y >= 0) & (y <= h), t_side, _FAR)
  t_cap = (h - oy) / np.where(np.abs(dy) < _EPS, _EPS, dy)
  xc, zc = ox + t_cap * dx, oz + t_cap * dz
  t_cap = np.where((t_cap > 0) & (xc * xc + zc * zc <= r * r), t_cap, _FAR)
  return np.minimum(t_side, t_cap)


def _normal_cylinder(p, obj):
  (cx, _, cz), r, h = obj["center"], obj["radius"], obj["height"]
  x, z = p[:, 0] - cx, p[:, 2] - cz
  rad = np.sqrt(x * x + z * z)
  side = np.stack([x / r, np.zeros_like(x), z / r], axis=-1)
  top = (h - p[:, 1]) <= (r - rad)        # nearer the cap plane than the side
  return np.where(top[:, None], np.array([0.0, 1.0, 0.0]), side)


def _hit_cone(o, d, obj):
  """Vertical cone, base radius r on the ground, apex at height h: x² + z² = k²(h - y)², k = r/h.

  The base disc lies on the ground plane, so it is never visible from above and is not cast.
  """
  (cx, _, cz), r, h = obj["center"], obj["radius"], obj["height"]
  k2 = (r / h) ** 2
  ox, oy, oz = o[:, 0] - cx, o[:, 1], o[:, 2] - cz
  dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]
  a = dx * dx + dz * dz - k2 * dy * dy
  b = ox * dx + oz * dz + k2 * (h - oy) * dy
  c = ox * ox + oz * oz - k2 * (h - oy) ** 2
  disc = b * b - a * c
  sq = np.sqrt(np.maximum(disc, 0.0))
  a = np.where(np.abs(a) < _EPS, _EPS, a)
  best = np.full(_rows(o, d), _FAR)
  for t in ((-b - sq) / a, (-b + sq) / a):
    y = oy + t * dy
    ok = (disc >= 0) & (t > 0) & (y >= 0) & (y <= h)
    best = np.where(ok & (t < best), t, best)
  return best


def _normal_cone(p, obj):
  (cx, _, cz), r, h = obj["center"], obj["radius"], obj["height"]
  return _unit(np.stack([p[:, 0] - cx, (r / h) ** 2 * (h - p[:, 1]), p[:, 2] - cz], axis=-1))


_HIT = {1: _hit_sphere, 2: _hit_cube, 3: _hit_cylinder, 4: _hit_cone}
_NORMAL = {1: _normal_sphere, 2: _normal_cube, 3: _normal_cylinder, 4: _normal_cone}


def _intersect(o, d, obj):
  """``_HIT`` of ``obj``, evaluated only on the rays that meet its bounding sphere."""
  c = np.array([obj["center"][0], obj["height"] / 2, obj["center"][2]])
  oc = o - c
  b = _dot(oc, d)
  disc = b * b - (_dot(oc, oc) - (obj["foot"] ** 2 + obj["height"] ** 2 / 4))
  t = np.full(_rows(o, d), _FAR)
  cand = np.flatnonzero((disc >= 0) & (np.sqrt(np.maximum(disc, 0.0)) > b))
  if len(cand):
    t[cand] = _HIT[obj["cls"]](o[cand] if len(o) > 1 else o, d[cand] if len(d) > 1 else d, obj)
  return t


# --- Scene sampling.

def focal_length(height):
  """In pixels: camera-space (x, y, z) projects to column x f / z + W / 2, row y f / z + H / 2."""
  return (height / 2) / np.tan(_VFOV / 2)


def _camera(rng, height):
  cam_h = rng.uniform(3.0, 3.6)
  pitch = np.deg2rad(rng.uniform(34.0, 40.0))
  focal = focal_length(height)
  right = np.array([1.0, 0.0, 0.0])
  down = np.array([0.0, -np.cos(pitch), -np.sin(pitch)])
  fwd = np.array([0.0, -np.sin(pitch), np.cos(pitch)])
  rot = np.stack([right, down, fwd], axis=1)   # camera -> world (columns are the camera axes)
  return np.array([0.0, cam_h, 0.0]), rot, focal


@functools.lru_cache(maxsize=16)
def _camera_rays(height, width, focal):
  """Unit ray directions through the pixel centres, camera coordinates, (H * W, 3)."""
  jj, ii = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
  rays = np.stack([(jj - width / 2) / focal, (ii - height / 2) / focal, np.ones_like(ii)], -1)
  rays = _unit(rays.reshape(-1, 3))
  rays.flags.writeable = False
  return rays


def _project(p, pos, rot, focal, height, width):
  q = (p - pos) @ rot
  return focal * q[1] / q[2] + height / 2, focal * q[0] / q[2] + width / 2


def _sample_objects(rng, pos, rot, focal, height, width, max_objects):
  """Random primitives with non-overlapping footprints whose middle projects inside the image."""
  num = int(rng.integers(1, max_objects + 1))
  tan_half_w = (width / 2) / focal
  objects = []
  for _ in range(num):
    for _ in range(200):
      cls = int(rng.integers(1, NUM_CLASSES))
      size = rng.uniform(0.45, 0.85)
      z = rng.uniform(3.5, 9.0)
      x = rng.uniform(-1.0, 1.0) * tan_half_w * (z + 2.0)
      if cls == 1:
        obj = dict(radius=size, height=2 * size, foot=size)
      elif cls == 2:
        obj = dict(half=size, angle=rng.uniform(0, np.pi / 2), height=2 * size,
                   foot=size * np.sqrt(2))
      elif cls == 3:
        obj = dict(radius=size, height=size * rng.uniform(1.2, 2.6), foot=size)
      else:
        obj = dict(radius=size, height=size * rng.uniform(1.6, 3.0), foot=size)
      obj["cls"] = cls
      obj["center"] = np.array([x, obj["height"] / 2 if cls in (1, 2) else 0.0, z])
      v, u = _project(np.array([x, obj["height"] / 2, z]), pos, rot, focal, height, width)
      inside = 0.06 * width < u < 0.94 * width and 0.08 * height < v < 0.94 * height
      apart = all(np.hypot(x - q["center"][0], z - q["center"][2]) > obj["foot"] + q["foot"] + 0.1
                  for q in objects)
      if inside and apart:
        hue, sat, val = rng.uniform(), rng.uniform(0.45, 1.0), rng.uniform(0.55, 1.0)
        obj["color"] = _hsv_to_rgb(hue, sat, val)
        objects.append(obj)
        break
  return objects


def render_scene(rng: np.random.Generator, height: int, width: int, max_objects: int = 4) -> dict:
  """Renders one random scene; every label comes from the same primary-ray hits.

  Returns a dict of numpy arrays: ``image`` f32 (H, W, 3) in [0, 1]; ``segmentation`` i32 (H, W)
  class ids (0 ground, 1..4 ``CLASS_NAMES``); ``instances`` i32 (H, W) (0 ground, k + 1 for the
  object in row k of ``boxes``); ``depth`` f32 (H, W) camera-space z; ``depth_valid`` bool
  (H, W); ``normals`` f32 (H, W, 3) unit, camera coordinates; ``boxes`` f32 (max_objects, 4)
  (y0, x0, y1, x1) in [0, 1], the extent of each visible object's pixels (visible objects
  first, zero rows after); ``box_classes`` i32 (max_objects,) (0 = padding); ``labels`` f32
  (NUM_CLASSES - 1,) multi-hot of the classes visible in the image.
  Deterministic given ``rng``'s state.
  """
  if height < 1 or width < 1 or max_objects < 1:
    raise ValueError(f"render_scene: need height, width, max_objects >= 1, got "
                     f"{height}, {width}, {max_objects}")
  pos, rot, focal = _camera(rng, height)
  objects = _sample_objects(rng, pos, rot, focal, height, width, max_objects)
  elevation = np.deg2rad(rng.uniform(35.0, 70.0))
  azimuth = rng.uniform(0.0, 2 * np.pi)
  light = np.array([np.cos(elevation) * np.sin(azimuth), np.sin(elevation),
                    np.cos(elevation) * np.cos(azimuth)])
  ambient = rng.uniform(0.25, 0.4)
  ground_color = _hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.3), rng.uniform(0.35, 0.75))

  # Primary rays through the pixel centres.
  ray_cam = _camera_rays(height, width, focal)
  d = ray_cam @ np.ascontiguousarray(rot.T)         # (contiguous: a far faster matmul)
  t = -pos[1] / d[:, 1]                              # ground: d_y < 0 on every pixel
  hit = np.zeros(len(d), np.int64)                   # 0 ground, k + 1 object k
  for k, obj in enumerate(objects):
    tk = _intersect(pos[None], d, obj)
    closer = tk < t
    t, hit = np.where(closer, tk, t), np.where(closer, k + 1, hit)
  p = pos + t[:, None] * d
  pixels = [np.flatnonzero(hit == k + 1) for k in range(len(objects))]
  n_world = np.zeros_like(d)
  n_world[:, 1] = 1.0
  for obj, idx in zip(objects, pixels, strict=True):
    n_world[idx] = _NORMAL[obj["cls"]](p[idx], obj)

  # Shadow rays towards the light. A convex object cannot shadow itself where it faces the light
  # (n.l > 0), so each object only darkens the pixels of the ground and of the others.
  lambert = np.clip(n_world @ light, 0.0, None)
  for k, obj in enumerate(objects):
    lambert[np.isfinite(_intersect(p, light[None], obj)) & (hit != k + 1)] = 0.0
  albedo = np.stack([ground_color] + [obj["color"] for obj in objects])[hit]
  image = albedo * (ambient + (1.0 - ambient) * lambert)[:, None]
  image += 0.01 * rng.standard_normal(image.shape, dtype=np.float32)
  image = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
  image = image.astype(np.float32) / np.float32(255.0)
  depth = t * ray_cam[:, 2]                          # ray_cam is unit, in camera axes
  normals = n_world @ rot                            # world -> camera

  # Visible objects first; instance k + 1 <-> row k of boxes.
  classes = np.array([0] + [obj["cls"] for obj in objects], np.int32)
  instances = np.zeros(height * width, np.int32)
  boxes = np.zeros((max_objects, 4), np.float32)
  box_classes = np.zeros((max_objects,), np.int32)
  row = 0
  for k, idx in enumerate(pixels):
    if not len(idx):
      continue
    rows, cols = idx // width, idx % width
    boxes[row] = (rows.min() / height, cols.min() / width, (rows.max() + 1) / height,
                  (cols.max() + 1) / width)
    box_classes[row] = classes[k + 1]
    instances[idx] = row + 1
    row += 1
  labels = np.zeros((NUM_CLASSES - 1,), np.float32)
  labels[box_classes[:row] - 1] = 1.0
  return {
      "image": image.reshape(height, width, 3),
      "segmentation": classes[hit].reshape(height, width),
      "instances": instances.reshape(height, width),
      "depth": depth.reshape(height, width).astype(np.float32),
      "depth_valid": np.ones((height, width), bool),
      "normals": normals.reshape(height, width, 3).astype(np.float32),
      "boxes": boxes,
      "box_classes": box_classes,
      "labels": labels,
  }
