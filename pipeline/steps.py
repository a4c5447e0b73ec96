"""Steps, stages and their markers: what makes a study resumable, and its progress lines.

A stage (``StageId``: a delta method, a target side or the sources, a budget, a name) is a list of steps, each
keyed by a tuple (a task, a fusion, a (fusion, target) pair). A step is done when its marker lists outputs that
all exist; a rerun skips it, and redoes it when an output was deleted or what it read has changed since
(the inputs digest). With a launcher, a stage's steps run as jobs (utils/jobs.py); otherwise in groups that share
a forward pass (models/group.py) or one by one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.layout import StudyLayout, budget_dir, seed_dir
from utils.errors import UserInputError
from utils.io import read_json_object, write_text_atomic
from utils.progress import say

STAGE_COUNT = 8  # sources, random, tuneall, devall, similarity, fusion, transfer, pairs
StepKey = tuple[str, ...]


@dataclass(frozen=True)
class StageId:
    """One stage of one delta method: on the sources (``data_seed`` None) or on one target side."""

    index: int  # its place among the STAGE_COUNT stages (the progress lines' [i/8])
    delta: str
    name: str
    data_seed: int | None = None
    iters: int | None = None  # the budget of a tuning stage on the target side

    @property
    def title(self) -> str:
        """``lora/sources``, ``lora/seed_13/tuneall``, ``lora/seed_13/iters_40/random``: its logs and markers."""
        side = [] if self.data_seed is None else [seed_dir(self.data_seed)]
        budget = [] if self.iters is None else [budget_dir(self.iters)]
        return "/".join([self.delta, *side, *budget, self.name])

    def step_name(self, key: StepKey) -> str:
        return f"{self.title}.{'.'.join(key)}"


def clock(seconds: float) -> str:
    """A duration as a person reads it: 42s, 3m05s, 1h02m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Elapsed time, and what is left once a target side (a delta method on one data seed) has been timed."""

    def __init__(self, sides: int):
        self.started = time.time()
        self.sides_left = sides
        self.side_started = time.time()
        self.side_seconds: list[float] = []

    @contextlib.contextmanager
    def target_side(self) -> Iterator[None]:
        self.side_started = time.time()
        self.sides_left -= 1
        yield
        self.side_seconds.append(time.time() - self.side_started)

    def line(self) -> str:
        elapsed = f"elapsed {clock(time.time() - self.started)}"
        if not self.side_seconds:
            return elapsed
        per_side = sum(self.side_seconds) / len(self.side_seconds)
        left = max(per_side - (time.time() - self.side_started), 0.0) + per_side * self.sides_left
        return f"{elapsed}, about {clock(left)} left"


Outputs = Callable[[StepKey], list[Path]]


@dataclass
class StageWork:
    """How a stage's steps run: ``run`` one step; or ``jobs`` of a step run by the launcher, then ``finish``
    with the steps that succeeded; or ``run_group`` over fixed ``groups`` (one forward pass for all)."""

    outputs: Outputs
    run: Callable[[StepKey], None]
    jobs: Callable[[StepKey], list] | None = None
    finish: Callable[[list[StepKey]], None] | None = None
    groups: list[list[StepKey]] | None = None
    run_group: Callable[[list[StepKey]], None] | None = None


class Steps:
    """One study's step markers, stage logs and progress lines."""

    def __init__(self, layout: StudyLayout, inputs_digest: Callable[[StageId], str], progress: Progress,
                 launch=None):
        self.layout = layout
        self.inputs_digest = inputs_digest  # what a stage read besides the settings, hashed
        self.progress = progress
        self.launch = launch  # utils.jobs.LaunchOptions when stages run as parallel jobs

    # -- markers -----------------------------------------------------------------------------------------
    def marker(self, stage: StageId, key: StepKey) -> Path:
        return self.layout.markers / f"{stage.step_name(key).replace('/', '__')}.json"

    def recorded(self, stage: StageId, key: StepKey) -> dict | None:
        """A step's marker (None when missing or unreadable: the step is then not done)."""
        try:
            made = read_json_object(self.marker(stage, key))
        except UserInputError:
            return None
        return made if isinstance(made.get("outputs"), list) else None

    def done(self, stage: StageId, key: StepKey) -> bool:
        made = self.recorded(stage, key)
        return made is not None and all((self.layout.root / o).exists() for o in made["outputs"])

    def stale(self, stage: StageId, key: StepKey) -> bool:
        """A step that finished, on inputs that have changed since (or that an older version did not record)."""
        made = self.recorded(stage, key)
        return made is not None and made.get("inputs") != self.inputs_digest(stage)

    def forget(self, stage: StageId, key: StepKey, outputs: list[Path]) -> None:
        """Remove a stale step's marker and outputs, so that it runs again from scratch."""
        self.marker(stage, key).unlink(missing_ok=True)
        for o in outputs:
            if o.is_dir():
                shutil.rmtree(o)
            else:
                o.unlink(missing_ok=True)

    def mark(self, stage: StageId, key: StepKey, outputs: list[Path], seconds: float) -> None:
        missing = [o for o in outputs if not o.exists()]
        if missing:
            raise RuntimeError(f"step {stage.step_name(key)} finished without writing {missing[0]}")
        self.layout.markers.mkdir(parents=True, exist_ok=True)
        root = self.layout.root
        write_text_atomic(self.marker(stage, key), json.dumps({
            "outputs": [str(o.relative_to(root)) for o in outputs], "inputs": self.inputs_digest(stage),
            "seconds": round(seconds, 1)}))

    # -- running a stage ---------------------------------------------------------------------------------
    def skip(self, stage: StageId, why: str) -> None:
        say(f"[{stage.index}/{STAGE_COUNT}] {stage.title}: skipped ({why})")

    def stage(self, stage: StageId, keys: list[StepKey], work: StageWork) -> None:
        """Run the steps of ``keys`` not done yet; one progress line to the console, the steps' lines to its log."""
        out = sys.stdout  # the stage's own lines go to its log; this one line per stage to the console
        head = f"[{stage.index}/{STAGE_COUNT}] {stage.title}"
        stale = [k for k in keys if self.stale(stage, k)]
        if stale:
            say(f"{head}: what {len(stale)} finished step(s) read has changed since they ran (a split file, a "
                "source module or the backbone): redoing them", out)
            for k in stale:
                self.forget(stage, k, work.outputs(k))
        todo = [k for k in keys if not self.done(stage, k)]
        say(f"{head}: {len(keys) - len(todo)}/{len(keys)} done, {len(todo)} to run", out)
        start = time.time()
        with self.stage_log(stage) as log, contextlib.redirect_stdout(log):
            if todo and work.jobs is not None and self.launch is not None:
                self.dispatch(stage, todo, work)
            elif work.groups is not None and work.run_group is not None:
                for group in work.groups:
                    self.group_step(stage, group, work)
            else:
                for k in todo:
                    step_start = time.time()
                    work.run(k)
                    self.mark(stage, k, work.outputs(k), time.time() - step_start)
        if todo:
            say(f"{head}: finished in {clock(time.time() - start)} ({self.progress.line()})", out)

    @contextlib.contextmanager
    def stage_log(self, stage: StageId) -> Iterator:
        """``{output}/logs/{stage}.log``: what a stage's steps print (appended, so a resumed stage adds to it)."""
        path = self.layout.stage_log(stage.title)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {stage.title}\n")
            log.flush()
            yield log

    def group_step(self, stage: StageId, group: list[StepKey], work: StageWork) -> None:
        """Run a group of steps unless all are done; mark each once its outputs exist.

        A group with any step left runs whole, its finished steps too (their outputs are rewritten): a
        module trained with dropout depends on the modules beside it, so a resumed study trains every
        module in the group an uninterrupted one gives it.
        """
        if all(self.done(stage, k) for k in group):
            return
        start = time.time()
        work.run_group(group)
        seconds = (time.time() - start) / len(group)
        for k in group:
            self.mark(stage, k, work.outputs(k), seconds)

    def dispatch(self, stage: StageId, todo: list[StepKey], work: StageWork) -> None:
        """Run the steps' jobs as one batch; mark each step whose jobs all succeeded, then report failures."""
        from utils.jobs import JobsFailed, run_jobs

        start = time.time()
        batches = {k: work.jobs(k) for k in todo}
        launch = self.launch
        logs = self.layout.job_logs(stage.title)
        if launch.slurm and not launch.slurm_log_dir:
            launch = dataclasses.replace(launch, slurm_log_dir=str(logs / "slurm"))
        report = run_jobs([j for batch in batches.values() for j in batch], launch, logs,
                          name=f"study-{stage.title.replace('/', '-')}")
        succeeded = {r.job.name for r in report.results if r.ok}
        finished = [k for k, batch in batches.items() if all(j.name in succeeded for j in batch)]
        if finished and work.finish is not None:
            work.finish(finished)
        for k in finished:
            self.mark(stage, k, work.outputs(k), time.time() - start)
        if report.failed:
            raise JobsFailed(report)
