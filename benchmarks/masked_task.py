"""What each weighting method does with a task masked out of a step (several datasets).

On a step whose dataset does not label task t, t's loss is 0 and its gradient row is 0
(``mtjax/data/mixing.py``). This compares, for every gradient- and loss-level method, the
direction it returns for T=3 tasks with row 0 zeroed (loss 0) against the direction it returns
for the two other tasks alone: ``cos`` (1: the same direction), ``norm`` (ratio of norms), and
whether it stays finite. Random Gaussian gradients, several draws (median); stateful methods
are called once from their initial state. Not a speed benchmark.

    python3 -m benchmarks.masked_task   # writes benchmarks/results/masked_task.md
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from mtjax import weighting

DIM, DRAWS = 64, 8


def _direction(method, grads, losses, key):
  tree = {"w": grads}
  state = method.init(grads.shape[0], {"w": jnp.zeros(grads.shape[1:])})
  if method.level == "loss":
    _, _, w = method.update(None, state, losses=losses, key=key)
    return jnp.einsum("t,td->d", jnp.nan_to_num(w), grads)
  combined, _, _ = method.update(tree, state, losses=losses, key=key)
  return combined["w"]


def main():
  rows = []
  rng = np.random.default_rng(0)
  for name in weighting.names():
    method = weighting.get(name)
    if method.level == "meta":
      continue
    run = jax.jit(lambda g, losses, k, m=method: _direction(m, g, losses, k))
    cos, norm, finite = [], [], True
    for d in range(DRAWS):
      g = jnp.asarray(rng.normal(size=(3, DIM)), jnp.float32)
      losses = jnp.asarray(rng.uniform(0.5, 2.0, 3), jnp.float32)
      key = jax.random.PRNGKey(d)
      masked = run(g.at[0].set(0.0), losses.at[0].set(0.0), key)
      alone = run(g[1:], losses[1:], key)
      finite &= bool(jnp.all(jnp.isfinite(masked)))
      na, nb = float(jnp.linalg.norm(masked)), float(jnp.linalg.norm(alone))
      cos.append(float(jnp.dot(masked, alone)) / max(na * nb, 1e-30))
      norm.append(na / max(nb, 1e-30))
    rows.append((name, method.level, float(np.median(cos)), float(np.median(norm)), finite))
  lines = ["| method | level | cos(masked, two tasks alone) | norm ratio | finite |",
           "|---|---|---|---|---|"]
  lines += [f"| `{n}` | {lv} | {c:+.3f} | {r:.3f} | {'yes' if f else 'NO'} |"
            for n, lv, c, r, f in rows]
  text = "\n".join(lines)
  print(text)
  out = os.path.join(os.path.dirname(__file__), "results", "masked_task.md")
  with open(out, "w") as f:
    f.write(__doc__.split("\n\n")[1].replace("\n", " ") + "\n\n" + text + "\n")


if __name__ == "__main__":
  main()
