"""``mtjax --help``, ``mtjax list`` and ``--config NAME``: what the command line tells a user."""

import os
import pathlib
import subprocess
import sys

import pytest

from mtjax import cli_help, data, models, tasks, weighting

ROOT = pathlib.Path(__file__).parents[1]


def test_help_names_every_command_field_and_output(capsys):
  assert cli_help.main_help(["mtjax", "--help"]) == 0
  text = capsys.readouterr().out
  for command in ("train", "eval", "group", "list"):
    assert f"\n  {command} " in text, command
  for field in ("weighting.name", "grad_level", "dataset.name", "model.architecture",
                "num_steps", "eval_every", "mesh.fsdp", "relations.conflict_threshold"):
    assert field in text, field
  for output in ("checkpoints/", "metrics.jsonl", "results.json", "curves.png"):
    assert output in text, output
  # Each main field line shows an example override.
  lines = [line for line in text.splitlines() if line.startswith("  ") and "--config." in line]
  assert len(lines) >= 10


def test_list_every_registered_entry(capsys):
  expected = {"methods": weighting.names(), "architectures": models.names(),
              "tasks": tasks.names(), "datasets": sorted(data.DATASETS)}
  for kind, names in expected.items():
    assert cli_help.main_help(["mtjax", "list", kind]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [line.split()[0] for line in lines] == names, kind
  cli_help.main_help(["mtjax", "list", "methods"])
  for line in capsys.readouterr().out.splitlines()[1:]:
    name, level = line.split()[:2]
    assert level == weighting.get(name).level


def test_bad_command_or_kind_exits_2(capsys):
  assert cli_help.main_help(["mtjax"]) == 2
  assert cli_help.main_help(["mtjax", "list", "losses"]) == 2
  assert "mtjax list needs one of" in capsys.readouterr().err
  assert cli_help.main_help(["mtjax", "fly"]) == 2
  assert cli_help.main_help(["mtjax", "train", "--config", "x"]) is None


def test_config_names_resolve_to_shipped_files(tmp_path, monkeypatch):
  shipped = cli_help.packaged_configs()
  assert {"shapes", "nyuv2", "cityscapes", "det_seg"} <= set(shipped)
  path, _, arg = cli_help.resolve_config("shapes:pcgrad").partition(":")
  assert arg == "pcgrad"
  assert pathlib.Path(path).read_bytes() == (ROOT / "experiments/configs/shapes.py").read_bytes()
  # Paths, unknown names and a file of that name in the current folder are left alone.
  assert cli_help.resolve_config("experiments/configs/shapes.py") == \
      "experiments/configs/shapes.py"
  assert cli_help.resolve_config("nosuch:ew") == "nosuch:ew"
  monkeypatch.chdir(tmp_path)
  (tmp_path / "shapes").write_text("")
  assert cli_help.resolve_config("shapes") == "shapes"
  assert cli_help.resolve_config_args(["mtjax", "train", "--config=nyuv2", "--workdir", "w"])[2] \
      .endswith(os.path.join("configs", "nyuv2.py"))


def test_cli_list_in_a_subprocess():
  out = subprocess.run([sys.executable, "-m", "mtjax.cli", "list", "architectures"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       cwd=ROOT, check=True).stdout
  assert out.splitlines()[0].split()[:2] == ["name", "architecture"]
  assert {line.split()[0] for line in out.splitlines()[1:]} == set(models.names())


@pytest.mark.parametrize("kind", cli_help.KINDS)
def test_markdown_tables_have_one_cell_per_column(kind):
  table = cli_help.markdown_table(kind)
  columns = table.splitlines()[0].count("|")
  assert len(table.splitlines()) == 2 + len(cli_help.rows(kind))
  for line in table.splitlines()[2:]:
    assert line.count("|") == columns, line
