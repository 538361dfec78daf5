"""mtjax against a PyTorch peer of the same model, losses and batch, in one process.

    PYTHONPATH=. python benchmarks/compare_torch.py --setup cpu_resnet18 --out /tmp/cmp
    PYTHONPATH=. python benchmarks/compare_torch.py --setup resnet50 --out $OUT   # GPU

Four train steps are compared, each mtjax step with its PyTorch peers
(:mod:`benchmarks.torch_peer`):

=====================  ============================  =============================================
step                   mtjax                         PyTorch
=====================  ============================  =============================================
equal weighting        ``ew`` (one backward)         eager; ``torch.compile`` (``--compile``)
MGDA, representation   ``mgda``, representation      LibMTL-style ``rep_grad``: T head backwards
PCGrad, parameter      ``pcgrad``, parameter         LibMTL-style: T ``autograd.grad`` calls
UPGrad, parameter      ``upgrad``, parameter         torchjd ``mtl_backward`` + ``UPGrad``
=====================  ============================  =============================================

Both sides start from the same weights (mtjax's initialisation copied into the PyTorch model)
and the first EW step is checked: the three losses and the update of two parameters must agree
(float32: to 1e-4 and 2e-3 relative; bf16: recorded, not asserted). Then every step is compiled
or warmed up, and ``--rounds`` rounds each run, for every comparison, every implementation for
``--block-warmup`` untimed and ``--steps`` timed steps, the libraries alternating (mtjax first in
even rounds, last in odd ones), so both see the same machine load. Medians, quartiles and extremes
are over all rounds' timed steps; the ratio is mtjax's median over the peer's. Each step is timed
to completion (``jax.block_until_ready``; ``torch.cuda.synchronize`` on a GPU).

Writes ``<out>/compare_torch_<setup>.json`` (every step time, hardware, versions, the load
average before and after) and ``.md`` (the table the README shows) -- the table only when the
1-minute load average stayed within the usable cores plus half a core (the benchmark's own
threads count toward the load: an idle machine running it alone reads ≈ the core count; else a
warning; ``--allow-busy`` writes it marked as not a speed figure). ``--torch off`` (or no
torch installed, with ``--torch auto``) measures the mtjax side alone.
"""

import os

# JAX and PyTorch share one GPU here: JAX must not reserve 75 % of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import step_time  # noqa: E402

SETUPS = {
    # The CPU side-by-side of ../shared/REFERENCE.md: ResNet-18 width 64, 3×3/2 stem, no max pool.
    "cpu_resnet18": dict(step_time.SETUPS["resnet50"], backbone="resnet18", stem="small",
                         output_stride=32, head_hidden=64, image_size=(64, 64), batch=16,
                         dtype="float32"),
    # The GPU anchor of REFERENCE.md (bf16; PyTorch: autocast bf16 + channels_last).
    "resnet50": dict(step_time.SETUPS["resnet50"]),
    # For tests: the default experiment's model, with SGD.
    "tiny": dict(step_time.SETUPS["tiny"], optimizer="sgd", learning_rate=1e-2),
}
# (key, title, mtjax (method, level), PyTorch peers)
COMPARISONS = (
    ("ew", "equal weighting", ("ew", "loss"), ("ew", "ew_compile")),
    ("mgda_rep", "MGDA, representation level", ("mgda", "representation"), ("mgda_rep",)),
    ("pcgrad_param", "PCGrad, parameter level", ("pcgrad", "parameter"),
     ("libmtl_pcgrad", "torchjd_pcgrad")),
    ("upgrad_param", "UPGrad, parameter level", ("upgrad", "parameter"), ("torchjd_upgrad",)),
)
PEER_NAMES = {
    "ew": "PyTorch eager", "ew_compile": "PyTorch `torch.compile`",
    "mgda_rep": "PyTorch eager, LibMTL-style rep_grad",
    "libmtl_pcgrad": "LibMTL-style loop (T `autograd.grad`)",
    "torchjd_pcgrad": "torchjd `mtl_backward` + PCGrad",
    "torchjd_upgrad": "torchjd `mtl_backward` + UPGrad",
}
TASKS = ("segmentation", "depth", "normals")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--setup", choices=sorted(SETUPS), default="cpu_resnet18")
  p.add_argument("--only", default="ew,mgda_rep,pcgrad_param,upgrad_param",
                 help="comparisons to run: " + ",".join(c[0] for c in COMPARISONS))
  p.add_argument("--peers", default="ew,mgda_rep,libmtl_pcgrad,torchjd_upgrad",
                 help="PyTorch variants: " + ",".join(PEER_NAMES) + " (ew_compile: see --compile)")
  p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                 help="add torch.compile for EW (auto: on a GPU only)")
  p.add_argument("--torch", choices=("auto", "on", "off"), default="auto",
                 help="auto: the PyTorch side if torch imports, else mtjax alone")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=30, help="timed steps per block")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps before round 1")
  p.add_argument("--block-warmup", type=int, default=2, help="untimed steps before each block")
  p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on a CPU")
  p.add_argument("--image-size", default=None, help="H or HxW (default: the setup's)")
  p.add_argument("--batch", type=int, default=None)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="directory for compare_torch_<setup>.json/.md")
  p.add_argument("--render", default=None, metavar="JSON",
                 help="measure nothing: rewrite JSON's .md (and its per-round ratios)")
  p.add_argument("--allow-busy", action="store_true",
                 help="write the .md table even when the load average exceeded the core count "
                      "(it then says it is not a speed figure); for tests")
  return p.parse_args(argv)


