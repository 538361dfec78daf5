"""The distribution's contents: every package of the source tree, the configs, py.typed."""

import pathlib
import tomllib

import mtjax

ROOT = pathlib.Path(__file__).parents[1]


def test_packages_list_is_the_source_tree():
  """pyproject.toml lists the packages explicitly (to ship experiments/configs as mtjax.configs):
  a new subpackage of mtjax/ must be added there, or the wheel would lack it."""
  setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
  found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "mtjax").rglob(
      "__init__.py")}
  assert set(setuptools["packages"]) == found | {"mtjax.configs"}
  assert setuptools["package-dir"] == {"mtjax.configs": "experiments/configs"}
  assert (ROOT / "mtjax" / "py.typed").exists()
  assert "py.typed" in setuptools["package-data"]["mtjax"]


def test_version_is_in_the_changelog_or_unreleased():
  text = (ROOT / "CHANGELOG.md").read_text()
  assert "## Unreleased" in text or f"## {mtjax.__version__}" in text
  assert "mtjax.tasks.get" in text   # the first user-visible break is recorded
