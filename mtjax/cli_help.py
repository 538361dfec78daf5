"""``mtjax --help`` and ``mtjax list``: what the command line does and what can be chosen.

The lists are read from the registries (:func:`mtjax.weighting.names`, :data:`mtjax.models.
ARCHITECTURES`, :func:`mtjax.tasks.names`, :data:`mtjax.data.DATASETS`), so a method,
architecture, task or dataset added to its registry is listed here, and in the documentation
site's tables (``docs/hooks.py`` renders :func:`markdown_table`), without further edits.
"""

import inspect
import re
import sys

KINDS = ("methods", "architectures", "tasks", "datasets")

USAGE = """\
usage: mtjax train --config FILE[:ARG] --workdir DIR [--config.FIELD=VALUE ...] [--verbose]
       mtjax eval  --config FILE[:ARG] --workdir DIR [--config.FIELD=VALUE ...]
       mtjax group --workdir RUN --groups K
       mtjax list  {methods|architectures|tasks|datasets}
       mtjax --help | mtjax COMMAND --help"""

HELP = USAGE + """

Multi-task learning for computer vision in JAX/Flax: one shared backbone, one head per task,
and a task-balancing method (loss weighting, gradient aggregation, meta-learned weights).

commands:
  train   Train the config's experiment in the workdir (resumes from its newest checkpoint),
          then evaluate it and write the results table and the figures.
  eval    Evaluate the newest checkpoint of a workdir on the validation and test splits.
  group   Split a finished run's tasks into K groups by its averaged inter-task affinity
          (TAG; the run needs --config.relations.affinity_every > 0).
  list    List what a config can name: weighting methods (with their level), architectures,
          tasks, datasets.

--config FILE[:ARG]
  An ml_collections config file with get_config(arg). ARG (after ':') names the weighting
  method. FILE may also be the name of a config shipped with mtjax (shapes, nyuv2, cityscapes,
  celeba, det_seg, multi_dataset, architectures): `--config shapes:pcgrad` works from an
  installed wheel. Every field can be overridden with --config.FIELD=VALUE.

main config fields (example overrides):
  weighting.name          the method; ARG sets it       --config shapes.py:cagrad
  weighting.<hparam>      the method's hyperparameters  --config.weighting.c=0.2
  grad_level              where gradient methods act    --config.grad_level=representation
  tasks                   the tasks trained together    --config.tasks='("segmentation", "depth")'
  dataset.name            the dataset                   --config.dataset.name=nyuv2
  dataset.data_dir        where it is read from         --config.dataset.data_dir=/data/nyuv2
  dataset.image_size      (height, width)               --config.dataset.image_size='(32, 32)'
  model.architecture      how the tasks share           --config.model.architecture=mtan
  model.backbone          the ResNet                    --config.model.backbone=resnet18
  optimizer.learning_rate the peak learning rate        --config.optimizer.learning_rate=1e-3
  batch_size              the global batch              --config.batch_size=64
  num_steps               training steps                --config.num_steps=2000
  eval_every, log_every   evaluation / logging period   --config.eval_every=100
  mesh.fsdp               split the parameters N ways   --config.mesh.fsdp=4
  relations.conflict_threshold  cosine below which a gradient pair conflicts (default -0.05)

outputs (in --workdir):
  config.json            the run's config
  checkpoints/<step>/    the whole train state and the input pipeline's position
  metrics.jsonl          one JSON line per logging step and per evaluation
  results.json, results.md   final validation and test metrics, Δm% against config.baselines
  curves.png, relations.png, predictions/step_<N>.png   the run's figures

examples:
  mtjax train --config experiments/configs/shapes.py --workdir workdirs/shapes
  mtjax train --config shapes:pcgrad --workdir workdirs/pcgrad --config.num_steps=200
  mtjax list methods

A user error prints one line, `mtjax: error: ...`, and exits with 2 (--verbose: the traceback).
Documentation: docs/index.md in the source tree (the MkDocs site)."""


_SENTENCE_END = re.compile(
    r"(?<!\bAlg)(?<!\bEq)(?<!\bEqs)(?<!\bSec)(?<!\bal)(?<!\bFig)(?<!\bvs)\.\s")
