"""Weights from a zero-shot similarity table (get_similarity's result.tsv), each metric in its declared direction."""

from __future__ import annotations

from pathlib import Path

from models.methods import param_group
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

SIMILARITY_COLUMNS = ["target", "source", "metric", "group", "score"]

def metric_direction(metric: str) -> str:
    """'lower' or 'higher': which way of a similarity metric means "more similar" (as the metric declares)."""
    from get_similarity.metrics import METRICS

    if metric not in METRICS:
        raise UserInputError(f"--metric: unknown similarity metric {metric!r}; expected one of {', '.join(METRICS)}")
    return METRICS[metric].direction


def read_similarity_tsv(path: str | Path, metric: str | None) -> tuple[str, dict[tuple[str, str, str], float]]:
    """(metric, {(target, source, group): score}) from a get_similarity result.tsv.

    ``metric`` may be None when the file holds a single metric. A score that is not a finite number is
    refused with its file, line and (target, source, group).
    """
    path = Path(path)
    rows = read_score_table(path, SIMILARITY_COLUMNS, "--result_tsv")
    metrics = sorted({row["metric"] for _, row in rows})
    if not metrics:
        raise UserInputError(f"{path}: no rows")
    if metric is None:
        if len(metrics) > 1:
            raise UserInputError(f"{path}: holds metrics {', '.join(metrics)}; choose one with --metric")
        metric = metrics[0]
    elif metric not in metrics:
        raise UserInputError(f"--metric {metric}: not in {path} (it holds {', '.join(metrics)})")
    scores: dict[tuple[str, str, str], float] = {}
    for line, row in rows:
        if row["metric"] != metric:
            continue
        key = (row["target"], row["source"], row["group"])
        if key in scores:
            raise UserInputError(f"{path}:{line}: (target={key[0]}, source={key[1]}, group={key[2]}) listed twice")
        scores[key] = finite_number(row["score"], path, line,
                              f"score of (target={key[0]}, source={key[1]}, group={key[2]})")
    return metric, scores


def retrieval_of(path: Path) -> str | None:
    """The prefilter a similarity table was scored with (get_similarity --prefilter), from the settings recorded
    beside it; None for a table every metric scored in full."""
    from get_similarity.scoring import SETTINGS_FILE
    from utils.io import read_json_object

    recorded = path.parent / SETTINGS_FILE
    return read_json_object(recorded).get("prefilter") if recorded.is_file() else None


def plan_others(config: FusionConfig, tasks: list[str], cache: ModuleCache) -> Weighting:
    """Weights from any zero-shot similarity result.tsv, each metric in its declared direction."""
    path = Path(require(config, "result_tsv"))
    metric, table = read_similarity_tsv(path, config.metric)
    direction = metric_direction(metric)
    present = {key[0] for key in table}
    for t in config.target_list:  # before any checkpoint is opened: the likelier mistake is the wrong table
        if t not in present:
            raise UserInputError(f"{path}: target {t!r} has no {metric} rows")
    retrieval = retrieval_of(path)
    scored = {key[:2] for key in table}
    plans = []
    for t in config.target_list:
        sources = leave_one_out(t, tasks)
        if retrieval:  # a two-stage table: this metric scored only the sources its prefilter retrieved
            sources = [s for s in sources if (t, s) in scored]
        plans.append(Plan(t, sources, source_modules(cache, config.source_ckpt_path, t, sources), {}, {}, direction))
    cache.check(config.delta)
    groups = sorted({param_group(k, config.granularity) for k in plans[0].modules[0].shapes})
    for plan in plans:
        for s in plan.sources:
            missing = [g for g in groups if (plan.target, s, g) not in table]
            if missing:
                raise UserInputError(f"{path}: no {metric} score for (target={plan.target}, source={s}, "
                                     f"group={missing[0]}) at --granularity {config.granularity}")
            plan.scores[s] = {g: table[plan.target, s, g] for g in groups}
        plan.weights = group_softmax_weights(plan.scores, direction, config.tem, plan.target,
                                              config.weight_norm)
    return Weighting(plans, metric, direction)


