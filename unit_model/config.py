"""The typed configuration of one fusion run and the fusion flags' declarations (names, defaults, choices,
help): what the unit_model_*.py scripts and study.py parse and pass in. Importable without torch, so that a
script's --help and a refused flag answer before the heavy libraries load; the modules that compute import these
declarations from here, so each has one owner.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from models.methods import GRANULARITIES, METHODS
from models.settings import default_task_dir
from unit_model.merges import (
    DEFAULT_MERGE,
    MERGE_SETTINGS,
    MERGES,
    MergeOperator,
    MergeSettings,
    get_merge,
    merge_settings_from,
)
from utils import params as utils_params
from utils.ranges import (
    ANY_INT,
    DEVICE,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    setting,
)

WEIGHT_NORMS = ("zscore", "rank", "none")
DEFAULT_WEIGHT_NORM = "zscore"
# What cos and Euclidean compare: each module's task vector (LoRA's ΔW per pair, which training determines;
# its factors are only determined up to B·M, M⁻¹·A, and every module starts from the same seeded A), or
# the stored parameters as they are (the original's choice).
SCORE_SPACES = ("task_vector", "params")
COS_MODES = ("flat", "per_tensor")
LORA_COMBINES = ("params", "delta_w")
DEFAULT_LORA_COMBINE = "delta_w"
SEARCH_STARTS = ("zeros", "uniform")  # where learned weights start, besides a similarity metric
OPTIMIZERS = ("nevergrad", "gradient")  # learned weights: LoraHub's NGOpt search, or Adam through the linear merge
AUTO = "auto"  # --tem auto


def parse_temperature(text: str | float) -> float | str:
    """``auto`` or a positive finite number (the type of every script's ``--tem``)."""
    if isinstance(text, str) and text.strip().lower() == AUTO:
        return AUTO
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or auto, found {text!r}") from None


@dataclass
class FusionConfig:
    """Every parameter a weighting, a merge or the outputs may read; a script sets the ones it has.

    ``target_list`` is filled by the driver (unit_model/fusion.py) from ``targets`` and ``tasks``.
    """

    delta: str = "lora"
    tasks: str | list[str] = "ALL_TASKS"
    targets: str | list[str] | None = None
    TASK_LIST: str = "all"
    manual: bool = False
    task_dir: str = ""  # its task_categories.tsv, if any, adds to task_list.MANUAL_CATEGORIES
    source_ckpt_path: str = ""
    random_tuned_ckpt_path: str = ""
    tuneall_ckpt_path: str = ""
    devall_tsv: str = ""
    result_tsv: str = ""
    metric: str | None = None
    save_ckpt_path: str = ""
    # or "auto": T per target chosen on its dev split (unit_model/temperature.py)
    tem: float | str = setting(1.0, POSITIVE.allowing(AUTO))
    weight_norm: str = DEFAULT_WEIGHT_NORM  # zscore | rank | none (the original's raw scores): weightings/base.py
    lora_combine: str = DEFAULT_LORA_COMBINE
    # the merge operator and the values of its declared settings (unit_model/merges/), resolved once from the flags
    merge: MergeOperator = field(default_factory=lambda: MERGES[DEFAULT_MERGE])
    merge_settings: MergeSettings = field(default_factory=lambda: merge_settings_from({}))
    top_k: int = setting(0, NON_NEGATIVE_INT)  # keep the K heaviest sources of each target (group), renormalised; 0 all
    # learned weights (unit_model/learned.py): where the search starts, and its settings
    learned_start: str = "zeros"  # zeros | uniform | a metric of result_tsv
    budget: int = setting(40, POSITIVE_INT)
    bound: float = setting(1.5, POSITIVE)
    l1: float = setting(0.05, NON_NEGATIVE)
    search_seed: int = setting(0, ANY_INT)
    optimizer: str = "nevergrad"  # nevergrad (LoraHub's NGOpt) | gradient (Adam through the linear merge)
    search_lr: float = setting(0.05, POSITIVE)  # gradient only: Adam's step size on the weights
    cos_mode: str = "flat"
    score_space: str = "task_vector"  # cos, Euclidean: task_vector (LoRA's ΔW) or params (raw factors)
    granularity: str = "model"
    average_tuned: bool = False  # Performance: average the sources tuned on the target (the original's)
    overwrite: bool = False
    resume: bool = False  # outputs of the same settings are kept and the run does nothing; others are refused
    export_peft: str = ""  # also write each fused LoRA module as a PEFT folder: {export_peft}/without_{target}
    # --tem auto only: the backbone and the targets' few-shot dev splits that the temperature is chosen on
    model: str = ""  # "": the embedded default
    k: int = setting(16, POSITIVE_INT)
    data_seed: int = setting(100, ANY_INT)
    device: str = setting("auto", DEVICE)
    bf16: bool = False
    max_input_length: int = setting(256, POSITIVE_INT)
    max_output_length: int = setting(32, POSITIVE_INT)
    target_list: list[str] = field(default_factory=list)

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> FusionConfig:
        """The fields that ``args`` has (a script's parameter block); the others keep their defaults. The merge
        operator and its settings are resolved and checked here, once."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in vars(args).items() if k in names}
        values["merge"] = get_merge(values.get("merge", DEFAULT_MERGE))
        values["merge_settings"] = merge_settings_from(vars(args))
        return cls(**values)

    def settings_record(self) -> dict[str, Any]:
        """Every field as a plain value, in field order, the merge operator by name and its settings in its
        place: what a fusion's outputs record (fusion_settings.json) and --resume compares."""
        record: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "merge":
                record["merge"] = value.name
            elif f.name == "merge_settings":
                record.update(value)
            else:
                record[f.name] = value
        return record


# The backbone and the targets' few-shot files that --tem auto (dev) and learned weights (train) use, added to the
# parameter block of those fusion scripts (the task folder defaults to the bundled suite there).
TARGET_DATA_PARAMS = {**utils_params.field_defaults(FusionConfig, ("model",)), "task_dir": default_task_dir(),
                      **utils_params.field_defaults(FusionConfig, ("k", "data_seed", "device"))}
# The merge operator and its parameters, top-k selection, the PEFT export and --resume: added to every fusion
# script's block, with FusionConfig's defaults.
MERGE_PARAMS = {"merge": DEFAULT_MERGE, **{name: s.default for name, s in MERGE_SETTINGS.items()},
                **utils_params.field_defaults(FusionConfig, ("top_k", "export_peft", "resume"))}

HELP = {
    "delta": "delta method of the modules; every checkpoint must have it",
    "tasks": "the task pool (names or task_list.py lists); the sources of a target are the other tasks of this list",
    "targets": "targets to fuse for (default: every task of --tasks)",
    "TASK_LIST": "sources: 'all' (leave-one-out), 'manual' (the target's own category) or a category name",
    "manual": "'manual division': average the target's own category (same as --TASK_LIST manual)",
    "source_ckpt_path": "folder with one source module per task: {source_ckpt_path}/{task}",
    "random_tuned_ckpt_path": "folder with the target modules tuned from random init: {path}/{target}",
    "tuneall_ckpt_path": "folder with every source tuned on every target: {path}/{target}/{source}",
    "devall_tsv": "dev-all table: target, source, dev_zero_shot, dev_after",
    "result_tsv": "zero-shot similarity table: target, source, metric, group, score",
    "metric": "similarity metric of --result_tsv to use (needed when the file holds several)",
    "save_ckpt_path": "output folder: without_{target}/, weights.tsv, heatmap.png",
    "tem": "softmax temperature T > 0 (large T: uniform average), or auto: per target, the T of "
           "{0.1, 0.25, 0.5, 1, 2, 4} whose fused module scores best zero-shot on the target's dev split",
    "model": "--tem auto: the backbone the fused modules are scored on (default: the embedded one)",
    "task_dir": "the targets' data folder: its task_categories.tsv (manual) and dev splits (--tem auto)",
    "k": "--tem auto: shots of the target's dev file {task}_{k}_{seed}_dev.tsv",
    "data_seed": "--tem auto: data seed of the target's dev file",
    "lora_combine": "LoRA only: 'delta_w' averages B·A and factors back by SVD, 'params' averages A and B",
    "merge": "merge operator of the task vectors (unit_model/merges/): " + ", ".join(MERGES),
    **{name: s.help for name, s in MERGE_SETTINGS.items()},  # declared beside their operators
    "top_k": "keep the K heaviest sources of each target (per group), renormalised; 0: every source",
    "learned_start": "learned weights start from zeros (LoraHub's), uniform, or a metric of --result_tsv's weights",
    "budget": "learned weights: evaluations of the merged module's train loss (Nevergrad NGOpt)",
    "bound": "learned weights: each weight is searched in [-bound, bound]",
    "l1": "learned weights: objective = mean train cross-entropy + l1 * mean |w|",
    "search_seed": "learned weights: seed of the search",
    "optimizer": "learned weights: nevergrad (LoraHub's NGOpt search) or gradient (Adam through the linear merge, "
                 "budget steps)",
    "search_lr": "learned weights, --optimizer gradient: Adam's step size on the weights",
    "export_peft": "also write each fused LoRA module as a PEFT adapter folder, {export_peft}/without_{target}",
    "cos_mode": "'flat': cosine of the flattened modules; 'per_tensor': mean of per-tensor cosines (the original)",
    "granularity": "model, block or layer: one weight per group of parameters",
    "average_tuned": "Performance: average the sources tuned on the target (the original's; twice the target budget)",
    "score_space": "cos, Euclidean: compare task vectors (LoRA: ΔW = B·A·alpha/r) or the raw parameters",
    "weight_norm": "scores before the softmax: zscore (per target), rank (z-score of ranks) or none (as they are)",
    "overwrite": "replace fused checkpoints, weights.tsv and heatmap.png of an earlier run in --save_ckpt_path",
    "resume": "do nothing where --save_ckpt_path holds this fusion already, made with the same settings (outputs of "
              "other settings are refused)",
}
CHOICES = {"delta": METHODS, "weight_norm": WEIGHT_NORMS, "score_space": SCORE_SPACES,
           "lora_combine": LORA_COMBINES, "cos_mode": COS_MODES,
           "granularity": GRANULARITIES, "merge": tuple(MERGES),
           "optimizer": OPTIMIZERS, **{name: s.choices for name, s in MERGE_SETTINGS.items() if s.choices}}
LIST_PARAMS = ("tasks", "targets")  # take several words, as tune.py's --tasks does
TYPES = {"tem": parse_temperature}  # a number or auto


def parse_params(params: Mapping[str, Any], argv: list[str] | None, description: str | None) -> argparse.Namespace:
    """A fusion script's parameter block parsed with the fusion flags' help and choices."""
    return utils_params.parse_params(params, argv, description, HELP, CHOICES, LIST_PARAMS, TYPES)
