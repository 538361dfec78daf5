"""Pretrained weights: torchvision ResNets and whole LibMTL models, from torch state dicts
(``.pth``/``.pt``) or ``.safetensors`` files.

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

A whole model trained by LibMTL (``encoder.*``, ``decoders.<task>.*``) replaces every parameter
and statistic of the model: :func:`load` dispatches it to the importer of the architecture
(:data:`LIBMTL_IMPORTERS`).
"""

import itertools
import os

import flax.traverse_util as traverse
import numpy as np

from mtjax.models import segnet

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


def fill(tensors, variables: dict, name_of, ignored=()) -> dict:
  """``variables`` (``{"params": ..., "batch_stats": ...}``, arrays or shapes) with every leaf
  taken from ``tensors``: ``name_of(collection, path)`` is the torch name of the leaf at
  ``path``. 4-D kernels go from OIHW to HWIO. Raises ValueError listing, in one line, the
  missing, mismatched and unexpected tensors (``num_batches_tracked`` and names starting with
  one of ``ignored`` are not expected to be used)."""
  used, missing, mismatched, out = set(), [], [], {}
  for kind, tree in variables.items():
    flat = {}
    for path, leaf in traverse.flatten_dict(dict(tree)).items():
      name = name_of(kind, path)
      if name not in tensors:
        missing.append(f"{name} (for {'/'.join(path)})")
        continue
      value = np.asarray(tensors[name], np.float32)
      if value.ndim == 4:
        value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
      used.add(name)
      if value.shape != tuple(leaf.shape):
        mismatched.append(f"{name}: file {tuple(value.shape)}, model {tuple(leaf.shape)}")
        continue
      flat[path] = value.astype(leaf.dtype)
    out[kind] = traverse.unflatten_dict(flat) if flat else {}
  unexpected = sorted(k for k in tensors if k not in used and not k.startswith(tuple(ignored))
                      and not k.endswith("num_batches_tracked"))
  if missing or mismatched or unexpected:
    lines = [f"{title} ({len(items)}): {', '.join(items[:20])}{' ...' if len(items) > 20 else ''}"
             for title, items in (("missing", missing), ("mismatched shapes", mismatched),
                                  ("unexpected", unexpected)) if items]
    raise ValueError("; ".join(lines))
  return out


def convert(tensors, params, batch_stats, stage_sizes, block: str):
  """``(params, batch_stats)`` of a ResNet (its own trees) filled from torchvision ``tensors``.

  Raises ValueError listing the missing, mismatched and unexpected tensors.
  """
  try:
    out = fill(tensors, {"params": params, "batch_stats": batch_stats},
               lambda _, path: _torch_name(path, stage_sizes, block), _IGNORED)
  except ValueError as e:
    raise ValueError("model.pretrained: the file does not match the backbone (check "
                     f"config.model.backbone, width, stem): {e}") from None
  return out["params"], out["batch_stats"]


def load_backbone(model, params, batch_stats, path: str, tensors=None):
  """``params``/``batch_stats`` of a model with a ``backbone`` ResNet, that backbone's taken
  from the file ``path`` (``tensors``: its contents, if already read)."""
  backbone = getattr(model, "backbone", None)
  if backbone is None or "backbone" not in params:
    raise ValueError(f"model.pretrained: {type(model).__name__} has no 'backbone' to load into")
  if getattr(backbone, "stem", "imagenet") != "imagenet":
    raise ValueError(f"model.pretrained: torchvision ResNets have the 'imagenet' stem; "
                     f"config.model.stem is {backbone.stem!r}")
  tensors = read(path) if tensors is None else tensors
  new_params, new_stats = convert(tensors, params["backbone"],
                                  batch_stats.get("backbone", {}), backbone.stage_sizes,
                                  backbone.block)
  return ({**params, "backbone": new_params}, {**batch_stats, "backbone": new_stats})


# --- Whole models trained by LibMTL (Lin & Zhang, 2023): ``torch.save(model.state_dict())`` of
# its ``Trainer.model`` (LibMTL/trainer.py), keys ``encoder.*`` (the shared encoder) and
# ``decoders.<task>.*`` (one decoder per task). LibMTL's task names are the examples'
# (``examples/nyu/main.py``: segmentation, depth, normal).
LIBMTL_TASKS = {"normals": "normal"}
# Top-level parameters of LibMTL's weighting methods (UW, GradNorm, IMTL: ``loss_scale``): the
# method's state, not the model's.
LIBMTL_IGNORED = ("loss_scale",)

