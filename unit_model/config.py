"""The typed configuration of one fusion run: what the five unit_model_*.py scripts and study.py pass in."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields


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
    tem: float | str = 1.0  # or "auto": T per target chosen on its dev split (unit_model/temperature.py)
    weight_norm: str = "zscore"  # zscore | rank | none (the original's raw scores): see unit_model/weightings/base.py
    lora_combine: str = "delta_w"
    merge: str = "linear"  # merge operator (unit_model/merges/) and its parameters
    lam: float = 1.0
    density: float = 0.2
    majority_sign: str = "total"
    merge_seed: int = 0
    top_k: int = 0  # keep the K heaviest sources of each target (and group), renormalised; 0: all
    # learned weights (unit_model/learned.py): where the search starts, and its settings
    learned_start: str = "zeros"  # zeros | uniform | a metric of result_tsv
    budget: int = 40
    bound: float = 1.5
    l1: float = 0.05
    search_seed: int = 0
    optimizer: str = "nevergrad"  # nevergrad (LoraHub's NGOpt) | gradient (Adam through the linear merge)
    search_lr: float = 0.05  # gradient only: Adam's step size on the weights
    cos_mode: str = "flat"
    score_space: str = "task_vector"  # cos, Euclidean: task_vector (LoRA's ΔW) or params (raw factors)
    granularity: str = "model"
    average_tuned: bool = False  # Performance: average the sources tuned on the target (the original's)
    overwrite: bool = False
    resume: bool = False  # outputs of the same settings are kept and the run does nothing; others are refused
    export_peft: str = ""  # also write each fused LoRA module as a PEFT folder: {export_peft}/without_{target}
    # --tem auto only: the backbone and the targets' few-shot dev splits that the temperature is chosen on
    model: str = ""  # "": the embedded default
    k: int = 16
    data_seed: int = 100
    device: str = "auto"
    bf16: bool = False
    max_input_length: int = 256
    max_output_length: int = 32
    target_list: list[str] = field(default_factory=list)

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> FusionConfig:
        """The fields that ``args`` has (a script's parameter block); the others keep their defaults."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})