def busy(info) -> str | None:
  """Why the run is not a speed figure (the 1-minute load average, before or after, above the
  usable CPU cores + 0.5: other jobs shared the machine), or None. The benchmark itself keeps up
  to one runnable thread per core, so a machine running it alone reads about the core count
  after it (2.05 on 2 cores, 2026-11-29, nothing else running)."""
  hw = info["hardware"]
  cores = hw.get("cpus_usable") or hw.get("cpu_count") or 1
  load = max(info["load_before"][0], info["load_after"][0])
  if load > cores + 0.5:
    return (f"the load average reached {load:.2f} on {cores} usable cores: other jobs shared "
            "the machine, so these times are not a speed figure; rerun on an idle machine")
  return None


def write_table(path_md: str, info, table: str, allow_busy: bool) -> bool:
  """Writes the .md table (what the README shows) unless the machine was busy; says why not."""
  reason = busy(info)
  if reason and not allow_busy:
    print(f"compare_torch: WARNING: {reason}. The table {path_md} was NOT written (the JSON "
          "keeps every time); --allow-busy writes it anyway, marked.", file=sys.stderr,
          flush=True)
    return False
  with open(path_md, "w") as f:
    f.write(table)
  return True


def resolve(args):
  cfg = dict(SETUPS[args.setup], num_tasks=len(TASKS))
  if args.image_size:
    h, _, w = args.image_size.lower().partition("x")
    cfg["image_size"] = (int(h), int(w or h))
  if args.batch:
    cfg["batch"] = args.batch
  if args.dtype:
    cfg["dtype"] = args.dtype
  return cfg


# -------------------------------------------------------------------------------------------
# The mtjax side: every call into mtjax is in this function (one place to follow API changes).


def build_mtjax(cfg, batch, runs):
  """mtjax's initial variables and one train step per ``(method, level)`` of ``runs``.

  Returns ``((params, batch_stats), {(method, level): step})``: the numpy trees of the shared
  initial state (for the PyTorch side) and, per run, ``step() -> metrics``, which runs one
  jitted train step on its own state and the device copy of ``batch`` and waits for it;
  ``step.params()`` reads that state's current parameters.
  """
  from mtjax import weighting
  from mtjax.train import step as step_lib

  model, tasks, optimizer = step_time.build_setup(cfg)
  mesh = step_lib.make_mesh()
  device_batch = step_lib.shard_batch(batch, mesh)
  base = step_time.base_state(model, tasks, optimizer, cfg)

  def make(name, level):
    method = weighting.get(name)
    grad_level = level if level in step_lib.GRAD_LEVELS else "parameter"
    state = step_time.fresh_state(base, model, method, len(tasks), grad_level, cfg)
    box = [step_lib.replicate(state, mesh)]
    trainer = step_time.make_trainer(model, tasks, method, optimizer, grad_level, cfg, mesh)

    def step():
      box[0], metrics = jax.block_until_ready(trainer.step(box[0], device_batch))
      return metrics

    step.params = lambda: jax.device_get(box[0].params)
    return step

  variables = jax.device_get((base.params, base.batch_stats))
  return variables, {run: make(*run) for run in runs}


# -------------------------------------------------------------------------------------------
# The PyTorch side


def build_torch(cfg, batch, variables, peers, args):
  """``{variant: torch_peer.Peer}``, each with its own copy of mtjax's initial weights."""
  import torch

  from benchmarks import torch_peer

  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cpu":
    torch.set_num_threads(args.threads)
  bf16 = cfg["dtype"] == "bfloat16"
  heads = {"segmentation": cfg["num_classes"], "depth": 1, "normals": 3}
  model_kwargs = dict(backbone=cfg["backbone"], width=cfg["width"],
                      output_stride=cfg["output_stride"], stem=cfg["stem"],
                      head_hidden=cfg["head_hidden"])
  return {v: torch_peer.Peer(v, heads, model_kwargs, batch, variables=variables,
                             learning_rate=cfg["learning_rate"], device=device, bf16=bf16,
                             channels_last=bf16 and device == "cuda", seed=args.seed)
          for v in peers}


