"""Running the repository's entry points as jobs (utils/jobs.py), and putting their shared tables in order after.

sweep.py and the study's stages both split work into one process per job; these are the two pieces they share.
"""

from __future__ import annotations

import sys
from pathlib import Path

from utils.io import write_tsv_atomic
from utils.jobs import Job

REPO = Path(__file__).resolve().parents[1]


def script_job(name: str, script: str, argv: list) -> Job:
    """A job running one of the repository's scripts with this interpreter (absolute path: any cwd works)."""
    return Job(name, [sys.executable, str(REPO / script), *map(str, argv)])


def order_result_tsv(output_dir: Path, keys: list[tuple[str, str]]) -> None:
    """Put ``keys``' rows ((task, run folder name), models.run_folders.result_key) of ``result.tsv`` last and in
    this order, under its lock.

    A single tune.py process appends rows in sweep order, and ties of the best dev score go to the first row
    (models.run_folders.resolve_checkpoint); parallel jobs append them in the order they finish.
    """
    from models.run_folders import RESULT_COLUMNS, file_lock, result_key, result_rows

    path = output_dir / "result.tsv"
    with file_lock(output_dir / ".result.tsv.lock"):
        if not path.is_file():
            return
        rows = result_rows(path)
        rank = {key: i for i, key in enumerate(keys)}
        others = [r for r in rows if result_key(r) not in rank]
        ours = sorted((r for r in rows if result_key(r) in rank), key=lambda r: rank[result_key(r)])
        write_tsv_atomic(path, RESULT_COLUMNS, others + ours)
