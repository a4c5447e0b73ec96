"""Weighted fusion of source delta modules into the starting point of a target's delta module.

For a target task t and its sources S (leave-one-out by default: every task of ``--tasks`` but t), each
source s gets a score, the scores become weights

    w_s = softmax_s(sign * score_s / T),   sign = +1 if a higher score means "more similar", -1 if lower,

and the fused module θ = Σ_s w_s θ_s is saved as a delta checkpoint that ``tune.py --train_checkpoint``
starts from. The five scripts ``unit_model_{average,cos,Euclidean,Performance,others}.py`` differ only in
where the scores come from. The weightings are a registry (``unit_model/weightings/``), the merge
operators another (``unit_model/merges/``, streamed by ``unit_model/merging.py``); this module is the
driver: it checks a ``FusionConfig``, asks the weighting for plans, merges and writes the outputs.

Granularity (``model``/``block``/``layer``, groups from each method's ``param_group``): at ``block`` or
``layer`` every group has its own scores and its own softmax, and the parameters of a group are averaged
with that group's weights.

LoRA (``--lora_combine``). The default is ``delta_w``. A LoRA module is the update ΔW = B·A·(alpha/r) and
only ΔW is determined by training: B·M and M⁻¹·A give the same module for any invertible r×r matrix M, so
the factors of separately tuned sources are expressed in unrelated bases. Averaging the factors
(``params``) gives B̄·Ā = Σ_s Σ_s' w_s w_s' B_s A_s', mostly cross terms B_s·A_s' that no source learned
(with N uniform weights the N wanted terms carry 1/N of the total weight). ``delta_w`` averages what the
sources do, Σ_s w_s ΔW_s, whatever their factorisation, and factors it back to rank r by truncated SVD,
the best rank-r approximation (Eckart-Young); the singular values are split symmetrically (sqrt(S) into
each factor) and the common scaling alpha/r is divided back out, so the fused module has the sources'
shapes. Its cost is the truncation error ‖Σ - B'A'‖_F / ‖Σ‖_F, logged and stored in the checkpoint's
meta. ``params`` is kept for comparison with the original code, which averaged state dicts; it is close
to ``delta_w`` only when all sources started from the same A and moved little. A pair whose fused ΔW is
exactly zero keeps the parameter average, because zero A and B factors would get zero gradients.
Adapters and prefixes are always averaged parameter-wise.

Streaming: ``fuse`` loads one source at a time and adds it into a float64 accumulator, so memory stays
near two modules however many sources there are. ``delta_w`` then takes the LoRA pairs one at a time,
reading only that pair's factors of each source (from the safetensors file), so one out×in matrix is
alive at a time.

Outputs, in ``save_ckpt_path``: ``without_{target}/`` (a delta checkpoint per target), ``weights.tsv``
(target, source, [group,] score, weight) and ``heatmap.png`` (targets in rows, sources in columns). All
inputs are checked before anything is written; the outputs are built in a hidden sibling folder and
renamed into place, so a failed run leaves nothing in ``save_ckpt_path``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from models.delta import CONFIG_FILE, GRANULARITIES, METHODS, DeltaConfig, save_delta_checkpoint
from models.formats.peft_export import check_destination as check_peft_destination
from models.formats.peft_export import check_exportable, export_peft
from models.methods import param_group
from task_list import resolve_tasks
from unit_model.config import AUTO, COS_MODES, LORA_COMBINES, SCORE_SPACES, WEIGHT_NORMS, FusionConfig
from unit_model.learned import SearchSettings, learn_weights
from unit_model.merging import check_merge, fuse, linear_merge_graph
from unit_model.on_target import OnTarget
from unit_model.sources import ModuleCache, fused_dir_name, materialise
from unit_model.temperature import choose_temperatures
from unit_model.weightings import WeightingSpec, get_weighting
from unit_model.weightings.base import Plan, Weighting, effective_sources, keep_top_k
from utils.errors import UserInputError
from utils.io import check_output_folder, read_json_object, save_figure_atomic, write_text_atomic, write_tsv_atomic
from utils.params import first_difference
from utils.progress import progress_bar, say
from utils.ranges import check_ranges

__all__ = ["FusionConfig", "check_config", "check_settings", "fused_dir_name", "run_fusion", "write_fusion"]

WEIGHTS_FILE = "weights.tsv"
SEARCH_FILE = "search.tsv"
SETTINGS_FILE = "fusion_settings.json"  # the settings a save folder's outputs were made with (--resume compares)
# What only says where or how a run writes, not what it computes
NOT_SETTINGS = ("overwrite", "resume", "export_peft", "device")
HEATMAP_FILE = "heatmap.png"
ANNOTATE_MAX_COLUMNS = 12


def check_settings(config: FusionConfig) -> None:
    """The settings that need no file (method, ranges, search, choices; the merge settings were checked when they
    were parsed, by ``merge_settings_from``): what the study checks for every fusion before its first stage."""
    if config.delta not in METHODS:
        raise UserInputError(f"--delta: expected one of {', '.join(METHODS)}, found {config.delta!r}")
    check_ranges(config)  # every number against the range its field declares (unit_model/config.py)
    search_settings(config).check()
    if config.optimizer == "gradient" and not config.merge.linear:
        raise UserInputError(f"--optimizer gradient: --merge {config.merge.name} has no gradient in its weights "
                             "(it trims, elects signs or drops entries); use linear or task_arithmetic, or "
                             "--optimizer nevergrad")
    if config.tem == AUTO and not config.task_dir:
        raise UserInputError("--tem auto: needs --task_dir (the targets' dev splits choose the temperature)")
    for flag, value, known in (("lora_combine", config.lora_combine, LORA_COMBINES),
                               ("granularity", config.granularity, GRANULARITIES),
                               ("cos_mode", config.cos_mode, COS_MODES),
                               ("weight_norm", config.weight_norm, WEIGHT_NORMS),
                               ("score_space", config.score_space, SCORE_SPACES)):
        if value not in known:
            raise UserInputError(f"--{flag}: expected one of {', '.join(known)}, found {value!r}")


def check_config(config: FusionConfig) -> tuple[FusionConfig, list[str]]:
    """Check the parameters every weighting shares; return the config with its target list, and the pool."""
    check_settings(config)
    for flag in ("source_ckpt_path", "save_ckpt_path"):
        if not getattr(config, flag):
            raise UserInputError(f"--{flag}: required")
    if config.export_peft:
        check_exportable(config.delta)
    tasks = resolve_tasks(config.tasks)
    # Targets default to every task; a study fuses for a few targets, each with all other tasks as sources. A
    # target outside the pool is held out: every task of the pool is its source.
    target_list = resolve_tasks(config.targets, flag="--targets") if config.targets else tasks
    return dataclasses.replace(config, target_list=target_list), tasks


# --------------------------------------------------------------------------------------------------
# Outputs


def fusion_settings(method: str, config: FusionConfig) -> dict:
    """What a fusion's outputs depend on: the weighting and every setting but where and how it writes."""
    values = {k: v for k, v in config.settings_record().items() if k not in NOT_SETTINGS}
    return json.loads(json.dumps({"method": method, **values}, default=str))