def timed(step, sync):
  start = time.perf_counter()
  step()
  sync()
  return 1e3 * (time.perf_counter() - start)


def check_equal(mtjax_step, torch_peer_ew, variables, bf16):
  """One EW step on both sides from the same weights: losses and two parameter updates."""
  import torch

  metrics = mtjax_step()
  jax_losses = np.array([float(metrics[f"loss/{t}"]) for t in TASKS])
  torch_losses = torch_peer_ew.step().float().cpu().numpy()
  params0 = variables[0]
  params1 = mtjax_step.params()
  net = torch_peer_ew.net
  pairs = {
      "stem conv kernel": (params0["backbone"]["Conv_0"]["kernel"],
                           params1["backbone"]["Conv_0"]["kernel"],
                           net.backbone.stem_conv.weight, (2, 3, 1, 0)),
      "segmentation head conv1×1 bias": (params0["heads_segmentation"]["Conv_1"]["bias"],
                                         params1["heads_segmentation"]["Conv_1"]["bias"],
                                         net.heads["segmentation"].conv1.bias, None),
  }
  updates = {}
  for name, (p0, p1, tp, perm) in pairs.items():
    with torch.no_grad():
      t1 = tp.detach().float().cpu().numpy()
    if perm is not None:
      t1 = t1.transpose(perm)
    du_jax, du_torch = np.asarray(p1) - np.asarray(p0), t1 - np.asarray(p0)
    updates[name] = float(np.linalg.norm(du_jax - du_torch) / np.linalg.norm(du_torch))
  loss_err = float(np.max(np.abs(jax_losses - torch_losses) / np.abs(torch_losses)))
  result = {"losses_mtjax": jax_losses.tolist(), "losses_torch": torch_losses.tolist(),
            "loss_max_rel_err": loss_err, "update_rel_err": updates,
            "asserted": not bf16}
  if not np.all(np.isfinite(jax_losses)) or not np.all(np.isfinite(torch_losses)):
    raise AssertionError(f"non-finite losses: {result}")
  if not bf16 and (loss_err > 1e-4 or max(updates.values()) > 2e-3):
    raise AssertionError(f"mtjax and the PyTorch peer disagree at equal weights: {result}")
  return result


# -------------------------------------------------------------------------------------------
# Report


def _version(name):
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def hardware():
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return {
      "cpu": cpu, "cpu_count": os.cpu_count(),
      "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
      "jax_backend": jax.default_backend(), "jax_device": jax.devices()[0].device_kind,
      "jax_devices": jax.device_count(),
  }


def spread(times):
  q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
  return {"median_ms": statistics.median(times), "q1_ms": q1, "q3_ms": q3,
          "min_ms": min(times), "max_ms": max(times), "n": len(times)}


def round_ratios(mtjax_times, peer_times, rounds):
  """mtjax's block median over the peer's, round by round (the blocks ran back to back)."""
  m, p = np.array_split(mtjax_times, rounds), np.array_split(peer_times, rounds)
  return [float(np.median(a) / np.median(b)) for a, b in zip(m, p, strict=True)]


def _fmt(s):
  return (f"{s['median_ms']:.1f} ({s['q1_ms']:.1f}–{s['q3_ms']:.1f}; "
          f"{s['min_ms']:.1f}–{s['max_ms']:.1f})")


