"""Test-wide settings: 8 CPU devices for the data-parallel tests, float32 matmuls exact, and one
persistent compilation cache for the session, and fast (unoptimised) XLA compilation.

The cache (JAX's own, keyed by the compiled module, the flags and the JAX version, so an entry of
other code is never reused) is shared by both xdist workers and by the ``python -m mtjax.cli``
processes the CLI and fault tests start: the same tiny step, built by many tests, is compiled
once. The compile-count test still sees one ``backend_compile`` event per function (JAX records
it for a cache hit too). ``JAX_COMPILATION_CACHE_DIR=`` (empty) in the environment turns it off.
"""

import os
import tempfile

# XLA's backend optimisations off: the tests' tiny programs spend most of their time compiling
# (test_loop: 142 -> 117 CPU-s, cold cache). What is checked does not depend on them: results
# are compared within one setting, or with tolerances, or against float64 references.
COMPILE_FAST = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {COMPILE_FAST}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "mtjax-tests-jax-cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 << 30))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
