"""The study's settings: how its parameter block is parsed and checked, and the plan it resolves to.

``study.py`` declares each parameter once in its block (name, default, and the comment that is its help); this
module adds the ranges of its numbers (``RANGES``), reads its list parameters, and turns the whole into a
``StudyPlan``: the task pool, targets, delta methods, parsed fusions, data seeds and budgets every stage reads.
Importable without torch, so that ``study.py --help`` and a refused flag answer at once.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from models.sizes import METHOD_SIZES
from utils.errors import UserInputError
from utils.ranges import (
    ANY_INT,
    DEVICE,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    check_ranges,
)

DEFAULT_SIZES = METHOD_SIZES["default"]  # the embedded default's method sizes: the block's defaults
# The valid range of each number of the block, checked before anything is read or written (utils/ranges.py); the
# merge settings' ranges are declared with their operators, the list parameters are checked by check_axes.
RANGES = {**{name: POSITIVE_INT for name in (
              "source_k", "source_iters", "source_bsz", "source_valid_interval", "target_k", "target_bsz",
              "target_valid_interval", "max_input_length", "max_output_length", "adapter_size", "lora_r",
              "prefix_length", "prefix_mlp", "prefix_iters_scale", "learned_budget", "max_examples", "jobs",
              "prefilter_top")},
          **{name: POSITIVE for name in ("source_lr", "target_lr", "cos_tem", "lora_alpha", "ia3_lr_scale")},
          **{name: NON_NEGATIVE_INT for name in ("source_early_stop", "top_k", "slurm_gpus", "slurm_cpus",
                                                 "slurm_array_parallelism")},
          **{name: ANY_INT for name in ("seed", "source_data_seed")},
          "tem": POSITIVE.allowing("auto"), "slurm_mem": NON_NEGATIVE, "device": DEVICE}
AXES = ("target_data_seeds", "target_budgets", "target_early_stop")  # list parameters of the study itself
# Parameters a resumed study may change: they do not alter any finished step's outputs (steps are keyed by
# fusion method, delta method, data seed and budget, so adding any of them only adds steps). A budget's early
# stopping may not change: target_early_stop is compared budget by budget.
RESUMABLE_CHANGES = ("output", "device", "quiet", "fusions", "deltas", "target_data_seeds", "target_budgets",
                     "target_early_stop")


def words(text: str | list[str]) -> list[str]:
    """A list parameter: space- or comma-separated words (one string or several)."""
    text = " ".join(text) if isinstance(text, list) else text
    return text.replace(",", " ").split()


def parse_study_params(params: Mapping[str, Any], argv: list[str] | None, description: str | None,
                       ) -> argparse.Namespace:
    """The parameter block with the command line's overrides; list parameters as one space-separated string,
    so params.json spells them one way however the words were given."""
    from models.methods import REGISTRY
    from models.settings import parse_group_size
    from unit_model.config import CHOICES, HELP, LIST_PARAMS, TYPES
    from utils.params import parse_params

    types = {**TYPES, "group_size": lambda v: str(parse_group_size(v))}  # params.json: "auto" or "8"
    # a set of names (lora_targets) in its one spelling, "v,q" as "q,v"
    types.update({f.name: f.normalise for m in REGISTRY.values() for f in m.size_fields if f.subset_of})
    return parse_params(params, argv, description, HELP, CHOICES, (*LIST_PARAMS, *AXES), types)


def check_axes(p: argparse.Namespace) -> None:
    """The replicate axes as one-line errors: integers, no repeats, one early-stop value or one per budget."""
    rules = {"target_data_seeds": (0, "data seeds"), "target_budgets": (1, "numbers of steps"),
             "target_early_stop": (0, "numbers of validations")}
    for name, (least, what) in rules.items():
        values = words(str(getattr(p, name)))
        if not values or not all(v.isdigit() and int(v) >= least for v in values):
            raise UserInputError(f"--{name}: expected {what} (integers of at least {least}), found "
                                 f"{getattr(p, name)!r}")
        if name != "target_early_stop" and len(set(map(int, values))) != len(values):
            raise UserInputError(f"--{name}: a value is listed twice in {getattr(p, name)!r}")
    budgets, stops = words(p.target_budgets), words(str(p.target_early_stop))
    if len(stops) not in (1, len(budgets)):
        raise UserInputError(f"--target_early_stop: expected one value or one per budget ({len(budgets)}), "
                             f"found {len(stops)}")


def data_seeds_of(p: argparse.Namespace) -> list[int]:
    """The target data seeds: each one's few-shot split is a replicate of the whole target side."""
    return [int(s) for s in words(p.target_data_seeds)]


