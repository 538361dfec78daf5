"""The README, the repository's front page: its code blocks run as written, its links resolve."""

import pathlib
import re

ROOT = pathlib.Path(__file__).parents[1]
TEXT = (ROOT / "README.md").read_text()


def test_readme_python_blocks_run():
  blocks = re.findall(r"^```python\n(.*?)^```", TEXT, re.S | re.M)
  assert len(blocks) >= 2
  namespace = {}
  for block in blocks:
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102


def test_readme_links_resolve():
  """Every relative link and image of the front page points to a file of the repository (the
  site's pages, the figures); at most about 250 lines."""
  targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", TEXT)
  local = [t for t in targets if "://" not in t]
  assert len(local) >= 10
  missing = [t for t in local if not (ROOT / t).exists()]
  assert missing == []
  assert len(TEXT.splitlines()) <= 260