def markdown(info, rows):
  hw, v = info["hardware"], info["versions"]
  device = hw["jax_device"] if hw["jax_backend"] != "cpu" else hw["cpu"]
  lines = [
      f"# mtjax vs PyTorch, one train step ({info['setup']})", "",
      f"- hardware: {device}; {hw['cpus_usable']} usable CPU cores of {hw['cpu_count']}"
      + (f"; torch threads {info['torch_threads']}" if info.get("torch_threads") else ""),
      f"- versions: jax {v['jax']}, flax {v['flax']}, optax {v['optax']}, torch {v['torch']}, "
      f"torchjd {v['torchjd']}; Python {v['python']}",
      f"- setup: {info['setup']}: {info['cfg']['backbone']} width {info['cfg']['width']}, stem "
      f"{info['cfg']['stem']}, output stride {info['cfg']['output_stride']}, heads hidden "
      f"{info['cfg']['head_hidden']}, {info['cfg']['num_classes']}-class segmentation + depth + "
      f"normals, batch {info['cfg']['batch']} of "
      f"{info['cfg']['image_size'][0]}×{info['cfg']['image_size'][1]}, {info['cfg']['dtype']}, "
      f"SGD momentum 0.9",
      f"- timing: {info['rounds']} alternating rounds × {info['steps']} timed steps per "
      f"implementation ({info['block_warmup']} untimed before each block, {info['warmup']} "
      "before round 1); ms: median (quartiles; min–max); ratio = mtjax median / PyTorch median; "
      "per round: the ratio of the two blocks' medians in each round",
      f"- load average (1, 5, 15 min) before: {info['load_before']}, after: {info['load_after']}",
      f"- date: {info['date']}; command: `{info['command']}`",
  ]
  if busy(info):
    lines.append(f"- **NOT A SPEED FIGURE: {busy(info)}.**")
  if info.get("check"):
    c = info["check"]
    lines.append(f"- equal-weights check (first EW step, same init and batch): losses max rel. "
                 f"err {c['loss_max_rel_err']:.1e}, updates rel. err "
                 + ", ".join(f"{k} {e:.1e}" for k, e in c["update_rel_err"].items())
                 + ("" if c["asserted"] else " (bf16: not asserted)"))
  lines += ["", "| step | mtjax ms | PyTorch peer | peer ms | mtjax / peer | per round |",
            "|---|---|---|---|---|---|"]
  for r in rows:
    m = r["mtjax"]
    m_txt = f"error: {m['error'][:60]}" if "error" in m else _fmt(m)
    if not r["peers"]:
      lines.append(f"| {r['title']} | {m_txt} | — | — | — | — |")
    for p in r["peers"]:
      if "error" in p:
        lines.append(f"| {r['title']} | {m_txt} | {PEER_NAMES[p['variant']]} | "
                     f"error: {p['error'][:60]} | — | — |")
        continue
      ratio = "—" if p.get("ratio") is None else f"**{p['ratio']:.2f}×**"
      per_round = ", ".join(f"{x:.2f}" for x in p.get("round_ratios", [])) or "—"
      note = f" ({p['note']})" if p.get("note") else ""
      lines.append(f"| {r['title']} | {m_txt} | {PEER_NAMES[p['variant']]}{note} | {_fmt(p)} | "
                   f"{ratio} | {per_round} |")
  return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------


def _torch_wanted(mode):
  if mode == "off":
    return False
  try:
    import torch  # noqa: F401
  except ImportError:
    if mode == "on":
      raise
    return False
  return True


def render(path, allow_busy=False):
  """Rewrites the table of a saved run (``--render``); returns its result."""
  with open(path) as f:
    result = json.load(f)
  result["info"]["load_ok"] = busy(result["info"]) is None
  for row in result["rows"]:
    for p in row["peers"]:
      if "times_ms" in p and "times_ms" in row["mtjax"]:
        p["round_ratios"] = round_ratios(row["mtjax"]["times_ms"], p["times_ms"],
                                         result["info"]["rounds"])
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  write_table(path[:-len(".json")] + ".md", result["info"],
              markdown(result["info"], result["rows"]), allow_busy)
  return result


