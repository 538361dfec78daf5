"""Pretrained ResNet weights from torchvision state dicts (``.pth``) or ``.safetensors`` files.

``config.model.pretrained = PATH`` replaces the backbone's parameters and BatchNorm statistics
of a fresh run by the file's (nothing is downloaded). torchvision's names map onto
:class:`mtjax.models.backbones.ResNet` (same structure: the stride of a bottleneck on its 3×3
convolution, ResNet v1.5, symmetric padding, the 1×1 projection shortcut ``downsample``):

  ``conv1``/``bn1``                 -> ``Conv_0``/``BatchNorm_0`` (the ImageNet stem)
  ``layer{i}.{j}.conv{k}``/``bn{k}``   -> ``<Block>_{n}/Conv_{k-1}``/``BatchNorm_{k-1}``
  ``layer{i}.{j}.downsample.0``/``.1`` -> ``<Block>_{n}/Conv_{K}``/``BatchNorm_{K}``

with ``n`` the block's index over all stages and ``K`` its number of main convolutions (2 basic,
3 bottleneck); kernels go from OIHW to HWIO; BatchNorm ``weight``/``bias`` to
``scale``/``bias`` and ``running_mean``/``running_var`` to the ``batch_stats`` ``mean``/``var``.
``fc.*`` (the ImageNet classifier) and ``num_batches_tracked`` are not used. Any tensor the
backbone needs that is missing or has another shape, and any other tensor of the file, is
listed in the error.
"""

import itertools
import os

import flax.traverse_util as traverse
import numpy as np

FORMATS = (".pth", ".pt", ".safetensors")
_IGNORED = ("fc.",)


def check_path(path: str) -> None:
  """Raises ValueError unless ``path`` is an existing ``.pth``/``.pt``/``.safetensors`` file."""
  if not path.endswith(FORMATS):
    raise ValueError(f"model.pretrained: {path!r}: expected a torchvision state dict (.pth, "
                     ".pt) or a .safetensors file")
  if not os.path.isfile(path):
    raise ValueError(f"model.pretrained: {path!r}: no such file")


def read(path: str) -> dict[str, np.ndarray]:
  """The tensors of a ``.safetensors`` file (no torch needed) or a torch state dict."""
  check_path(path)
  if path.endswith(".safetensors"):
    try:
      from safetensors.numpy import load_file
    except ImportError as e:
      raise ValueError("model.pretrained: reading .safetensors needs the safetensors package "
                       "(pip install 'mtjax[detection]' or safetensors)") from e
    return dict(load_file(path))
  try:
    import torch
  except ImportError as e:
    raise ValueError(f"model.pretrained: reading {path!r} needs torch (pip install "
                     "'mtjax[torch]'), or convert it to .safetensors") from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  state = state.get("state_dict", state) if isinstance(state, dict) else state
  return {k: v.detach().cpu().numpy() for k, v in state.items()}


def _torch_name(path, stage_sizes, block: str) -> str:
  """torchvision's name of the mtjax backbone variable at ``path`` (inside the backbone)."""
  module, *rest = path
  leaf = rest[-1]
  convs = 2 if block == "basic" else 3
  if "Block_" in module:
    index = int(module.rsplit("_", 1)[1])
    ends = list(itertools.accumulate(stage_sizes))
    stage = next(i for i, end in enumerate(ends) if index < end)
    prefix = f"layer{stage + 1}.{index - (ends[stage - 1] if stage else 0)}."
    layer = rest[0]
    k = int(layer.rsplit("_", 1)[1])
    if k == convs:
      name = prefix + ("downsample.0" if layer.startswith("Conv") else "downsample.1")
    else:
      name = prefix + (f"conv{k + 1}" if layer.startswith("Conv") else f"bn{k + 1}")
  else:
    name = "conv1" if module.startswith("Conv") else "bn1"
  return f"{name}." + {"kernel": "weight", "scale": "weight", "bias": "bias",
                       "mean": "running_mean", "var": "running_var"}[leaf]


def convert(tensors, params, batch_stats, stage_sizes, block: str):
  """``(params, batch_stats)`` of a ResNet (its own trees) filled from torchvision ``tensors``.

  Raises ValueError listing the missing, mismatched and unexpected tensors.
  """
  used, missing, mismatched, out = set(), [], [], {}
  for kind, tree in (("params", params), ("batch_stats", batch_stats)):
    flat = {}
    for path, leaf in traverse.flatten_dict(dict(tree)).items():
      name = _torch_name(path, stage_sizes, block)
      if name not in tensors:
        missing.append(f"{name} (for {'/'.join(path)})")
        continue
      value = np.asarray(tensors[name], np.float32)
      if value.ndim == 4:
        value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
      used.add(name)
      if value.shape != leaf.shape:
        mismatched.append(f"{name}: file {tuple(value.shape)}, model {tuple(leaf.shape)}")
        continue
      flat[path] = value.astype(leaf.dtype)
    out[kind] = traverse.unflatten_dict(flat) if flat else {}
  unexpected = sorted(k for k in tensors if k not in used and not k.startswith(_IGNORED)
                      and not k.endswith("num_batches_tracked"))
  if missing or mismatched or unexpected:
    lines = [f"{title} ({len(items)}): {', '.join(items[:20])}{' ...' if len(items) > 20 else ''}"
             for title, items in (("missing", missing), ("mismatched shapes", mismatched),
                                  ("unexpected", unexpected)) if items]
    raise ValueError("model.pretrained: the file does not match the backbone (check "
                     "config.model.backbone, width, stem): " + "; ".join(lines))
  return out["params"], out["batch_stats"]


def load_backbone(model, params, batch_stats, path: str):
  """``params``/``batch_stats`` of a model with a ``backbone`` ResNet, that backbone's taken
  from the file ``path``."""
  backbone = getattr(model, "backbone", None)
  if backbone is None or "backbone" not in params:
    raise ValueError(f"model.pretrained: {type(model).__name__} has no 'backbone' to load into")
  if getattr(backbone, "stem", "imagenet") != "imagenet":
    raise ValueError(f"model.pretrained: torchvision ResNets have the 'imagenet' stem; "
                     f"config.model.stem is {backbone.stem!r}")
  new_params, new_stats = convert(read(path), params["backbone"],
                                  batch_stats.get("backbone", {}), backbone.stage_sizes,
                                  backbone.block)
  return ({**params, "backbone": new_params}, {**batch_stats, "backbone": new_stats})