# examples/nyu/aspp.py's DeepLabHead (an nn.Sequential: ASPP, conv, BN, ReLU, conv) and
# mtjax.models.heads.DeepLabHead's submodules.
_DEEPLAB = {"branch0_conv": "0.convs.0.0", "branch0_bn": "0.convs.0.1",
            "branch1_conv": "0.convs.1.0", "branch1_bn": "0.convs.1.1",
            "branch2_conv": "0.convs.2.0", "branch2_bn": "0.convs.2.1",
            "branch3_conv": "0.convs.3.0", "branch3_bn": "0.convs.3.1",
            "pool_conv": "0.convs.4.1", "pool_bn": "0.convs.4.2",
            "project_conv": "0.project.0", "project_bn": "0.project.1",
            "conv": "1", "bn": "2", "classifier": "4"}
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
           "var": "running_var"}


def libmtl_task(task: str) -> str:
  """LibMTL's name of mtjax's task ``task``."""
  return LIBMTL_TASKS.get(task, task)


def resnet_stages(backbone_params) -> tuple:
  """The stage sizes of a ResNet's parameter tree (``Conv_0``, ``BatchNorm_0``,
  ``<Block>_<k>``): a stage starts at block 0 and at each block with a projection shortcut
  (the first block of stages 2..N changes the width; so does a bottleneck's first)."""
  blocks = sorted((n for n in backbone_params if "Block_" in n),
                  key=lambda n: int(n.rsplit("_", 1)[1]))
  convs = 2 if blocks and blocks[0].startswith("Basic") else 3
  sizes = []
  for k, name in enumerate(blocks):
    if k == 0 or f"Conv_{convs}" in backbone_params[name]:
      sizes.append(0)
    sizes[-1] += 1
  return tuple(sizes), ("basic" if convs == 2 else "bottleneck")


def import_libmtl_hard(tensors, variables: dict) -> dict:
  """A hard-sharing model (:class:`mtjax.models.MultiTaskModel`, ``model.head = "deeplab"``)
  from LibMTL's HPS model of ``examples/{nyu,cityscapes}/main.py``: ``encoder.*`` is
  ``resnet_dilated`` (torchvision's names, no ``fc``), ``decoders.<task>.*`` each a
  ``DeepLabHead`` (``examples/nyu/aspp.py``)."""
  stages, block = resnet_stages(variables["params"]["backbone"])

  def name_of(_, path):
    module, *rest = path
    if module == "backbone":
      return "encoder." + _torch_name(rest, stages, block)
    task = module[len("heads_"):]
    if module.startswith("heads_") and len(rest) == 2 and rest[0] in _DEEPLAB:
      return f"decoders.{libmtl_task(task)}.{_DEEPLAB[rest[0]]}.{_LEAVES[rest[1]]}"
    return f"<no LibMTL name for {'/'.join(path)}>"

  return fill(tensors, variables, name_of, LIBMTL_IGNORED)


# Architecture -> importer of a whole LibMTL model: ``fn(tensors, variables) -> variables``,
# ``tensors`` the file's ``{name: array}``, ``variables`` ``{"params", "batch_stats"}`` of the
# fresh model (its structure); raises ValueError listing missing/mismatched/unexpected tensors.
LIBMTL_IMPORTERS = {
    "hard": import_libmtl_hard,
    "segnet_mtan": segnet.libmtl_variables,   # examples/nyu/segnet_mtan.py
}


def is_libmtl(tensors) -> bool:
  """Whether a state dict is a whole LibMTL model (``encoder.*``, ``decoders.*``)."""
  return any(k.startswith("encoder.") for k in tensors) and any(
      k.startswith("decoders.") for k in tensors)


def load(model, params, batch_stats, path: str, architecture: str = "hard"):
  """``(params, batch_stats)`` with the weights of the file ``path``: a whole LibMTL model
  (:data:`LIBMTL_IMPORTERS` of ``architecture``) or a torchvision ResNet (the backbone only,
  :func:`load_backbone`)."""
  tensors = read(path)
  if not is_libmtl(tensors):
    return load_backbone(model, params, batch_stats, path, tensors)
  if architecture not in LIBMTL_IMPORTERS:
    raise ValueError(f"model.pretrained: {path!r} is a whole LibMTL model; architectures that "
                     f"import one: {sorted(LIBMTL_IMPORTERS)}, not {architecture!r}")
  try:
    out = LIBMTL_IMPORTERS[architecture](tensors, {"params": params,
                                                   "batch_stats": batch_stats})
  except ValueError as e:
    raise ValueError(f"model.pretrained: {path!r} does not match the model (check "
                     f"config.model and config.tasks): {e}") from None
  return out["params"], out["batch_stats"]
