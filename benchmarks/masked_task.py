"""What each weighting method does with a task masked out of a step (several datasets).

On a step whose dataset does not label task t, t's loss is 0 and its gradient row is 0
(``mtjax/data/mixing.py``). For every loss- and gradient-level method, T=3 tasks, task 0
masked: ``cos`` and ``norm`` compare the direction it returns with the direction it returns for
the two other tasks alone (1 and 1: the masked task is simply absent); ``next cos`` compares the
direction of the following step, every task present, after the masked step with the one after
an unmasked step (1: the masked step left no trace in the method's state); ``finite``: every
direction finite. Random Gaussian gradients of dimension 64 and losses in [0.5, 2], medians of
8 draws; stateful methods start from their initial state. Not a speed benchmark.

    python3 -m benchmarks.masked_task   # writes benchmarks/results/masked_task.md
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from mtjax import weighting

DIM, DRAWS = 64, 8


def _step(method, state, grads, losses, key):
  """(direction, new state) of one call."""
  if method.level == "loss":
    _, state, w = method.update(None, state, losses=losses, key=key)
    return jnp.einsum("t,td->d", jnp.nan_to_num(w), grads), state
  combined, state, _ = method.update({"w": grads}, state, losses=losses, key=key)
  return combined["w"], state


def _init(method, num_tasks):
  return method.init(num_tasks, {"w": jnp.zeros((DIM,))})


def _cos(a, b):
  na, nb = float(jnp.linalg.norm(a)), float(jnp.linalg.norm(b))
  return float(jnp.dot(a, b)) / max(na * nb, 1e-30), na / max(nb, 1e-30)


def _compare(method, rng):
  """Medians of cos, norm ratio and next cos over DRAWS draws; whether all were finite."""
  run = jax.jit(lambda s, g, losses, k: _step(method, s, g, losses, k))
  cos, norm, after, finite = [], [], [], True
  for d in range(DRAWS):
    g = jnp.asarray(rng.normal(size=(3, DIM)), jnp.float32)
    g2 = jnp.asarray(rng.normal(size=(3, DIM)), jnp.float32)
    losses = jnp.asarray(rng.uniform(0.5, 2.0, 3), jnp.float32)
    losses2 = jnp.asarray(rng.uniform(0.5, 2.0, 3), jnp.float32)
    key, key2 = jax.random.PRNGKey(d), jax.random.PRNGKey(100 + d)
    masked, s_masked = run(_init(method, 3), g.at[0].set(0.0), losses.at[0].set(0.0), key)
    alone, _ = run(_init(method, 2), g[1:], losses[1:], key)
    _, s_full = run(_init(method, 3), g, losses, key)
    next_masked, _ = run(s_masked, g2, losses2, key2)
    next_full, _ = run(s_full, g2, losses2, key2)
    finite &= bool(jnp.all(jnp.isfinite(masked)) and jnp.all(jnp.isfinite(next_masked)))
    c, r = _cos(masked, alone)
    cos.append(c)
    norm.append(r)
    after.append(_cos(next_masked, next_full)[0])
  return (float(np.median(cos)), float(np.median(norm)), float(np.median(after)), finite)


def main():
  rows = []
  rng = np.random.default_rng(0)
  for name in weighting.names():
    method = weighting.get(name)
    if method.level == "meta":
      continue
    try:
      rows.append((name, method.level, *_compare(method, rng)))
    except Exception as e:  # noqa: BLE001 -- a method this comparison cannot call: say so
      print(f"{name}: not compared ({type(e).__name__}: {e})")
  lines = ["| method | level | cos (masked vs two tasks alone) | norm ratio | next cos | finite |",
           "|---|---|---|---|---|---|"]
  lines += [f"| `{n}` | {lv} | {c:+.3f} | {r:.3f} | {a:+.3f} | {'yes' if f else 'NO'} |"
            for n, lv, c, r, a, f in rows]
  text = "\n".join(lines)
  print(text)
  out = os.path.join(os.path.dirname(__file__), "results", "masked_task.md")
  with open(out, "w") as f:
    f.write("# " + __doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1].replace("\n", " ")
            + "\n\n" + text + "\n")


if __name__ == "__main__":
  main()
