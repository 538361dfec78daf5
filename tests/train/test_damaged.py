"""Damaged checkpoints and a full disk, in process: fallback to the newest readable checkpoint
(train and eval), nothing moved when none reads back, a clear error when a save fails."""

import errno
import os

import pytest

from mtjax import checkpoint
from mtjax.errors import RunError, UserError
from mtjax.train import loop
from tests.helpers import tiny_config

SMALL = {"tasks": ("segmentation", "depth"), "num_steps": 4, "log_every": 2, "eval_every": 0,
         "checkpoint_every": 2}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def _truncate_largest(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)


def test_eval_falls_back_and_no_readable_checkpoint_moves_nothing(data_dir, tmp_path, capsys):
  cfg = tiny_config(data_dir, **SMALL)
  loop.train(cfg, str(tmp_path), progress=False)
  ckpt = tmp_path / "checkpoints"
  _truncate_largest(ckpt / "4")
  out = loop.evaluate(cfg, str(tmp_path))
  assert out["step"] == 2
  assert "checkpoint step 4 cannot be read" in capsys.readouterr().err
  assert sorted(p.name for p in ckpt.iterdir()) == ["2", "damaged-4-0"]
  _truncate_largest(ckpt / "2")
  with pytest.raises(UserError, match=r"no checkpoint .* can be restored \(step 2: "):
    loop.evaluate(cfg, str(tmp_path))
  assert sorted(p.name for p in ckpt.iterdir()) == ["2", "damaged-4-0"]  # nothing moved


def test_disk_full_while_saving_is_clear_and_keeps_the_previous_checkpoint(data_dir, tmp_path,
                                                                          monkeypatch):
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as handler

  cfg = tiny_config(data_dir, **SMALL)
  loop.train(cfg, str(tmp_path / "full"), progress=False)
  write = handler.JsonCheckpointHandler._save_fn
  calls = []

  async def full_disk(self, x, directory):
    calls.append(directory)
    if len(calls) == 2:  # the second checkpoint (step 4) finds the disk full
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return await write(self, x, directory)

  monkeypatch.setattr(handler.JsonCheckpointHandler, "_save_fn", full_disk)
  with pytest.raises(RunError, match=r"saving checkpoint step 4 .* failed: No space left on "
                                     r"device; the previous checkpoint \(step 2\) is intact"):
    loop.train(cfg, str(tmp_path / "cut"), progress=False)
  monkeypatch.undo()
  assert checkpoint.latest_step(str(tmp_path / "cut" / "checkpoints")) == 2
  resumed = loop.train(cfg, str(tmp_path / "cut"), progress=False)
  full = loop.evaluate(cfg, str(tmp_path / "full"))
  assert resumed["test"] == full["test"]