def already_fused(save: Path, method: str, config: FusionConfig) -> bool:
    """--resume: whether ``save`` holds this very fusion, whole (then nothing is redone); outputs of other settings
    are refused in one line naming the first setting that differs."""
    path = save / SETTINGS_FILE
    if not path.is_file():
        return False
    made = read_json_object(path)
    wanted = fusion_settings(method, config)
    k = first_difference(made, wanted)
    if k is not None:
        raise UserInputError(f"{path}: these outputs were made with {k}={made.get(k)!r}, this run asks "
                             f"{k}={wanted.get(k)!r}; pass --overwrite true to replace them or choose another "
                             "--save_ckpt_path")
    outputs = [save / fused_dir_name(t) / CONFIG_FILE for t in config.target_list] + [save / WEIGHTS_FILE]
    return all(p.is_file() for p in outputs)


def check_destination(save: Path, plans: list[Plan], overwrite: bool) -> None:
    """Refuse to replace what this run would write (its targets' folders, the table, the plot) unless
    ``overwrite``; other targets' folders in ``save`` (parallel jobs of one sweep) are left alone."""
    for plan in plans:
        dest = save / fused_dir_name(plan.target)
        if dest.exists() and (not dest.is_dir() or (any(dest.iterdir()) and not (dest / CONFIG_FILE).is_file())):
            raise UserInputError(f"{dest}: exists and is not a delta checkpoint; not replacing it")
    for name in (WEIGHTS_FILE, HEATMAP_FILE):
        if (save / name).is_dir():
            raise UserInputError(f"{save / name}: is a folder; not replacing it")
    if not overwrite:
        ours = [save / fused_dir_name(p.target) for p in plans] + [save / WEIGHTS_FILE, save / HEATMAP_FILE]
        for dest in ours:
            if dest.exists():
                raise UserInputError(f"{dest}: exists (from an earlier fusion); pass --overwrite to replace it "
                                     "or choose another --save_ckpt_path")


