"""mtjax.runtime: the XLA settings a run makes before JAX's backend starts."""

import os

import jax
import jax.numpy as jnp
import pytest

from mtjax import runtime


def test_xla_flags_with_replaces_a_flag_of_the_same_name_and_keeps_the_others():
  existing = "--xla_force_host_platform_device_count=8 --xla_gpu_deterministic_ops=false"
  out = runtime.xla_flags_with(existing, ["--xla_gpu_deterministic_ops=true"])
  assert out.split() == ["--xla_force_host_platform_device_count=8",
                         "--xla_gpu_deterministic_ops=true"]
  assert runtime.xla_flags_with("", ["--a=1"]) == "--a=1"


def test_set_deterministic_after_the_backend_started_refuses_a_change(monkeypatch):
  jnp.ones(2).block_until_ready()   # the backend has started in this process
  assert runtime.backend_started()
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert not runtime.is_deterministic()
  with pytest.raises(RuntimeError, match="before the first JAX computation"):
    runtime.set_deterministic(True)
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"  # unchanged
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=true")
  runtime.set_deterministic(True)   # already so: nothing to change, no error
  assert runtime.is_deterministic()


def test_resolve_cache_dir(tmp_path):
  assert runtime.resolve_cache_dir("none") is None and runtime.resolve_cache_dir("") is None
  assert runtime.resolve_cache_dir(str(tmp_path)) == str(tmp_path)
  jax_own = jax.config.jax_compilation_cache_dir   # the tests' cache ($JAX_COMPILATION_CACHE_DIR)
  assert jax_own and runtime.resolve_cache_dir("auto") == jax_own
  jax.config.update("jax_compilation_cache_dir", None)
  try:
    assert runtime.resolve_cache_dir("auto") == os.path.expanduser(runtime.DEFAULT_CACHE_DIR)
  finally:
    jax.config.update("jax_compilation_cache_dir", jax_own)
  with pytest.raises(ValueError, match="compilation_cache: got 3"):
    runtime.resolve_cache_dir(3)
