"""The documentation site's pages: their python blocks run, their registry tables are whole.

The convention (docs/contributing.md): a ```python block runs, in order with the page's other
blocks in one namespace, and asserts what the page claims; a snippet that is not meant to run is
a ```bash or ```text block.
"""

import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
PYTHON = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _hooks():
  spec = importlib.util.spec_from_file_location("mtjax_docs_hooks", DOCS / "hooks.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _python_blocks(path):
  return PYTHON.findall(path.read_text())


@pytest.mark.parametrize("page", [p for p in PAGES if _python_blocks(p)],
                         ids=lambda p: str(p.relative_to(DOCS)))
def test_python_blocks_run(page):
  namespace = {}
  for block in _python_blocks(page):
    exec(compile(block, str(page), "exec"), namespace)  # noqa: S102


def test_pages_with_python_blocks_exist():
  """The site has runnable examples (the test above is not vacuous)."""
  with_blocks = {str(p.relative_to(DOCS)) for p in PAGES if _python_blocks(p)}
  assert {"index.md", "guide/tasks.md"} <= with_blocks


def test_no_unlabelled_code_blocks():
  """Every fence says what it is (python runs; bash/text do not), so none is skipped by
  accident."""
  for page in PAGES:
    fences = re.findall(r"^```(.*)$", page.read_text(), re.M)
    openings = fences[0::2]
    assert all(f.strip() for f in openings), f"{page}: a ``` block without a language"


def test_registry_tables_list_every_entry():
  """The API reference's tables, rendered by docs/hooks.py, name every registered method (with
  its level), architecture, task and dataset."""
  import mtjax.data
  import mtjax.models
  import mtjax.tasks
  import mtjax.weighting

  hooks = _hooks()
  expected = {"weighting.md": mtjax.weighting.names(), "models.md": mtjax.models.names(),
              "tasks.md": mtjax.tasks.names(), "data.md": sorted(mtjax.data.DATASETS)}
  for page, names in expected.items():
    text = (DOCS / "api" / page).read_text()
    assert "<!-- registry:" in text, page
    rendered = hooks.expand_registries(text)
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(\w+)` \|.*$", rendered, re.M)}
    assert sorted(rows) == sorted(names), page
  methods = hooks.expand_registries((DOCS / "api" / "weighting.md").read_text())
  for name in mtjax.weighting.names():
    level = mtjax.weighting.get(name).level
    assert re.search(rf"^\| `{name}` \| {level} \|", methods, re.M), name


def test_every_api_module_has_a_page():
  """Every module of the public packages is rendered on an API page (``::: module``)."""
  rendered = set()
  for page in (DOCS / "api").glob("*.md"):
    rendered |= set(re.findall(r"^::: ([\w.]+)$", page.read_text(), re.M))
  modules = set()
  for path in (ROOT / "mtjax").rglob("*.py"):
    parts = path.relative_to(ROOT).with_suffix("").parts
    if any(p.startswith("_") and p != "__init__" for p in parts):
      continue
    modules.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
  assert modules - rendered == set(), "modules without an API page entry"
  assert rendered - modules == set(), "API pages name modules that do not exist"