def search_settings(config: FusionConfig) -> SearchSettings:
    return SearchSettings(budget=config.budget, bound=config.bound, l1=config.l1, seed=config.search_seed,
                          optimizer=config.optimizer, lr=config.search_lr)


def fused_module(plan: Plan, weights: Mapping[str, Mapping[str, float]], config: FusionConfig,
                 granularity: str) -> tuple[dict, dict[str, Any]]:
    """The fused tensors of one plan under ``weights`` (source -> group -> weight), and the merge's info."""
    ref = plan.modules[0]
    cfg = DeltaConfig.from_checkpoint_meta(ref.meta)
    factored = bool(cfg.spec.factor_pairs(ref.shapes))
    return fuse(plan.modules, [weights[s] for s in plan.sources], granularity=granularity,
                lora_combine=config.lora_combine if factored else "params",
                lora_scaling=cfg.spec.scaling(cfg.sizes()), merge=config.merge, method=cfg.spec,
                settings=config.merge_settings)


def gradient_objective(config: FusionConfig, train: OnTarget, granularity: str):
    """(plan, weights tensor, groups) -> the train loss of the plan's differentiable linear merge, for
    ``optimizer = "gradient"``; each plan's source tensors are read once."""
    if config.optimizer != "gradient":
        return None
    prepared: dict[str, tuple] = {}  # target -> what its merge needs at every step, read and derived once

    def loss(plan: Plan, weights: torch.Tensor, groups: list[str]) -> torch.Tensor:
        if plan.target not in prepared:
            prepared.clear()  # one plan's sources in memory at a time
            tensors = [materialise(m, i)[0] for i, m in enumerate(plan.modules)]
            cfg = DeltaConfig.from_checkpoint_meta(plan.modules[0].meta)
            lora_combine = config.lora_combine if cfg.spec.factor_pairs(plan.modules[0].shapes) else "params"
            group_of = {k: groups.index(param_group(k, granularity)) for k in tensors[0]}
            prepared[plan.target] = (tensors, cfg.spec, lora_combine, group_of)
        tensors, method, lora_combine, group_of = prepared[plan.target]
        merged = linear_merge_graph(tensors, weights, group_of, method=method, lora_combine=lora_combine,
                                    lam=config.merge_settings.lam)
        return train.differentiable_loss(plan.target, merged)

    return loss


def _granular(plans: list[Plan]) -> bool:
    return any(set(w) != {"model"} for p in plans for w in p.weights.values())


def _plain(d: dict[str, float]) -> float | dict[str, float]:
    return d["model"] if set(d) == {"model"} else dict(d)


def plan_effective_sources(plan: Plan) -> dict[str, float]:
    """Group -> exp(entropy) of the plan's weights in that group: how many sources it effectively averages."""
    groups = next(iter(plan.weights.values())).keys()
    return {g: effective_sources(plan.weights[s][g] for s in plan.sources) for g in groups}


