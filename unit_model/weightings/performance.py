"""Performance: w_s ∝ softmax((dev_after - dev_zero_shot) / T) from the dev-all table."""

from __future__ import annotations

from pathlib import Path

from unit_model.config import FusionConfig
from unit_model.sources import ModuleCache, leave_one_out
from unit_model.weightings.base import (
    Plan,
    Weighting,
    finite_number,
    group_softmax_weights,
    read_score_table,
    require,
    source_modules,
)
from utils.errors import UserInputError

DEVALL_COLUMNS = ["target", "source", "dev_zero_shot", "dev_after"]

def read_devall_tsv(path: str | Path) -> dict[tuple[str, str], float | None]:
    """(target, source) -> dev_after - dev_zero_shot, or None where dev_after is '-' (no tuned module)."""
    path = Path(path)
    gains: dict[tuple[str, str], float | None] = {}
    for line, row in read_score_table(path, DEVALL_COLUMNS, "--devall_tsv"):
        key = (row["target"], row["source"])
        if key in gains:
            raise UserInputError(f"{path}:{line}: (target={key[0]}, source={key[1]}) listed twice")
        zero = finite_number(row["dev_zero_shot"], path, line, "dev_zero_shot")
        after = None if row["dev_after"] == "-" else finite_number(row["dev_after"], path, line, "dev_after")
        gains[key] = None if after is None else after - zero
    return gains


def plan_performance(config: FusionConfig, tasks: list[str], cache: ModuleCache) -> Weighting:
    """w ∝ softmax(norm(dev_after - dev_zero_shot)/T) over the original sources (--average_tuned: the tuned ones)."""
    path = Path(require(config, "devall_tsv"))
    gains = read_devall_tsv(path)
    plans = []
    for t in config.target_list:
        sources = leave_one_out(t, tasks)
        scores = {}
        for s in sources:
            if (t, s) not in gains:
                raise UserInputError(f"{path}: no row for (target={t}, source={s})")
            if gains[t, s] is None:
                raise UserInputError(f"{path}: (target={t}, source={s}) has no dev_after ('-'): the source was "
                                     "not tuned on the target")
            scores[s] = {"model": gains[t, s]}
        if config.average_tuned:  # the original's choice: this arm then sees the target's data twice
            root = Path(require(config, "tuneall_ckpt_path"))
            modules = [cache.open(root / t / s, f"source {s!r} tuned on {t!r}", s) for s in sources]
        else:
            modules = source_modules(cache, config.source_ckpt_path, t, sources)
        weights = group_softmax_weights(scores, "higher", config.tem, t, config.weight_norm)
        plans.append(Plan(t, sources, modules, weights, scores, "higher"))
    return Weighting(plans)


