"""No traceback reaches the user: what ``utils.errors.run_cli`` makes of each kind of failure.

Bad input is one line and exit 2; a failure of the machine (disk full, permission denied) is one line naming the
path, exit 1, with nothing half-made left; anything else is a bug of this project and says so, exit 3; ``--debug``
lets the traceback through.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

import tune
from tests.test_tune import FAST, GOOD, make_task
from utils.errors import BUG_EXIT, TrainingFailed, UserInputError, run_cli


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(("raised", "code", "words"), [
    (UserInputError("x.tsv:3: expected a tab"), 2, ["error: x.tsv:3: expected a tab"]),
    (TrainingFailed("1 run(s) not saved"), 1, ["error: 1 run(s) not saved"]),
    (OSError(errno.ENOSPC, "No space left on device", "/data/out/run"), 1,
     ["/data/out/run", "No space left on device", "finished work is kept"]),
    (PermissionError(errno.EACCES, "Permission denied", "/shared/out"), 1,
     ["/shared/out", "Permission denied", "permissions"]),
    (RecursionError("maximum recursion depth exceeded"), 2, ["nested too deeply"]),
    (KeyError("oops"), BUG_EXIT, ["internal error", "a bug in this project", "KeyError", "--debug"]),
])
def test_each_kind_of_failure_is_one_line_with_its_exit_code(raised, code, words, capsys):
    def main(argv):
        raise raised

    assert run_cli(main, []) == code
    line = one_line(capsys)
    assert all(w in line for w in words), line


def test_debug_lets_the_traceback_through():
    def main(argv):
        raise KeyError("oops")

    with pytest.raises(KeyError):
        run_cli(main, ["--debug"])


def test_a_full_disk_while_a_run_is_written_is_one_line_and_leaves_no_run(tiny_backbone_dir, tmp_path, capsys,
                                                                          monkeypatch):
    """ENOSPC when the checkpoint is made durable: exit 1, a line naming the file, and no run folder, row or
    hidden temporary folder left behind (the staged run folder is removed)."""
    import utils.io

    make_task(tmp_path / "data", "alpha", {"train": GOOD, "dev": GOOD, "test": GOOD})
    out = tmp_path / "out"
    real = utils.io.fsync_file

    def full_disk(path):
        if Path(path).name.endswith("delta.safetensors") or "checkpoint" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path)

    monkeypatch.setattr(utils.io, "fsync_file", full_disk)
    monkeypatch.setattr("models.delta.fsync_file", full_disk)
    argv = ["--do_train", "--tune_method", "lora", "--lora_r", "2", "--model", str(tiny_backbone_dir), "--task_dir",
            str(tmp_path / "data"), "--tasks", "alpha", "--output_dir", str(out), *FAST]
    assert run_cli(tune.main, argv) == 1
    line = one_line(capsys)
    assert "No space left on device" in line and str(out) in line
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) if out.exists() else []
    assert not [p for p in left if not p.startswith(".result.tsv.lock") and p != "alpha"], left
