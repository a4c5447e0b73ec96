"""Uniform weights: over every other task ('average'), the target's own category ('manual') or a named one."""

from __future__ import annotations

from task_list import task_categories
from unit_model.config import FusionConfig
from unit_model.sources import ModuleCache, category_sources, leave_one_out
from unit_model.weightings.base import Plan, Weighting, source_modules
from utils.errors import UserInputError


def plan_average(config: FusionConfig, tasks: list[str], cache: ModuleCache) -> Weighting:
    """Uniform weights over 'all' (leave-one-out), the target's own category ('manual') or a named category."""
    known = task_categories(config.task_dir)
    categories = sorted(set(known.values()))
    mode = "manual" if config.manual else config.TASK_LIST
    if config.manual and config.TASK_LIST not in ("all", "manual"):
        raise UserInputError(f"--manual conflicts with --TASK_LIST {config.TASK_LIST}")
    if mode not in ("all", "manual", *categories):
        raise UserInputError(f"--TASK_LIST: expected all, manual or a category ({', '.join(categories)}), "
                             f"found {mode!r}")
    plans = []
    for t in config.target_list:
        if mode == "all":
            sources = leave_one_out(t, tasks)
        else:
            sources = category_sources(t, tasks, known, None if mode == "manual" else mode)
        weights = {s: {"model": 1.0 / len(sources)} for s in sources}
        plans.append(Plan(t, sources, source_modules(cache, config.source_ckpt_path, t, sources), weights))
    return Weighting(plans)


