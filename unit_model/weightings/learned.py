"""The starting weights of a learned fusion (unit_model/learned.py searches from them): zeros (LoraHub's),
uniform, or the softmax weights of a metric of a similarity table (``--learned_start Loss``)."""

from __future__ import annotations

import dataclasses

from unit_model.config import SEARCH_STARTS, FusionConfig
from unit_model.sources import ModuleCache, leave_one_out
from unit_model.weightings.base import Plan, Weighting, groups_of, source_modules
from unit_model.weightings.similarity import plan_others


def plan_learned_start(config: FusionConfig, tasks: list[str], cache: ModuleCache) -> Weighting:
    if config.learned_start not in SEARCH_STARTS:
        return plan_others(dataclasses.replace(config, metric=config.learned_start), tasks, cache)
    plans = []
    for t in config.target_list:
        sources = leave_one_out(t, tasks)
        modules = source_modules(cache, config.source_ckpt_path, t, sources)
        plans.append(Plan(t, sources, modules, {}))
    cache.check(config.delta)
    groups = sorted(groups_of(plans[0].modules[0].shapes, config.granularity))
    for plan in plans:
        value = 0.0 if config.learned_start == "zeros" else 1.0 / len(plan.sources)
        plan.weights = {s: {g: value for g in groups} for s in plan.sources}
    return Weighting(plans)