_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj):`~?([^`]+)`")


def _first_sentence(doc: str | None) -> str:
  """The first sentence of a docstring, on one line, in Markdown (Sphinx roles as code)."""
  text = " ".join((doc or "").strip().split("\n\n")[0].split())
  end = _SENTENCE_END.search(text)
  text = text if end is None else text[:end.start() + 1]
  return _ROLE.sub(r"`\1`", text.replace("``", "`"))


def _short(text: str, width: int = 72) -> str:
  return text if len(text) <= width else text[:width - 1].rstrip() + "…"


def _defaults(params: dict) -> str:
  return ", ".join(f"{k}={v!r}" for k, v in params.items()) or "-"


def rows(kind: str) -> list[tuple[str, ...]]:
  """The registry ``kind`` (one of :data:`KINDS`) as rows of strings, one per entry, sorted.

  methods: ``(name, level, summary, hyperparameters)``; architectures: ``(name, summary,
  hyperparameters)``; tasks: ``(name, summary, options)``; datasets: ``(name, tasks, image
  sizes, how it is read)``.
  """
  if kind == "methods":
    from mtjax import weighting
    out = []
    for name in weighting.names():
      factory = weighting._REGISTRY[name]  # noqa: SLF001 -- the registry is this module's source
      out.append((name, weighting.get(name).level, _first_sentence(factory.__doc__),
                  _defaults(weighting.hparams(name))))
    return out
  if kind == "architectures":
    from mtjax import models
    return [(name, ARCHITECTURE_SUMMARY.get(name, _first_sentence(
        models.ARCHITECTURES[name].__doc__)), _defaults(models.hparams(name)))
            for name in models.names()]
  if kind == "tasks":
    from mtjax import tasks
    out = []
    for name in tasks.names():
      factory = tasks._REGISTRY[name]  # noqa: SLF001
      module = sys.modules[factory.__module__]
      params = {p.name: p.default for p in inspect.signature(factory).parameters.values()}
      out.append((name, _first_sentence(module.__doc__), _defaults(params)))
    return out
  if kind == "datasets":
    from mtjax import data
    out = []
    for name in sorted(data.DATASETS):
      info = data.dataset_info(name)
      task_names = sorted(info["tasks"])
      shown = (", ".join(task_names) if len(task_names) <= 6
               else f"{len(task_names)} tasks ({task_names[0]}, ...)")
      sizes = ", ".join(f"{h}x{w}" for h, w in info["image_sizes"])
      spec = data.DATASETS[name]
      read = ("TFDS, prepared as ArrayRecord" if spec.tfds else
              "built on first use" if name == "shapes" else "files in config.dataset.data_dir")
      out.append((name, shown, sizes, read))
    return out
  raise ValueError(f"mtjax list: unknown kind {kind!r}; expected one of {KINDS}")


HEADERS = {"methods": ("name", "level", "method", "hyperparameters (defaults)"),
           "architectures": ("name", "architecture", "hyperparameters (defaults)"),
           "tasks": ("name", "task", "options (defaults)"),
           "datasets": ("name", "tasks", "image sizes", "read from")}

# One line per architecture for the lists (the builders' docstrings describe hyperparameters).
ARCHITECTURE_SUMMARY = {
    "hard": "One backbone, one head per task (Caruana, 1997).",
    "partial": "Backbone shared up to `branch_stage`, per-task copies of the later stages.",
    "cross_stitch": "One backbone per task, cross-stitch units between stages (Misra et al., "
                    "2016).",
    "mtan": "Shared backbone, per-task attention masks over its stages (Liu, Johns & Davison, "
            "2019).",
    "pad_net": "Intermediate per-task predictions, attention-guided distillation before the "
               "final heads (Xu et al., 2018).",
    "ltb": "Learning to branch: T nodes per stage, each picks its parent by Gumbel-softmax "
           "(Guo, Lee & Ulbricht, 2020).",
    "mmoe": "Shared experts mixed by each task's softmax gate (Ma et al., 2018).",
    "cgc": "Shared and task-owned experts, each task's gate mixes the shared and its own "
           "(Tang et al., 2020).",
    "ple": "CGC stacked over the last stages with a shared stream (Tang et al., 2020).",
    "dselect_k": "MMoE's experts with a differentiable top-k gate (Hazimeh et al., 2021).",
    "segnet_mtan": "SegNet with per-task attention, as LibMTL's segnet_mtan.py (Liu et al., "
                   "2019); backbone 'segnet'.",
}


