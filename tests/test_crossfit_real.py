"""Every real CrossFit task in the shared data loads strictly, and its gold answers score the maximum.

The data lives outside the project (licence: not for redistribution), so the module is skipped where
the shared folder is absent.
"""

from pathlib import Path

import pytest

from dataloader.crossfit import SPLITS, available_shots, list_tasks, load_task
from dataloader.metrics import METRICS, TASK_METRICS, metric_for_task, score

REAL_DIR = Path(__file__).resolve().parents[1].parent / "shared/data/crossfit-real"

if not REAL_DIR.is_dir():
    pytest.skip(f"{REAL_DIR} not present", allow_module_level=True)

TASKS = list_tasks(REAL_DIR)


def _tsv_tasks() -> dict[str, str]:
    lines = (REAL_DIR / "task_metrics.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return dict(line.split("\t") for line in lines if line.strip())


def test_every_task_has_a_metric() -> None:
    assert len(TASKS) >= 97
    listed = _tsv_tasks()
    assert set(TASKS) == set(listed)
    for task in TASKS:
        assert metric_for_task(task, REAL_DIR) in METRICS


def test_project_table_agrees_with_shared_table() -> None:
    """TASK_METRICS is written from CrossFit independently; the shared tsv is a second source."""
    disagree = {task: (metric, TASK_METRICS.get(task)) for task, metric in _tsv_tasks().items()}
    disagree = {task: pair for task, pair in disagree.items() if pair[0] != pair[1]}
    assert not disagree


@pytest.mark.parametrize("task", TASKS)
def test_task_loads_and_gold_scores_max(task: str) -> None:
    assert (16, 100) in available_shots(REAL_DIR, task)
    data = load_task(REAL_DIR, task, 16, 100)
    metric = metric_for_task(task, REAL_DIR)
    for split in SPLITS:
        examples = data[split]
        assert examples, split
        predictions = [ex.outputs[0] for ex in examples]
        references = [list(ex.outputs) for ex in examples]
        assert score(metric, predictions, references) == pytest.approx(1.0), (task, split, metric)