def budgets_of(p: argparse.Namespace) -> list[tuple[int, int]]:
    """(target_iters, early_stop) per budget; one early-stop value may serve every budget."""
    iters = [int(n) for n in words(p.target_budgets)]
    stops = [int(n) for n in words(str(p.target_early_stop))]
    if len(stops) == 1:
        stops *= len(iters)
    return list(zip(iters, stops, strict=True))


def sizes_of(p: argparse.Namespace, delta: str) -> dict:
    """The method's sizes, from the study's parameters (or the table's default for one it has none of)."""
    from models.methods import get_method

    return {f.name: getattr(p, f.name, DEFAULT_SIZES[delta][f.name]) for f in get_method(delta).size_fields}


def iters_of(p: argparse.Namespace, delta: str, iters: int) -> int:
    """A budget scaled by the method's ``{delta}_iters_scale`` (sources and every target arm alike)."""
    return iters * getattr(p, f"{delta}_iters_scale", 1)


def lr_of(p: argparse.Namespace, delta: str, lr: float) -> float:
    """A learning rate scaled by the method's ``{delta}_lr_scale``."""
    return lr * getattr(p, f"{delta}_lr_scale", 1)


@dataclass(frozen=True)
class StudyPlan:
    """What the settings resolve to: the lists every stage iterates over, each parsed once."""

    p: argparse.Namespace  # the parameters as given (params.json)
    task_pool: list[str]
    targets: list[str]
    deltas: list[str]
    fusions: list  # unit_model.fusion_names.Fusion, in the order given
    data_seeds: list[int]
    budgets: list[tuple[int, int]]  # (target_iters, early_stop), the first one tune-all's, KL's and cos's
    merge_settings: Mapping[str, Any]  # unit_model.merges.MergeSettings, checked against their declarations

    @property
    def first_iters(self) -> int:
        return self.budgets[0][0]


def resolve_plan(p: argparse.Namespace) -> StudyPlan:
    """Every setting checked (one-line errors naming the flag) and resolved, before anything is read or written."""
    from models.delta import METHODS
    from task_list import resolve_tasks
    from unit_model.config import OPTIMIZERS
    from unit_model.fusion_names import parse_fusion
    from unit_model.merges import merge_settings_from

    check_ranges(vars(p), RANGES)
    check_axes(p)
    if p.target_warmup != "auto" and not p.target_warmup.isdigit():
        raise UserInputError(f"--target_warmup: expected auto or a number of steps, found {p.target_warmup!r}")
    task_pool = resolve_tasks(words(p.tasks), flag="--tasks")
    targets = resolve_tasks(words(p.targets), flag="--targets")
    # A target outside the pool is held out: its sources are the whole pool (inside it, every other task).
    deltas = words(p.deltas)
    for d in deltas:
        if d not in METHODS:
            raise UserInputError(f"--deltas: unknown delta method {d!r}; expected some of {', '.join(METHODS)}")
    if p.learned_optimizer not in OPTIMIZERS:
        raise UserInputError(f"--learned_optimizer: expected one of {', '.join(OPTIMIZERS)}, found "
                             f"{p.learned_optimizer!r}")
    return StudyPlan(p, task_pool, targets, deltas, [parse_fusion(f) for f in words(p.fusions)], data_seeds_of(p),
                     budgets_of(p), merge_settings_from(vars(p)))
