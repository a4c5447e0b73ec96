"""A folder of ready source modules, one per task, trained as the study's first stage trains them.

``make demo`` reads the embedded default's library (``models/default-sources/lora/``) instead of training
twenty source modules first. ``scripts/build_default_sources.py`` builds it with ``build_library``, one module
at a time (``group_size`` 1: with dropout on, a module trained in a group depends on the modules beside it) on
one CPU thread, so any one module can be rebuilt alone and compared (``tests/test_source_library.py``). The
folder holds a checkpoint per task (``{task}/delta.safetensors``, ``delta_config.json``) and ``manifest.json``: the
settings, and each module's dev and test score.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.delta import DeltaConfig
from models.run_folders import CHECKPOINT_SUBDIR, read_result_tsv
from models.settings import TuneConfig
from models.tuning import run_sweep
from utils.errors import UserInputError
from utils.io import read_json_object, staged_dir, write_text_atomic
from utils.params import from_repo_root  # the manifest names the repository's folders relative to it

MANIFEST = "manifest.json"


@dataclass
class LibrarySettings:
    """How every module of a library is trained: the study's source stage (study.py's ``source_*`` knobs)."""

    model: str
    task_dir: str
    tasks: list[str]
    method: str = "lora"
    sizes: dict = field(default_factory=dict)  # the method's sizes (models/sizes.py)
    k: int = 512
    data_seed: int = 100
    train_iters: int = 200
    learning_rate: float = 3e-3
    bsz: int = 16
    valid_interval: int = 50
    early_stop: int = 3
    seed: int = 42
    max_input_length: int = 256
    max_output_length: int = 16

    def tune_config(self, tasks: list[str], output_dir: str) -> TuneConfig:
        """One module per task, alone (group size 1), as the study's source stage sets up each run."""
        return TuneConfig(model=from_repo_root("model", self.model), task_dir=from_repo_root("task_dir", self.task_dir),
                          tasks=tasks, output_dir=output_dir,
                          delta=DeltaConfig(self.method, **self.sizes), k=self.k, data_seed=self.data_seed,
                          train_iters=self.train_iters, learning_rate_list=[self.learning_rate],
                          bsz_list=[self.bsz], valid_interval=self.valid_interval, early_stop=self.early_stop,
                          log_interval=50, seed=self.seed, max_input_length=self.max_input_length,
                          max_output_length=self.max_output_length, predict_batch_size=100, do_train=True,
                          do_predict=True, quiet=True, log_file_only=True, group_size=1, device="cpu")


def train_modules(settings: LibrarySettings, tasks: list[str], work: Path) -> dict[str, dict]:
    """Train ``tasks``' modules under ``work``; each task's checkpoint folder and its dev and test scores.

    One CPU thread, whatever the machine: another thread count sums in another order, and 200 Adam steps carry
    those last bits into differences of a few percent in the smallest tensors.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_sweep(settings.tune_config(tasks, str(work)))
    finally:
        torch.set_num_threads(threads)
    rows = {row["task"]: row for row in read_result_tsv(work / "result.tsv")}
    return {t: {"checkpoint": work / t / rows[t]["run"] / CHECKPOINT_SUBDIR, "dev": rows[t]["dev"],
                "test": rows[t]["test"]} for t in tasks}


def build_library(settings: LibrarySettings, out: Path) -> None:
    """Train every task's module and write the library folder ``out`` whole (it appears only when complete)."""
    with tempfile.TemporaryDirectory(prefix="source-library-") as work:
        trained = train_modules(settings, settings.tasks, Path(work))
        with staged_dir(out) as tmp:
            for t, made in trained.items():
                shutil.copytree(made["checkpoint"], tmp / t)
            manifest = {"settings": dataclasses.asdict(settings),
                        "scores": {t: {"dev": made["dev"], "test": made["test"]} for t, made in trained.items()}}
            write_text_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def read_settings(library: Path) -> LibrarySettings:
    """The settings a library was built with, from its manifest."""
    path = Path(library) / MANIFEST
    if not path.is_file():
        raise UserInputError(f"{path}: not found (a source library built by scripts/build_default_sources.py)")
    settings = read_json_object(path).get("settings")
    names = {f.name for f in dataclasses.fields(LibrarySettings)}
    if not isinstance(settings, dict) or set(settings) != names:
        raise UserInputError(f"{path}: expected settings with the fields {', '.join(sorted(names))}")
    return LibrarySettings(**settings)