def weight_rows(plans: list[Plan], effective: Mapping[str, Mapping[str, float]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of weights.tsv: each row also carries its target's (and group's) effective sources
    (``effective[target][group]``, from ``plan_effective_sources``)."""
    granular = _granular(plans)
    chosen = any(p.temperature is not None for p in plans)  # --tem auto: each target's T is a column
    header = ["target", "source", *(["group"] if granular else []), "score", "weight", "effective_sources",
              *(["temperature"] if chosen else [])]
    rows = []
    for p in plans:
        for s in p.sources:
            for g, w in p.weights[s].items():
                score = "-" if p.scores is None else repr(float(p.scores[s][g]))  # repr: exact round trip
                temperature = ["-" if p.temperature is None else f"{p.temperature:g}"] if chosen else []
                rows.append([p.target, s, *([g] if granular else []), score, repr(float(w)),
                             f"{effective[p.target][g]:.4f}", *temperature])
    return header, rows


def weights_summary(plans: list[Plan], effective: Mapping[str, Mapping[str, float]]) -> str:
    """One phrase for a heatmap's title: the mean effective number of sources of a distribution, or, for signed
    weights (learned ones), that of |w| with the count of negative weights and the mean sum."""
    mean_effective = _mean({t: _mean(by_group) for t, by_group in effective.items()})
    weights = [w for p in plans for s in p.sources for w in p.weights[s].values()]
    negative = sum(1 for w in weights if w < 0)
    if not negative:
        return f"{mean_effective:.1f} effective sources"
    mean_sum = _mean({p.target: math.fsum(_mean(p.weights[s]) for s in p.sources) for p in plans})
    return (f"{mean_effective:.1f} effective sources by |w|; {negative} of {len(weights)} weights negative, "
            f"mean sum {mean_sum:.2f}")


def write_heatmap(path: Path, plans: list[Plan], title: str) -> None:
    """``heatmap_figure`` saved to ``path`` (atomically)."""
    import matplotlib.pyplot as plt

    fig = heatmap_figure(plans, title)
    try:
        save_figure_atomic(fig, path, dpi=100)
    finally:
        plt.close(fig)


def heatmap_figure(plans: list[Plan], title: str) -> Any:
    """Targets in rows, sources in columns (a group-granular weight is shown as its mean over groups).

    The figure grows with the grid, and labels shrink with it, so 1 to 100 targets and sources stay readable; a
    long title wraps. Signed weights get a colour map centred on 0.
    """
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import seaborn as sns

    columns = [p.target for p in plans]  # task order, so the (blank) target-on-itself cells form the diagonal
    for p in plans:
        columns += [s for s in p.sources if s not in columns]
    columns = [c for c in columns if any(c in p.sources for p in plans)]
    grid = np.full((len(plans), len(columns)), np.nan)
    for i, p in enumerate(plans):
        for s in p.sources:
            grid[i, columns.index(s)] = float(np.mean(list(p.weights[s].values())))
    annotate = len(columns) <= ANNOTATE_MAX_COLUMNS and len(plans) <= 3 * ANNOTATE_MAX_COLUMNS
    longest_row = max(len(p.target) for p in plans)
    longest_column = max(len(c) for c in columns)
    label_size = 9 if max(len(columns), len(plans)) <= 30 else 6
    cell = 0.55 if label_size == 9 else 0.22
    char = 0.075 * label_size / 9  # inches per label character
    width = max(6.0, cell * len(columns) + char * longest_row + 2.5)
    height = max(3.5, cell * len(plans) + char * longest_column + 1.8)
    fig, ax = plt.subplots(figsize=(width, height))
    signed = bool(np.nanmin(grid) < 0)
    sns.heatmap(grid, ax=ax, annot=annotate, fmt=".2f", cmap="RdBu_r" if signed else "viridis",
                center=0.0 if signed else None, xticklabels=columns, yticklabels=[p.target for p in plans],
                cbar_kws={"label": "weight"}, annot_kws={"size": 7})
    ax.tick_params(axis="x", labelsize=label_size, labelrotation=90)
    ax.tick_params(axis="y", labelsize=label_size, labelrotation=0)
    ax.set_xlabel("source")
    ax.set_ylabel("target")
    full = title + (" (mean over groups)" if _granular(plans) else "")
    ax.set_title("\n".join(textwrap.wrap(full, width=max(40, int(width * 11)))), fontsize=10)
    fig.tight_layout()
    return fig


def write_search(folder: Path, plans: list[Plan]) -> None:
    """``search.tsv`` (target, evaluation, objective, best so far) and ``search.png``, its curve per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [[p.target, e, repr(v), repr(b)] for p in plans for e, v, b in (p.search or [])]
    write_tsv_atomic(folder / SEARCH_FILE, ["target", "evaluation", "objective", "best"], rows)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for p in plans:
        if p.search:
            ax.plot([e for e, _, _ in p.search], [b for _, _, b in p.search], label=p.target)
    ax.set_xlabel("evaluation")
    ax.set_ylabel("best train loss + L1")
    ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        save_figure_atomic(fig, folder / "search.png", dpi=100)
    finally:
        plt.close(fig)


def _commit(staging: Path, save: Path) -> None:
    """Move each staged entry into ``save``, replacing an older one of the same name."""
    save.mkdir(parents=True, exist_ok=True)
    for entry in sorted(staging.iterdir()):
        dest = save / entry.name
        if dest.exists():
            old = save / f".{entry.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(dest, old)
            os.rename(entry, dest)
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.rename(entry, dest)


def write_fusion(weighting: Weighting, config: FusionConfig, method: str) -> Path:
    """Fuse every target's sources and write the checkpoints, weights.tsv and heatmap.png (all or nothing).

    The caller has checked the destination (``check_destination``) before computing the weights.
    """
    plans = weighting.plans
    effective = {p.target: plan_effective_sources(p) for p in plans}
    save = Path(os.path.abspath(config.save_ckpt_path))
    ref = plans[0].modules[0].meta
    cfg = DeltaConfig.from_checkpoint_meta(ref)
    spec = cfg.spec
    factored = bool(spec.factor_pairs(plans[0].modules[0].shapes))
    lora_combine = config.lora_combine if factored else "params"
    granularity = config.granularity if _granular(plans) else "model"
    save.parent.mkdir(parents=True, exist_ok=True)
    staging = save.parent / f".{save.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        for plan in progress_bar(plans, desc=f"fusing ({method})", disable=len(plans) < 3):
            fused, info = fused_module(plan, plan.weights, config, granularity)
            extra: dict[str, Any] = {
                "fusion": method,
                "merge": config.merge.name,
                "merge_settings": dict(config.merge_settings),
                "top_k": config.top_k,
                "temperature": plan.temperature if plan.temperature is not None else config.tem,
                "weight_norm": config.weight_norm,
                "effective_sources": _plain(effective[plan.target]),
                "granularity": granularity,
                "sources": plan.sources,
                "weights": {s: _plain(plan.weights[s]) for s in plan.sources},
                "scores": None if plan.scores is None else {s: _plain(plan.scores[s]) for s in plan.sources},
                "source_checkpoints": [str(m.path) for m in plan.modules],
            }
            if plan.temperature_dev is not None:  # --tem auto: the dev score of every T tried
                extra["temperature_dev"] = {f"{t:g}": d for t, d in plan.temperature_dev.items()}
            if plan.search:  # learned weights: the search's settings and its best objective
                extra["search"] = {"start": config.learned_start, "budget": config.budget, "bound": config.bound,
                                   "l1": config.l1, "seed": config.search_seed, "best": plan.search[-1][2],
                                   "optimizer": config.optimizer,
                                   **({"lr": config.search_lr} if config.optimizer == "gradient" else {})}
            if factored:
                extra["lora_combine"] = lora_combine
            if weighting.metric:
                extra["metric"], extra["direction"] = weighting.metric, weighting.direction
            extra.update(info)
            save_delta_checkpoint(staging / fused_dir_name(plan.target), fused, cfg, ref["backbone"],
                                  ref["backbone_fingerprint"], task=plan.target, extra=extra)
            best = max(plan.sources, key=lambda s: _mean(plan.weights[s]))
            note = ""
            if "lora_truncation_error" in info:
                note = f", LoRA truncation error {info['lora_truncation_error']:.4f}"
            say(f"{plan.target}: {len(plan.sources)} sources, largest weight {best} "
                f"({_mean(plan.weights[best]):.3f}){note}")
        header, rows = weight_rows(plans, effective)
        write_tsv_atomic(staging / WEIGHTS_FILE, header, rows)
        write_text_atomic(staging / SETTINGS_FILE, json.dumps(fusion_settings(method, config), indent=1) + "\n")
        if any(p.search for p in plans):  # learned weights: the objective at every evaluation of the search
            write_search(staging, plans)
        name = weighting.metric or method  # "others": name the similarity metric
        # T and the score normalisation apply only to weights that are a softmax of scores
        softmax = any(p.scores is not None for p in plans) and not any(p.search for p in plans)
        temperature = "auto (dev)" if config.tem == AUTO else f"{config.tem:g}"
        rule = f", T={temperature}, {config.weight_norm}" if softmax else ""
        write_heatmap(staging / HEATMAP_FILE, plans,
                      f"{name} fusion weights ({config.delta}{rule}; {weights_summary(plans, effective)})")
        _commit(staging, save)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return save


def _mean(d: Mapping[str, float]) -> float:
    return math.fsum(d.values()) / len(d)


def run_fusion(spec: WeightingSpec | str, config: FusionConfig | argparse.Namespace) -> int:
    """Validate everything, compute the weights, then fuse and write (the body of every script's main)."""
    if isinstance(config, argparse.Namespace):
        config = FusionConfig.from_namespace(config)
    spec = get_weighting(spec) if isinstance(spec, str) else spec
    method = spec.name
    config = dataclasses.replace(config, **spec.config)  # the settings that make it (manual: TASK_LIST manual)
    config, tasks = check_config(config)
    # before any module is opened: the cheapest mistake to report
    reads = {f"--{name}": getattr(config, name) for name in ("source_ckpt_path", "random_tuned_ckpt_path",
                                                             "tuneall_ckpt_path", "devall_tsv", "result_tsv",
                                                             "task_dir", "model")}
    check_output_folder(config.save_ckpt_path, "--save_ckpt_path", reads)
    save = Path(os.path.abspath(config.save_ckpt_path))
    if config.resume and not config.overwrite and already_fused(save, method, config):
        print(f"{save}: fused earlier with the same settings; nothing to do (--resume)", flush=True)
        return 0
    cache = ModuleCache()
    # --tem auto: the weightings compute their scores (and placeholder weights at T = 1); the search below
    # then sets each target's weights from its dev split
    planning = dataclasses.replace(config, tem=1.0) if config.tem == AUTO else config
    weighting = spec.planner(planning, tasks, cache)
    cache.check(config.delta)
    first = weighting.plans[0].modules[0]
    check_merge(config.merge, config.merge_settings, DeltaConfig.from_checkpoint_meta(first.meta).spec,
                config.lora_combine, first.shapes)
    check_destination(save, weighting.plans, config.overwrite)
    if config.export_peft:
        export = check_output_folder(config.export_peft, "--export_peft", reads, {"--save_ckpt_path": save})
        for plan in weighting.plans:
            check_peft_destination(export / fused_dir_name(plan.target), config.overwrite, "--export_peft")
    if spec.learns_weights:
        if config.top_k or config.tem == AUTO:
            raise UserInputError("--top_k and --tem auto apply to similarity weights, not to learned ones")
        train = OnTarget(config, weighting.plans[0].modules[0].meta, "train")
        granularity = config.granularity
        learn_weights(weighting.plans, search_settings(config),
                      lambda plan, weights: fused_module(plan, weights, config, granularity)[0], train.loss,
                      gradient_objective(config, train, granularity))
    for plan in weighting.plans:
        plan.weights = keep_top_k(plan.weights, config.top_k)
    if config.tem == AUTO and any(p.scores is not None for p in weighting.plans):
        dev = OnTarget(config, weighting.plans[0].modules[0].meta, "dev")
        granularity = config.granularity if _granular(weighting.plans) else "model"
        choose_temperatures(weighting.plans, config.weight_norm,
                            lambda plan, weights: fused_module(plan, weights, config, granularity)[0], dev.score,
                            top_k=config.top_k)
    print(f"{method} fusion of {config.delta} modules for {len(weighting.plans)} target(s) into "
          f"{config.save_ckpt_path}", flush=True)
    write_fusion(weighting, config, method)
    print(f"wrote {len(weighting.plans)} fused checkpoint(s), {WEIGHTS_FILE} and {HEATMAP_FILE} in {save}",
          flush=True)
    if config.export_peft:
        for plan in weighting.plans:
            name = fused_dir_name(plan.target)
            export_peft(save / name, Path(config.export_peft) / name, base_model=config.model or None,
                        overwrite=config.overwrite, flag="--export_peft")
        print(f"wrote {len(weighting.plans)} PEFT adapter(s) in {config.export_peft}", flush=True)
    return 0
