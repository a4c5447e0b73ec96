"""The one owner of a study's output layout: every folder and file name, for the stages that write them and the
report that reads them back.

    {output}/params.json                          the settings the study was made with
    {output}/.steps/{step}.json                   a finished step's marker: its outputs, inputs digest, seconds
    {output}/logs/{stage}.log, logs/{stage}/      what a stage printed; its jobs' logs when run as jobs
    {output}/{delta}/sources/{task}/              source modules (stage 1), unless a library replaces them
    {output}/{delta}/seed_{s}/                    the target side of one few-shot split (data seed s):
        iters_{n}/random/                         tune.py folder: each target tuned from random init for n steps
        iters_{n}/transfer/{fusion}/              tune.py folder: each target tuned from a fused initialisation
        tuneall/{target}/{source}/                every source tuned on every target (first budget)
        devall.tsv                                dev scores of every source, zero-shot and after tune-all
        similarity/result.tsv                     zero-shot similarity metrics of every source on every target
        fused/{fusion}/without_{target}/          fused initialisations, with weights.tsv and heatmap.png
        pairs.tsv                                 test score of every single-source transfer
    {output}/results/                             the report (pipeline/report.py)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from unit_model.sources import fused_dir_name


def seed_dir(data_seed: int) -> str:
    """The folder of one few-shot split's target side."""
    return f"seed_{data_seed}"


def budget_dir(iters: int) -> str:
    """The folder of one target budget (target_iters) within a split's folder."""
    return f"iters_{iters}"


def fusion_file_name(name: str) -> str:
    """A fusion's folder and file name: its name with ':' (not allowed in Windows file names) spelled out, so
    ``learned:Loss`` lives in ``learned_from_Loss``."""
    return name.replace(":", "_from_")


@dataclass(frozen=True)
class SideLayout:
    """What the stages of one target side write, under ``{output}/{delta}/seed_{s}/``."""

    root: Path

    def random(self, iters: int) -> Path:
        return self.root / budget_dir(iters) / "random"

    def transfer(self, iters: int, fusion: str) -> Path:
        return self.root / budget_dir(iters) / "transfer" / fusion_file_name(fusion)

    @property
    def tuneall(self) -> Path:
        return self.root / "tuneall"

    @property
    def devall(self) -> Path:
        return self.root / "devall.tsv"

    @property
    def similarity(self) -> Path:
        return self.root / "similarity" / "result.tsv"

    def fused(self, fusion: str) -> Path:
        return self.root / "fused" / fusion_file_name(fusion)

    def fused_module(self, fusion: str, target: str) -> Path:
        return self.fused(fusion) / fused_dir_name(target)

    def weights(self, fusion: str) -> Path:
        return self.fused(fusion) / "weights.tsv"

    def heatmap(self, fusion: str) -> Path:
        return self.fused(fusion) / "heatmap.png"

    @property
    def pairs(self) -> Path:
        return self.root / "pairs.tsv"

    def study_input(self, name: str, first_iters: int) -> Path:
        """The output a weighting reads (a key of unit_model.weightings.STUDY_INPUTS); random init is the first
        budget's, as tune-all's is."""
        return {"random": self.random(first_iters), "tuneall": self.tuneall, "devall": self.devall,
                "similarity": self.similarity}[name]


@dataclass(frozen=True)
class StudyLayout:
    root: Path
    source_library: str = ""  # ready source modules instead of {delta}/sources

    # -- the study's own files ---------------------------------------------------------------------------
    @property
    def params(self) -> Path:
        return self.root / "params.json"

    @property
    def markers(self) -> Path:
        return self.root / ".steps"

    @property
    def results(self) -> Path:
        return self.root / "results"

    def stage_log(self, stage_title: str) -> Path:
        return self.root / "logs" / f"{stage_title.replace('/', '-')}.log"

    def job_logs(self, stage_title: str) -> Path:
        return self.root / "logs" / stage_title.replace("/", "-")

    # -- what the stages write ---------------------------------------------------------------------------
    def sources(self, delta: str) -> Path:
        return Path(self.source_library) if self.source_library else self.root / delta / "sources"

    def side(self, delta: str, data_seed: int) -> SideLayout:
        """The folders of one target side: a delta method on one data seed's split."""
        return SideLayout(self.root / delta / seed_dir(data_seed))

    # -- the report's files ------------------------------------------------------------------------------
    def result_file(self, name: str) -> Path:
        return self.results / name

    def result_heatmap(self, delta: str, data_seed: int, fusion: str) -> Path:
        return self.results / "heatmaps" / f"{delta}_{seed_dir(data_seed)}_{fusion_file_name(fusion)}.png"

    def learning_curves(self, delta: str, iters: int) -> Path:
        return self.results / f"learning_curves_{delta}_{budget_dir(iters)}.png"