def format_list(kind: str) -> str:
  """``mtjax list KIND`` as aligned plain text."""
  table = [HEADERS[kind], *(tuple(_short(c) for c in r) for r in rows(kind))]
  last = len(table[0]) - 1
  widths = [max(len(r[i]) for r in table) for i in range(last)]
  lines = []
  for r in table:
    lines.append("  ".join([*(c.ljust(w) for c, w in zip(r[:last], widths, strict=True)),
                            r[last]]).rstrip())
  return "\n".join(lines)


def markdown_table(kind: str) -> str:
  """The registry ``kind`` as a Markdown table (the documentation site's lists)."""
  def cell(text):  # "|" (norms in formulas) as U+2223: a table cell cannot hold a pipe in code
    return text.replace("|", "\u2223")
  header = HEADERS[kind]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows(kind):
    lines.append("| " + " | ".join([f"`{r[0]}`", *(cell(c) for c in r[1:])]) + " |")
  return "\n".join(lines)


def main_help(argv: list[str]) -> int | None:
  """Handles ``mtjax``, ``mtjax --help`` and ``mtjax list ...``: returns the exit code, or None
  when ``argv`` is another command (``train``, ``eval``, ``group``) for the CLI to run."""
  args = argv[1:]
  if not args:
    print(USAGE + "\n\n`mtjax --help` says more.", file=sys.stderr)
    return 2
  if args[0] in ("-h", "--help", "help") or (args[0] == "list" and "--help" in args):
    print(HELP)
    return 0
  if args[0] == "list":
    if len(args) != 2 or args[1] not in KINDS:
      print(f"mtjax: error: mtjax list needs one of: {', '.join(KINDS)}", file=sys.stderr)
      return 2
    print(format_list(args[1]))
    return 0
  if args[0] not in ("train", "eval", "group"):
    print(f"mtjax: error: unknown command {args[0]!r}\n{USAGE}", file=sys.stderr)
    return 2
  return None


def config_dirs() -> list:
  """Where the experiment configs shipped with mtjax are: ``mtjax/configs/`` in an installed
  package (the wheel carries ``experiments/configs/*.py`` there), ``experiments/configs/`` in a
  source checkout."""
  import pathlib

  import mtjax
  package = pathlib.Path(mtjax.__file__).resolve().parent
  return [d for d in (package / "configs", package.parent / "experiments" / "configs")
          if d.is_dir()]


def packaged_configs() -> list[str]:
  """The names of the shipped experiment configs (``shapes``, ``nyuv2``, ...)."""
  return sorted({p.stem for d in config_dirs() for p in d.glob("*.py")
                 if not p.name.startswith("_")})


def resolve_config(value: str) -> str:
  """``--config NAME[:ARG]`` with ``NAME`` a shipped config (no path, no ``.py``, not a file
  here) becomes the path of that config file; anything else is returned unchanged."""
  import os
  name, sep, arg = value.partition(":")
  if not name or os.path.exists(name) or os.sep in name or "/" in name or name.endswith(".py"):
    return value
  for d in config_dirs():
    path = d / f"{name}.py"
    if path.is_file():
      return f"{path}{sep}{arg}"
  return value


def resolve_config_args(argv: list[str]) -> list[str]:
  """``argv`` with the value of ``--config`` resolved by :func:`resolve_config`."""
  out, args = [], iter(argv)
  for a in args:
    if a == "--config":
      out.append(a)
      value = next(args, None)
      if value is not None:
        out.append(resolve_config(value))
    elif a.startswith("--config="):
      out.append("--config=" + resolve_config(a.split("=", 1)[1]))
    else:
      out.append(a)
  return out
