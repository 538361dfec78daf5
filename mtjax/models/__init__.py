"""Models: ResNet backbones, task heads and their multi-task composition (the architectures).

``ARCHITECTURES`` is the registry, a plain dict ``name -> builder``. A builder is

    build_x(backbone: str, tasks: Mapping[str, Task], common: Common, *,
            <hyperparameter>=<default>, ...) -> nn.Module

the common fields of ``config.model`` (:class:`Common`, declared once; their names are
:data:`COMMON`) plus the architecture's own hyperparameters as keyword-only arguments *with
defaults* (the one source of truth: they become
``config.model`` fields, see :func:`mtjax.config.model_config`). It checks its values and raises
``ValueError("model.<field>: ...")``; the module it returns follows the multi-task model contract
(:mod:`mtjax.models.multitask`).
"""

import inspect

from mtjax.models import experts, labels, segnet, sharing
from mtjax.models.multitask import Common, DeepSupervision, MultiTaskModel
from mtjax.models.multitask import build as build_hard

# The names of the config.model fields every builder takes (besides the backbone's name and the
# tasks).
COMMON = Common._fields

ARCHITECTURES = {
    "hard": build_hard,
    "partial": sharing.build_partial,
    "cross_stitch": sharing.build_cross_stitch,
    "mtan": sharing.build_mtan,
    "pad_net": sharing.build_pad_net,
    "ltb": sharing.build_ltb,
    "segnet_mtan": segnet.build_segnet_mtan,
    **experts.ARCHITECTURES,  # mmoe, cgc, ple, dselect_k
}


def names() -> list[str]:
  """The architecture names."""
  return sorted(ARCHITECTURES)


def _builder(architecture: str):
  if architecture not in ARCHITECTURES:
    raise ValueError(f"model.architecture: got {architecture!r}; expected one of {names()}")
  return ARCHITECTURES[architecture]


def hparams(architecture: str) -> dict:
  """``{name: default}``: the hyperparameters of ``architecture`` (its builder's keyword-only
  arguments)."""
  params = inspect.signature(_builder(architecture)).parameters.values()
  return {p.name: p.default for p in params if p.kind == p.KEYWORD_ONLY}


def build(backbone: str, tasks, *, architecture: str = "hard", **fields):
  """The multi-task model ``architecture`` (default ``"hard"``) over backbone ``backbone``.

  ``fields``: the common fields (:class:`Common`; those not given take its defaults) and the
  architecture's hyperparameters (:func:`hparams`); an unknown one raises
  ``ValueError("model.<name>: ...")``.
  """
  builder = _builder(architecture)
  common = Common(**{k: fields.pop(k) for k in COMMON if k in fields})
  kwargs = fields
  for name, value in (("width", common.width), ("head_hidden", common.head_hidden)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"model.{name}: got {value!r}; expected a positive int")
  allowed = hparams(architecture)
  for name in sorted(kwargs):
    if name not in allowed:
      raise ValueError(f"model.{name}: not a hyperparameter of architecture {architecture!r}; "
                       f"its hyperparameters: {sorted(allowed) or 'none'}")
  return builder(backbone, tasks, common, **kwargs)


__all__ = ["ARCHITECTURES", "COMMON", "Common", "DeepSupervision", "MultiTaskModel", "build",
           "hparams", "labels", "names"]
