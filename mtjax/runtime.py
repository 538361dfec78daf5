"""Process-wide XLA settings that must be made before JAX's backend starts.

Two settings a run depends on and that no jitted function can change afterwards:

- **Deterministic GPU execution.** On a GPU, XLA may pick kernels that accumulate with atomics
  (scatter-adds, some reductions) and autotune convolution algorithms by timing them, so two
  runs of one config and one PRNG key can differ in the last bits, and then diverge.
  ``--xla_gpu_deterministic_ops=true`` makes XLA use deterministic implementations only and
  autotune among deterministic algorithms (it implies ``--xla_gpu_exclude_nondeterministic_ops``,
  openxla/xla#12520). CPU execution is deterministic with or without it (the flag is a GPU
  option; XLA's CPU backend reads and ignores it).
- **The persistent compilation cache.** JAX's own (``jax_compilation_cache_dir``): a compiled
  executable keyed by the module, the flags, the devices and the JAX version is written to disk,
  so that a repeated or resumed run of the same config loads its step instead of compiling it.

``mtjax train|eval`` applies both from the config (``config.deterministic``,
``config.compilation_cache``) before anything touches a device; a script that uses the
library directly calls :func:`set_deterministic` and :func:`set_compilation_cache` first.
"""

import os

import jax

# The XLA flags of deterministic GPU execution (XLA's debug options, read from $XLA_FLAGS when
# the backend starts).
DETERMINISTIC_XLA_FLAGS = ("--xla_gpu_deterministic_ops=true",)
# config.compilation_cache = "auto": JAX's own setting if the user made one
# ($JAX_COMPILATION_CACHE_DIR), else this folder.
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "mtjax", "jax")


def backend_started() -> bool:
  """Whether a JAX backend has been initialised in this process (then $XLA_FLAGS is read)."""
  from jax._src import xla_bridge
  return bool(xla_bridge._backends)


def _flag_name(flag: str) -> str:
  return flag.split("=", 1)[0]


def xla_flags_with(existing: str, flags) -> str:
  """``existing`` ($XLA_FLAGS) with each of ``flags`` set: a flag of the same name is replaced."""
  names = {_flag_name(f) for f in flags}
  kept = [f for f in existing.split() if _flag_name(f) not in names]
  return " ".join([*kept, *flags])


def set_deterministic(enabled: bool = True) -> None:
  """Turns XLA's deterministic GPU execution on (or off) for this process.

  Must run before the first JAX computation: XLA reads $XLA_FLAGS once, when the backend
  starts. Raises RuntimeError if the backend has started and the setting would change.
  """
  flags = [f"{_flag_name(f)}={'true' if enabled else 'false'}" for f in DETERMINISTIC_XLA_FLAGS]
  existing = os.environ.get("XLA_FLAGS", "")
  wanted = xla_flags_with(existing, flags)
  if wanted == existing:
    return
  if backend_started() and set(wanted.split()) != set(existing.split()):
    raise RuntimeError(
        "set_deterministic: JAX's backend has already started, so XLA has read $XLA_FLAGS; call "
        "mtjax.runtime.set_deterministic before the first JAX computation (or set XLA_FLAGS="
        f"'{' '.join(flags)}' in the environment)")
  os.environ["XLA_FLAGS"] = wanted


def is_deterministic() -> bool:
  """Whether $XLA_FLAGS asks for deterministic GPU execution."""
  flags = dict(f.split("=", 1) if "=" in f else (f, "true")
               for f in os.environ.get("XLA_FLAGS", "").split())
  return all(flags.get(_flag_name(f), "false").lower() in ("true", "1")
             for f in DETERMINISTIC_XLA_FLAGS)


def resolve_cache_dir(setting: str) -> str | None:
  """The folder of ``config.compilation_cache``: ``"auto"`` (JAX's own setting, e.g.
  $JAX_COMPILATION_CACHE_DIR, else :data:`DEFAULT_CACHE_DIR`), ``""``/``"none"`` (off), or a
  path."""
  if not isinstance(setting, str):
    raise ValueError(f"compilation_cache: got {setting!r}; expected 'auto', 'none' or a folder")
  if setting.lower() in ("", "none"):
    return None
  if setting.lower() == "auto":
    return jax.config.jax_compilation_cache_dir or os.path.expanduser(DEFAULT_CACHE_DIR)
  return os.path.expanduser(setting)


def set_compilation_cache(path: str | None, min_compile_seconds: float = 0.0) -> None:
  """Uses (``path``) or turns off (``None``) JAX's persistent compilation cache in this process.

  Executables whose compilation took at least ``min_compile_seconds`` are written (JAX's own
  default is 1 s; a run of the default experiment compiles ~140 smaller programs too, ≈ 13 s
  in all on the 2-core CPU: ``benchmarks/results/compile_cache_cpu.md``); a later process with
  the same module, flags, devices and JAX version reads them instead of compiling.
  """
  if path is not None:
    os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_enable_compilation_cache", path is not None)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)


def describe() -> dict:
  """This process's settings, as a run's results record them."""
  return {"deterministic": is_deterministic(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "compilation_cache": jax.config.jax_compilation_cache_dir or ""}
