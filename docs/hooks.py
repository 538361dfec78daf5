"""MkDocs hooks of the documentation site (``hooks:`` in mkdocs.yml).

* ``<!-- registry:KIND -->`` in a page (KIND: methods, architectures, tasks, datasets) becomes
  the registry's table (:func:`mtjax.cli_help.markdown_table`, the source of ``mtjax list``),
  so every registered entry is listed without editing the page.
* The figures and tables of ``experiments/results/`` are part of the site under ``results/``,
  and the repository's ``CHANGELOG.md`` is the page ``changelog.md``.
* Sphinx roles in rendered docstrings (``:func:`x```) are shown as code.
"""

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def _this_checkouts_mtjax():
  """Imports ``mtjax`` from this checkout, also where another copy is installed."""
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  loaded = sys.modules.get("mtjax")
  if loaded is not None and not os.path.abspath(loaded.__file__).startswith(ROOT + os.sep):
    for name in [n for n in sys.modules if n == "mtjax" or n.startswith("mtjax.")]:
      del sys.modules[name]
MARKER = re.compile(r"<!-- registry:(\w+) -->")
ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj|py:\w+):<code>~?([^<]*)</code>")


def expand_registries(markdown: str) -> str:
  """``markdown`` with each ``<!-- registry:KIND -->`` replaced by that registry's table."""
  _this_checkouts_mtjax()
  from mtjax import cli_help
  return MARKER.sub(lambda m: cli_help.markdown_table(m.group(1)), markdown)


def on_files(files, config):
  from mkdocs.structure.files import File, InclusionLevel
  results = os.path.join(ROOT, "experiments")
  for folder, _, names in os.walk(os.path.join(results, "results")):
    for name in sorted(names):
      if name.endswith((".png", ".md", ".json")):
        rel = os.path.relpath(os.path.join(folder, name), results)
        files.append(File(rel, results, config["site_dir"], config["use_directory_urls"],
                          inclusion=InclusionLevel.NOT_IN_NAV))
  files.append(File.generated(config, "changelog.md",
                              abs_src_path=os.path.join(ROOT, "CHANGELOG.md")))
  return files


def on_page_markdown(markdown, page, config, files):
  return expand_registries(markdown)


def on_page_content(html, page, config, files):
  return ROLE.sub(r"<code>\1</code>", html)