def main(argv=None):
  args = parse_args(argv)
  if args.render:
    return render(args.render, args.allow_busy)
  argv = sys.argv[1:] if argv is None else argv
  cfg = resolve(args)
  load_before = [round(x, 2) for x in os.getloadavg()]
  wanted = [c.strip() for c in args.only.split(",") if c.strip()]
  comparisons = [c for c in COMPARISONS if c[0] in wanted]
  if len(comparisons) != len(wanted):
    raise ValueError(f"--only: expected some of {[c[0] for c in COMPARISONS]}, got {wanted}")
  use_torch = _torch_wanted(args.torch)
  peers = [p.strip() for p in args.peers.split(",") if p.strip()]
  for p in peers:
    if p not in PEER_NAMES:
      raise ValueError(f"--peers: unknown {p!r}; valid: {list(PEER_NAMES)}")
  on_gpu = jax.default_backend() == "gpu"
  if args.compile == "on" or (args.compile == "auto" and on_gpu):
    peers.append("ew_compile")
  if "torchjd_upgrad" in peers or "torchjd_pcgrad" in peers:
    if _version("torchjd") is None:
      print("torchjd is not installed: its variants are left out", flush=True)
      peers = [p for p in peers if not p.startswith("torchjd_")]
  if not use_torch:
    peers = []

  rng = np.random.default_rng(args.seed)
  batch = step_time.synthetic_batch(rng, cfg["batch"], cfg["image_size"], cfg["num_classes"])
  runs = [c[2] for c in comparisons]
  if ("ew", "loss") not in runs:
    runs.append(("ew", "loss"))  # the equality check
  variables, jax_steps = build_mtjax(cfg, batch, runs)

  torch_steps, sync, check, torch_threads = {}, (lambda: None), None, None
  if use_torch:
    import torch
    check_peers = list(dict.fromkeys(["ew", *peers]))
    torch_steps = build_torch(cfg, batch, variables, check_peers, args)
    torch_threads = torch.get_num_threads() if not torch.cuda.is_available() else None
    sync = next(iter(torch_steps.values())).synchronize
    check = check_equal(jax_steps[("ew", "loss")], torch_steps["ew"], variables,
                        cfg["dtype"] == "bfloat16")
    print("equal-weights check:", json.dumps(check), flush=True)
    if "ew" not in peers:
      del torch_steps["ew"]

  impls = {}  # name -> (step, sync)
  for key, _, run, variants in comparisons:
    impls[("mtjax", key)] = (jax_steps[run], lambda: None)
    for v in variants:
      if v in torch_steps:
        impls[("torch", v)] = (torch_steps[v].step, sync)
  compile_s, errors = {}, {}
  for name, (step, sync_fn) in impls.items():  # compilation / warm-up, untimed
    start = time.perf_counter()
    try:
      step()
      sync_fn()
      compile_s[name] = time.perf_counter() - start
      for _ in range(args.warmup):
        step()
      sync_fn()
    except Exception as e:  # noqa: BLE001 - one failing implementation (e.g. OOM) is reported
      errors[name] = f"{type(e).__name__}: {e}"
      print(f"{name}: ERROR {errors[name][:300]}", flush=True)
    print(f"{name}: first step {compile_s.get(name, float('nan')):.1f} s", flush=True)

  times = {name: [] for name in impls if name not in errors}
  for r in range(args.rounds):
    for key, _, _, variants in comparisons:
      names = [n for n in [("mtjax", key)] + [("torch", v) for v in variants] if n in times]
      for name in (names if r % 2 == 0 else names[::-1]):
        step, sync_fn = impls[name]
        for _ in range(args.block_warmup):
          step()
        sync_fn()
        block = [timed(step, sync_fn) for _ in range(args.steps)]
        times[name] += block
        print(f"round {r} {name[0]:5s} {name[1]:16s} median {statistics.median(block):8.1f} ms",
              flush=True)

  rows = []
  for key, title, run, variants in comparisons:
    def stats(name):
      if name in errors:
        return {"error": errors[name]}
      return {**spread(times[name]), "first_step_s": compile_s[name], "times_ms": times[name]}
    m = stats(("mtjax", key))
    row = {"key": key, "title": title, "mtjax_method": list(run), "mtjax": m, "peers": []}
    for v in variants:
      if ("torch", v) not in impls:
        continue
      p = {"variant": v, **stats(("torch", v))}
      if torch_steps[v].note:
        p["note"] = torch_steps[v].note
      if "median_ms" in p and "median_ms" in m:
        p["ratio"] = m["median_ms"] / p["median_ms"]
        p["round_ratios"] = round_ratios(m["times_ms"], p["times_ms"], args.rounds)
      row["peers"].append(p)
    rows.append(row)

  info = {
      "setup": args.setup, "cfg": {**cfg, "image_size": list(cfg["image_size"])},
      "hardware": hardware(),
      "versions": {"jax": jax.__version__, "flax": _version("flax"), "optax": _version("optax"),
                   "torch": _version("torch") if use_torch else None,
                   "torchjd": _version("torchjd") if use_torch else None,
                   "python": platform.python_version()},
      "torch_threads": torch_threads,
      "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
      "block_warmup": args.block_warmup, "check": check,
      "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
      "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "command": "PYTHONPATH=. python benchmarks/compare_torch.py " + " ".join(argv),
  }
  if use_torch and torch_steps:
    import torch
    if torch.cuda.is_available():
      info["hardware"]["torch_device"] = torch.cuda.get_device_name()
  result = {"info": info, "rows": rows}
  table = markdown(info, rows)
  print(table, flush=True)
  info["load_ok"] = busy(info) is None
  if args.out:
    prefix = os.path.join(args.out, f"compare_torch_{args.setup}")
    os.makedirs(args.out, exist_ok=True)
    with open(prefix + ".json", "w") as f:
      json.dump(result, f, indent=2)
    write_table(prefix + ".md", info, table, args.allow_busy)
  return result


if __name__ == "__main__":
  main()
