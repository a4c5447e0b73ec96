"""The entry points' typed settings and the flags they share, importable without torch.

``tune.py --help`` (and a refused flag) should answer before torch, transformers and AdapterHub are imported,
so the parsers are built from this module alone; the library modules that run things (``models.trainer``,
``models.tuning``, ``models.backbone``, ``models.group``) import these declarations from here, so each has one
owner.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from utils.params import config_from, field_defaults, flags_of
from utils.ranges import ANY_INT, DEVICE, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, setting

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default"
AUTO = "auto"  # --group_size auto
GROUP_SIZE = POSITIVE_INT.allowing(AUTO)


def default_task_dir() -> str:
    """The bundled synthetic suite (imported late: loading a backbone needs no data module)."""
    from dataloader.synthetic import SUITE_DIR

    return str(SUITE_DIR)


@dataclass(kw_only=True)
class BackboneDataConfig:
    """The settings every entry point that loads the backbone and reads few-shot files shares."""

    model: str = str(DEFAULT_MODEL_DIR)
    tokenizer_path: str | None = None
    task_dir: str = field(default_factory=default_task_dir)
    k: int = setting(16, POSITIVE_INT)
    data_seed: int = setting(100, ANY_INT)
    max_input_length: int = setting(256, POSITIVE_INT)
    max_output_length: int = setting(32, POSITIVE_INT)
    device: str = setting("auto", DEVICE)
    quiet: bool = False
    allow_other_backbone: bool = False  # accept modules made on a same-shaped backbone with other weights


def add_backbone_and_data_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``BackboneDataConfig``, with its defaults."""
    D = BackboneDataConfig()
    p.add_argument("--model", default=D.model, help="T5 folder or hub id (default: embedded)")
    p.add_argument("--tokenizer_path", default=D.tokenizer_path, help="tokenizer folder or hub id (default: --model)")
    p.add_argument("--task_dir", default=D.task_dir, help="CrossFit-layout data folder")
    p.add_argument("--k", type=int, default=D.k, help="shots: picks {task}_{k}_{seed}_{split}.tsv")
    p.add_argument("--data_seed", type=int, default=D.data_seed, help="data seed: picks the few-shot files")
    p.add_argument("--max_input_length", type=int, default=D.max_input_length, help="truncate inputs to N tokens")
    p.add_argument("--max_output_length", type=int, default=D.max_output_length, help="also the generation length")
    p.add_argument("--device", default=D.device, help="auto (cuda when present), cpu, cuda or cuda:N")
    p.add_argument("--quiet", action="store_true", help="silence library warnings")
    add_allow_other_backbone_arg(p)


def add_allow_other_backbone_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow_other_backbone", action="store_true",
                   help="use modules made on a backbone of the same shape but other weights (refused otherwise)")


def parse_group_size(value: str | int, flag: str = "--group_size") -> int | str:
    """``auto`` or a positive integer."""
    from utils.errors import UserInputError

    if value == AUTO:
        return AUTO
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if size <= 0 or str(value).strip() != str(size):
        raise UserInputError(f"{flag}: expected auto or a positive integer, found {value!r}")
    return size


def add_group_size_arg(parser, default: int | str | None = None) -> None:
    """The ``--group_size`` flag every entry point that runs many modules shares."""
    parser.add_argument("--group_size", type=parse_group_size, default=default,
                        help="modules per forward pass: auto (the largest group that fits a quarter of the "
                             "device's memory, at most 32) or a number; 1 runs one module at a time")


def default_warmup(train_iters: int) -> int:
    """Warm-up steps when none is given: the first tenth of training. tune.py, tune-all, the bash sweeps and
    the study all use this one rule, so their defaults cannot drift apart."""
    return train_iters // 10


@dataclass
class TrainConfig:
    """Everything a run needs besides the delta method and the data; the defaults are tune.py's. Each number
    declares its valid range (utils/ranges.py), which every entry point checks before it loads anything."""

    # backbone and device
    model: str = str(DEFAULT_MODEL_DIR)
    tokenizer_path: str | None = None
    device: str = setting("auto", DEVICE)
    bf16: bool = False
    allow_other_backbone: bool = False  # modules from a same-shaped backbone with other weights
    # initialisation and prediction
    seed: int = setting(42, ANY_INT)
    train_checkpoint: str | None = None
    test_checkpoint: str | None = None
    do_predict: bool = False
    # data (recorded in the checkpoint's meta) and encoding
    k: int = setting(16, POSITIVE_INT)
    data_seed: int = setting(100, ANY_INT)
    max_input_length: int = setting(256, POSITIVE_INT)
    max_output_length: int = setting(32, POSITIVE_INT)
    # decoding at validation and test
    predict_batch_size: int = setting(64, POSITIVE_INT)
    num_beams: int = setting(1, POSITIVE_INT)
    max_new_tokens: int | str = setting("auto", POSITIVE_INT.allowing(AUTO))
    rank_classification: bool = False
    # optimisation and selection
    train_iters: int = setting(1000, POSITIVE_INT)
    warmup_steps: int | None = setting(None, NON_NEGATIVE_INT.allowing(None))  # None: default_warmup
    valid_interval: int = setting(100, POSITIVE_INT)
    log_interval: int = setting(20, POSITIVE_INT)
    early_stop: int = setting(10, NON_NEGATIVE_INT)  # validations without gain before stopping; 0: never
    weight_decay: float = setting(0.0, NON_NEGATIVE)
    max_grad_norm: float = setting(1.0, NON_NEGATIVE)  # 0: no clipping
    save_last: bool = False

    @classmethod
    def from_values(cls, values: Any) -> TrainConfig:
        """The fields of this config taken from any object with those attributes (e.g. parsed flags)."""
        return config_from(cls, values)


@dataclass(kw_only=True)
class TuneConfig(TrainConfig):
    """One sweep: the trainer's settings plus the delta method, the tasks and the (lr, bsz) grid.

    Field names are tune.py's flag names, so a config and a command line translate into each other.
    """

    delta: Any  # a models.delta.DeltaConfig (not imported here: that module loads torch)
    tasks: list[str] = field(default_factory=lambda: ["SAMPLE_TASKS"])
    task_dir: str = field(default_factory=default_task_dir)
    output_dir: str = "runs/tune"
    learning_rate_list: list[float] = setting(rule=POSITIVE, factory=lambda: [5e-4])
    bsz_list: list[int] = setting(rule=POSITIVE_INT, factory=lambda: [8])
    do_train: bool = False
    overwrite: bool = False
    resume: bool = False  # skip a run whose folder holds a finished run of the same settings (others: refused)
    log_file_only: bool = False  # log lines only to each run's log.txt (for drivers like study.py)
    quiet: bool = False
    export_peft: str = ""  # also write each run's best LoRA module as a PEFT folder: {export_peft}/{task}/{run}
    # runs trained together, one forward pass (models/group.py); 1: one at a time
    group_size: int | str = setting(AUTO, GROUP_SIZE)

    def train_config(self) -> TrainConfig:
        return config_from(TrainConfig, self)

    def to_argv(self) -> list[str]:
        """tune.py flags that give this config back (flags left at their default are left out)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "delta"}
        return [*flags_of(values, field_defaults(TuneConfig)), "--tune_method", self.delta.method,
                *flags_of(self.delta.sizes())]
