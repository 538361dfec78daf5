"""docs/hyperparameters.md lists every hyperparameter of every registered weighting method with
the registry's default and a source, and is what experiments/hyperparameters.py writes."""

import importlib.util
import os
import re

from mtjax import weighting

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def _rows():
  with open(os.path.join(ROOT, "docs", "hyperparameters.md")) as f:
    text = f.read()
  rows = {}
  for line in text.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    m = re.fullmatch(r"`(\w+)`", cells[0]) if len(cells) == 5 else None
    if m:
      rows[(m.group(1), cells[1].strip("`"))] = cells
  return text, rows


def test_every_hyperparameter_is_listed_with_its_default_and_source():
  _, rows = _rows()
  for name in weighting.names():
    hparams = weighting.hparams(name)
    if not hparams:
      assert (name, "—") in rows, name
    for key, default in hparams.items():
      assert (name, key) in rows, (name, key)
      cells = rows[(name, key)]
      assert cells[2] == f"`{default!r}`", (name, key, cells[2])
      assert cells[3] and cells[4], (name, key)
  listed = {name for name, _ in rows}
  assert listed == set(weighting.names())


def test_page_is_the_generator_output():
  spec = importlib.util.spec_from_file_location(
      "hyperparameters", os.path.join(ROOT, "experiments", "hyperparameters.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  text, _ = _rows()
  assert text == module.table(), "rerun: PYTHONPATH=. python3 experiments/hyperparameters.py"


def test_weight_net_is_labelled_as_mtjax_own():
  _, rows = _rows()
  assert "mtjax's own" in rows[("weight_net", "hidden")][4]
