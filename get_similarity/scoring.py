"""The zero-shot similarity table (the study's stage 5): every metric of every source module on every target.

The command line is ``get_similarity/score.py``, whose help says what a run does and writes; this module is what
it and the study call.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from dataloader.crossfit import Example, load_task
from dataloader.metrics import metric_for_task
from get_similarity.estimators import Probe, Update, input_second_moment
from get_similarity.metrics import (
    METRICS,
    AnswerOutputs,
    Metric,
    TokenMean,
    check_prefilter,
    modules_grad_norms,
    per_example_grad_norms,
    resolve_metrics,
)
from get_similarity.settings import SimilarityConfig
from models.backbone import load_backbone, pick_device, quiet_libraries
from models.backbones import IGNORE_INDEX, family_of
from models.delta import (
    DeltaConfig,
    attach_delta,
    backbone_fingerprint,
    check_compatible,
    check_delta_shapes,
    delta_state_dict,
    is_delta_param,
    load_delta_state,
    param_group,
)
from models.evaluate import autocast
from models.examples import (
    EncodedTask,
    collate,
    encode_examples,
    first_output_batches,
    label_set,
    longest_example,
    to_device,
)
from models.formats import inspect_delta_checkpoint, load_delta_checkpoint
from models.group import (
    active,
    channel_rows,
    chunks,
    ensure_slots,
    load_slot_state,
    pick_group_size,
    shared_batch,
    slot_params,
)
from models.run_folders import file_lock, resolve_checkpoint, source_path
from task_list import resolve_tasks, resolve_tasks_in
from utils.errors import UserInputError
from utils.io import check_output_folder, read_json_object, write_text_atomic, write_tsv_atomic
from utils.params import first_difference
from utils.progress import progress_bar, say
from utils.ranges import check_ranges

COLUMNS = ["target", "source", "metric", "group", "score"]
RESULT_FILE = "result.tsv"


def delta_groups(model: torch.nn.Module, granularity: str) -> dict[str, list[str]]:
    """Group -> delta parameter names, groups in the order the model lists their first parameter."""
    groups: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():
        if is_delta_param(name):
            groups.setdefault(param_group(name, granularity), []).append(name)
    return groups


Scores = dict[str, dict[str, float | None]]  # metric -> parameter group -> score (None: undefined, written "-")


@dataclass
class TargetContext:
    """What the answer-level and parameter-space metrics need of a target besides its examples: whether it has
    classes, and the probes of the parameter-space metrics (SimilarityScorer.probes), computed once per target."""

    has_classes: bool = False
    probes: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def labels(self, task: EncodedTask, indices: list[int]) -> list[Any]:
        """The answer-level label of each example: its gold answer on a classification target, else the first
        token of its first gold output."""
        if self.has_classes:
            return [task.examples[i].outputs[0] for i in indices]
        return [task.outputs[i][0][0] if task.outputs[i][0] else -1 for i in indices]


class SimilarityScorer:
    """A backbone with its delta module attached; scores one source state (or a group of them) on one target."""

    def __init__(self, model: torch.nn.Module, pad_id: int, init_state: dict[str, torch.Tensor],
                 granularity: str, batch_size: int, cfg: DeltaConfig | None = None):
        self.model, self.pad_id, self.batch_size = model, pad_id, batch_size
        self.init_state = init_state
        self.granularity = granularity
        self.groups = delta_groups(model, granularity)
        self.device = next(model.parameters()).device
        self.family = family_of(model)
        self.cfg = cfg  # the module's config: needed to add slots for score_group, and by parameter-space metrics

    def group_state(self, tensors: dict[str, torch.Tensor], group: str) -> dict[str, torch.Tensor]:
        """The source's tensors inside ``group``, the initial state everywhere else."""
        members = set(self.groups[group])
        return {n: (tensors[n] if n in members else t) for n, t in self.init_state.items()}

    @torch.no_grad()
    def logits(self, task: EncodedTask) -> list[torch.Tensor]:
        """Logits of the current state on each deterministic batch of ``task`` (first gold outputs)."""
        out = []
        for _, batch in first_output_batches(self.model, task, self.batch_size, self.pad_id):
            out.append(self.family.answer_logits(self.model, to_device(batch, self.device)))
        return out

    def reference(self, task: EncodedTask, tensors: dict[str, torch.Tensor], source: str) -> list[torch.Tensor]:
        """Per-batch logits of a reference module (KL's P_t), kept for all sources of this target."""
        load_delta_state(self.model, tensors, source)
        return self.logits(task)

    def score(self, task: EncodedTask, tensors: dict[str, torch.Tensor], metrics: list[Metric],
              source: str = "source", reference: list[torch.Tensor] | None = None,
              context: TargetContext | None = None) -> Scores:
        """Metric -> group -> score of the source ``tensors`` on ``task``."""
        return self._score(task, [(tensors, source)], metrics, reference, context, None)[0]

    def score_group(self, task: EncodedTask, sources: list[tuple[dict[str, torch.Tensor], str]],
                    metrics: list[Metric], reference: list[torch.Tensor] | None = None,
                    context: TargetContext | None = None) -> list[Scores]:
        """``score`` of several sources (tensors, name) at once: each in its own slot (models/group.py), every
        forward pass shared under ``Parallel``; GraNd stays per example and per module, exact."""
        if len(sources) == 1 or not any(m.kind != "parameter" for m in metrics):
            return [self.score(task, tensors, metrics, source, reference, context) for tensors, source in sources]
        if self.cfg is None:
            raise ValueError("scoring a group of sources needs the scorer's DeltaConfig")
        slots = ensure_slots(self.model, self.cfg, len(sources))
        with active(self.model, slots):
            return self._score(task, sources, metrics, reference, context, slots)

    def _score(self, task: EncodedTask, sources: list[tuple[dict[str, torch.Tensor], str]], metrics: list[Metric],
               reference: list[torch.Tensor] | None, context: TargetContext | None,
               slots: list[str] | None) -> list[Scores]:
        """Every metric of every source: the forward metrics per group (one pass serves them all), GraNd per
        example, the parameter-space metrics from the tensors alone. ``slots`` None: one source, the model's own
        module; else one slot per source, active."""
        if any(m.needs_reference for m in metrics) and reference is None:
            raise ValueError("a metric needs reference logits but none were given")
        if any(m.kind in ("answer", "parameter") for m in metrics) and context is None:
            raise ValueError("an answer-level or parameter-space metric needs the target's context")
        out: list[Scores] = [{m.name: {} for m in metrics} for _ in sources]
        forward = [m for m in metrics if m.kind in ("token", "answer")]
        for group in self.groups if forward else ():
            for i, (tensors, source) in enumerate(sources):
                self._load(self.group_state(tensors, group), source, slots, i)
            for i, scores in enumerate(self._forward_scores(task, forward, reference, context, slots)):
                for name, value in scores.items():
                    out[i][name][group] = value
        if any(m.kind == "grad" for m in metrics):
            for i, (tensors, source) in enumerate(sources):
                self._load(tensors, source, slots, i)
            if slots is None:
                norms = [per_example_grad_norms(self.model, task, self.pad_id, self.groups)]
            else:
                norms = modules_grad_norms(self.model, task, self.pad_id, self.groups,
                                           [slot_params(self.model, slot) for slot in slots],
                                           lambda batch: self._channel_losses(batch, slots))
            for m in metrics:
                if m.kind == "grad":
                    for i, per_group in enumerate(norms):
                        out[i][m.name] = {g: sum(v) / len(v) for g, v in per_group.items()}
        for m in metrics:
            if m.kind == "parameter":
                for i, (tensors, _) in enumerate(sources):
                    out[i][m.name] = self.parameter_scores(m, tensors, context)
        return out

    def _load(self, tensors: dict[str, torch.Tensor], source: str, slots: list[str] | None, i: int) -> None:
        if slots is None:
            load_delta_state(self.model, tensors, source)
        else:
            load_slot_state(self.model, slots[i], tensors, source)

    def _channel_logits(self, batch: dict[str, torch.Tensor], slots: list[str]) -> list[torch.Tensor]:
        """Each slot's logits on ``batch`` from one forward pass (models.group.shared_batch)."""
        logits = self.family.answer_logits(self.model, shared_batch(self.model, slots, batch))
        return channel_rows(logits, len(slots))

    def _channel_losses(self, batch: dict[str, torch.Tensor], slots: list[str]) -> list[torch.Tensor]:
        """Each slot's mean token loss on ``batch`` (the model's own loss, per slot)."""
        labels = batch["labels"].reshape(-1)
        return [torch.nn.functional.cross_entropy(r.reshape(-1, r.shape[-1]), labels, ignore_index=IGNORE_INDEX)
                for r in self._channel_logits(batch, slots)]

    @torch.no_grad()
    def _forward_scores(self, task: EncodedTask, metrics: list[Metric], reference: list[torch.Tensor] | None,
                        context: TargetContext | None, slots: list[str] | None) -> list[dict[str, float | None]]:
        """The token metrics' pooled means and the answer-level metrics of each channel (one without slots)."""
        channels = len(slots) if slots else 1
        token = [m for m in metrics if m.kind == "token"]
        answer = [m for m in metrics if m.kind == "answer"]
        means = [{m.name: TokenMean() for m in token} for _ in range(channels)]
        first_logp: list[list[torch.Tensor]] = [[] for _ in range(channels)]
        features: list[list[torch.Tensor]] = [[] for _ in range(channels)]
        labels: list[Any] = []
        captured: list[torch.Tensor] = []
        hook = (self.model.get_output_embeddings().register_forward_hook(lambda _m, args, _o: captured.append(args[0]))
                if answer else None)
        try:
            for b, (indices, batch) in enumerate(first_output_batches(self.model, task, self.batch_size, self.pad_id)):
                batch = to_device(batch, self.device)
                fed = shared_batch(self.model, slots, batch) if slots else batch
                logits = self.family.answer_logits(self.model, fed)
                rows = channel_rows(logits, channels)
                for i, channel_logits in enumerate(rows):
                    for m in token:
                        ref = reference[b] if m.needs_reference else None
                        means[i][m.name].add(*m.fn(channel_logits, batch["labels"], ref))
                if answer:
                    hidden = channel_rows(self.family.align(captured.pop(), fed), channels)
                    for i in range(channels):
                        first_logp[i].append(rows[i][:, 0].float().log_softmax(-1).cpu())
                        features[i].append(hidden[i][:, 0].float().cpu())
                    labels.extend(context.labels(task, list(indices)))
        finally:
            if hook is not None:
                hook.remove()
        out: list[dict[str, float | None]] = []
        for i in range(channels):
            scores: dict[str, float | None] = {name: mean.value() for name, mean in means[i].items()}
            if answer:
                seen = AnswerOutputs(torch.cat(first_logp[i]), torch.cat(features[i]), labels, context.has_classes)
                scores.update({m.name: m.fn(seen) for m in answer})
            out.append(scores)
        return out

    # -- parameter-space metrics ---------------------------------------------------------------------------

    def updates(self, tensors: dict[str, torch.Tensor]) -> dict[str, Update]:
        """A source's task vector as estimators.Update parts: each factor pair kept as its two factors, every
        other tensor minus the method's neutral value."""
        spec, sizes = self._spec()
        pairs = spec.factor_pairs(list(tensors))
        paired = {k for pair in pairs.values() for k in pair}
        scale = spec.scaling(sizes)
        out = {name: Update(a=tensors[a], b=tensors[b], scale=scale) for name, (a, b) in pairs.items()}
        for k, v in tensors.items():
            if k not in paired:
                out[k] = Update(tensor=v.double() - spec.task_vector_origin)
        return out

    def parameter_scores(self, metric: Metric, tensors: dict[str, torch.Tensor],
                         context: TargetContext) -> dict[str, float]:
        """Group -> score of a parameter-space metric (no forward pass: the target's probe against the tensors)."""
        if metric.probe not in context.probes:
            raise ValueError(f"{metric.name} needs the target's {metric.probe!r} probe (SimilarityScorer.probes)")
        updates, probe = self.updates(tensors), context.probes[metric.probe]
        if len(self.groups) == 1:
            return {g: metric.fn(probe, updates) for g in self.groups}
        part_group = self.part_groups
        return {g: metric.fn(probe, {k: u for k, u in updates.items() if part_group[k] == g}) for g in self.groups}

    @cached_property
    def part_groups(self) -> dict[str, str]:
        """The parameter group of each task-vector part (a factor pair's is that of its A factor): the same for
        every source, so worked out once."""
        spec, _ = self._spec()
        pairs = spec.factor_pairs(list(self.init_state))
        paired = {k for pair in pairs.values() for k in pair}
        parts = {k: a for k, (a, _) in pairs.items()} | {k: k for k in self.init_state if k not in paired}
        return {k: param_group(name, self.granularity) for k, name in parts.items()}

    def _spec(self) -> tuple[Any, dict[str, Any]]:
        if self.cfg is None:
            raise ValueError("parameter-space metrics need the scorer's DeltaConfig")
        return self.cfg.spec, self.cfg.sizes()

    def probes(self, task: EncodedTask, metrics: list[Metric]) -> dict[str, dict[str, torch.Tensor]]:
        """The target probes the parameter-space ``metrics`` read, each computed once, at the neutral module."""
        wanted = list(dict.fromkeys(m.probe for m in metrics if m.kind == "parameter"))
        if not wanted:
            return {}
        spec, _ = self._spec()
        neutral = spec.neutral_state(self.init_state)
        if neutral is None:
            raise UserInputError(f"--metric {', '.join(m.name for m in metrics if m.kind == 'parameter')}: "
                                 f"{spec.name} modules have no neutral state to take a probe at")
        load_delta_state(self.model, neutral, "the neutral module")
        make = {"inputs": self._input_probe, "gradient": self._gradient_probe}
        return {probe: Probe(make[probe](task)) for probe in wanted}

    def _projections(self) -> dict[str, torch.nn.Linear]:
        """Factor pair -> the projection it updates, checked to have ΔW's shape."""
        spec, _ = self._spec()
        out = {}
        for name, (a, b) in spec.factor_pairs(list(self.init_state)).items():
            layer = self.model.get_submodule(name.split(f".{spec.storage}.")[0])
            want = (self.init_state[b].shape[0], self.init_state[a].shape[1])
            if tuple(layer.weight.shape) != want:
                raise ValueError(f"{name}: the projection's weight is {tuple(layer.weight.shape)}, ΔW is {want}")
            out[name] = layer
        return out

    @torch.no_grad()
    def _input_probe(self, task: EncodedTask) -> dict[str, torch.Tensor]:
        """Pair -> the second moment of the target's unit-norm inputs to its projection over every token
        (estimators.input_second_moment; one example per forward pass, so no padding enters)."""
        rows: dict[str, list[torch.Tensor]] = {}
        hooks = []
        for name, layer in self._projections().items():
            rows[name] = []
            hooks.append(layer.register_forward_pre_hook(
                lambda _m, args, store=rows[name]: store.append(args[0].reshape(-1, args[0].shape[-1]).float())))
        try:
            for ids, outputs in zip(task.inputs, task.outputs):
                batch = to_device(collate(self.model, [ids], [outputs[0]], self.pad_id), self.device)
                self.family.answer_logits(self.model, batch)
        finally:
            for hook in hooks:
                hook.remove()
        return {name: input_second_moment(torch.cat(found)).float().cpu() for name, found in rows.items()}

    def _gradient_probe(self, task: EncodedTask) -> dict[str, torch.Tensor]:
        """Part -> ∇ of the target's pooled token loss at the neutral module: with respect to each factor pair's
        ΔW (the projection's own weight, since ΔW adds to it) and to every other delta tensor."""
        spec, _ = self._spec()
        params = dict(self.model.named_parameters())
        projections = self._projections()
        paired = {k for pair in spec.factor_pairs(list(self.init_state)).values() for k in pair}
        wrt = {**{name: layer.weight for name, layer in projections.items()},
               **{k: params[k] for k in self.init_state if k not in paired}}
        frozen = [w for w in wrt.values() if not w.requires_grad]
        total = {k: torch.zeros_like(w, dtype=torch.float64) for k, w in wrt.items()}
        tokens = 0
        try:
            for w in frozen:
                w.requires_grad_(True)
            for _, batch in first_output_batches(self.model, task, self.batch_size, self.pad_id):
                batch = to_device(batch, self.device)
                with torch.enable_grad():
                    logits = self.family.answer_logits(self.model, batch)
                    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                             batch["labels"].reshape(-1), ignore_index=IGNORE_INDEX,
                                                             reduction="sum")
                    grads = torch.autograd.grad(loss, list(wrt.values()), allow_unused=True)
                for k, g in zip(wrt, grads):
                    if g is not None:
                        total[k] += g.double()
                tokens += int((batch["labels"] != IGNORE_INDEX).sum())
        finally:
            for w in frozen:
                w.requires_grad_(False)
        return {k: (g / max(tokens, 1)).cpu() for k, g in total.items()}


# --------------------------------------------------------------------------------------------------
# Inputs


@dataclass
class Module:
    """A resolved, checked checkpoint: its folder, metadata and parameter shapes; its tensors stay on disk."""

    task: str
    folder: Path
    shapes: dict[str, tuple[int, ...]]
    meta: dict[str, Any]
    flag: str

    def tensors(self) -> dict[str, torch.Tensor]:
        """Read the tensors now; the caller drops them once used, so that one module is held at a time."""
        try:
            tensors, _ = load_delta_checkpoint(self.folder)
        except UserInputError as e:  # changed on disk since it was checked
            raise UserInputError(f"{self.flag}: task {self.task}: {e}") from None
        return tensors


def inspect_module(root: str, task: str, flag: str) -> Module:
    """``{root}/{task}`` resolved to a checkpoint and checked, tensors left unread; errors name the flag and task."""
    try:
        folder = resolve_checkpoint(source_path(root, task), task=task)
        shapes, meta = inspect_delta_checkpoint(folder)
    except UserInputError as e:
        raise UserInputError(f"{flag}: task {task}: {e}") from None
    if meta.get("task") not in (None, task):
        say(f"warning: {folder} was tuned on task {meta['task']!r}, used here for {task!r}", file=sys.stderr)
    return Module(task, folder, shapes, meta, flag)


def check_args(config: SimilarityConfig) -> list[Metric]:
    metrics = resolve_metrics(config.metric, config.delta)
    check_ranges(config)  # every number against the range its field declares (get_similarity/settings.py)
    if config.prefilter is not None:
        cheap = check_prefilter(config.prefilter, config.delta)
        if config.resume:
            raise UserInputError("--resume with --prefilter: the retrieval decides which rows a run writes, so a "
                                 "resumed table could mix two retrievals; rerun with --overwrite")
        if cheap not in metrics:
            metrics = [*metrics, cheap]
    needs_ref = [m.name for m in metrics if m.needs_reference]
    if needs_ref and not config.random_tuned_ckpt_path:
        raise UserInputError(f"--random_tuned_ckpt_path is required for {', '.join(needs_ref)} (the module tuned "
                             "from random init on each target gives the reference distribution)")
    out = check_output_folder(config.output_dir, "--output_dir", {
        "--task_dir": config.task_dir, "--model": config.model, "--tokenizer_path": config.tokenizer_path,
        "--source_ckpt_path": config.source_ckpt_path, "--random_tuned_ckpt_path": config.random_tuned_ckpt_path})
    if (out / RESULT_FILE).is_dir():
        raise UserInputError(f"--output_dir: {out / RESULT_FILE} is a folder, expected a file or nothing")
    earlier = read_result(out / RESULT_FILE)  # refuse a malformed one now rather than after scoring
    if earlier:
        check_same_settings(out, config)
    return metrics


def read_result(path: Path) -> list[list[str]]:
    """Rows of an existing result.tsv (none if there is no file); a malformed one is a UserInputError."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].split("\t") != COLUMNS:
        raise UserInputError(f"{path}:1: expected the header {'<TAB>'.join(COLUMNS)}; not updating this file")
    rows = []
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != len(COLUMNS):
            raise UserInputError(f"{path}:{lineno}: expected {len(COLUMNS)} tab-separated fields, found {len(fields)}")
        rows.append(fields)
    return rows


def check_no_earlier_rows(path: Path, keys: set[tuple[str, str, str, str]]) -> None:
    """Refuse when ``path`` already holds a row with one of ``keys`` (target, source, metric, group)."""
    for lineno, row in enumerate(read_result(path), start=2):
        if tuple(row[:4]) in keys:
            raise UserInputError(f"{path}:{lineno}: already holds the score of (target={row[0]}, source={row[1]}, "
                                 f"metric={row[2]}, group={row[3]}) from an earlier run; pass --overwrite to "
                                 "replace it or choose another --output_dir")


def merge_rows(old: list[list[str]], new: list[list]) -> list[list]:
    """``old`` rows that ``new`` does not replace (same target, source, metric, group), then ``new``."""
    keys = {tuple(str(x) for x in row[:4]) for row in new}
    return [row for row in old if tuple(row[:4]) not in keys] + new


def load_targets(config: SimilarityConfig, targets: list[str]) -> dict[str, list[Example]]:
    data = {}
    for t in targets:
        examples = load_task(config.task_dir, t, config.k, config.data_seed, [config.split])[config.split]
        data[t] = examples[: config.max_examples] if config.max_examples else examples
    return data


def check_modules(modules: list[Module], cfg: DeltaConfig, fingerprint: dict[str, int | str],
                  allow_other_weights: bool = False, backbone: str | None = None) -> None:
    for m in modules:
        check_compatible(m.meta, cfg, fingerprint, str(m.folder), allow_other_weights=allow_other_weights,
                         backbone=backbone)



SETTINGS_FILE = "score_settings.json"  # beside result.tsv: the settings its rows were scored with
# What the scores depend on besides the (target, source, metric, group) of a row: rows of other settings must not
# share a table, or a resumed or merged table would mix two set-ups under one header.
# (Metrics and granularities may share a table: the metric and group columns tell their rows apart.)
SCORE_SETTINGS = ("delta", "split", "max_examples", "init_seed", "k", "data_seed", "max_input_length",
                  "max_output_length", "model", "tokenizer_path", "bf16")
RETRIEVAL_SETTINGS = ("prefilter", "prefilter_top")  # which sources the expensive metrics scored


def score_settings(config: SimilarityConfig) -> dict:
    """The settings a table's rows depend on; the retrieval's only when it is on, so that tables scored before it
    existed still compare equal."""
    names = SCORE_SETTINGS + (RETRIEVAL_SETTINGS if config.prefilter else ())
    return json.loads(json.dumps({name: getattr(config, name) for name in names}, default=str))


def score_text(value: float | None) -> str:
    """A score as result.tsv writes it: "-" where the metric is undefined on the target."""
    return "-" if value is None else f"{value:.10g}"


def check_same_settings(out: Path, config: SimilarityConfig) -> None:
    """A result.tsv that holds rows (the caller has read them) may only gain rows of the settings it was scored
    with."""
    table, recorded = out / RESULT_FILE, out / SETTINGS_FILE
    if not recorded.is_file():
        if config.resume:
            raise UserInputError(f"{table}: rows without recorded settings ({recorded} is missing: an older or "
                                 "foreign table), so a resumed run cannot tell they match; choose another --output_dir")
        return
    made, wanted = read_json_object(recorded), score_settings(config)
    k = first_difference(made, wanted)
    if k is not None:
        raise UserInputError(f"{table}: its rows were scored with {k}={made.get(k)!r}, this run asks {k}="
                             f"{wanted.get(k)!r}; one table holds one set-up: choose another --output_dir")


# Long by design: every check comes before the first forward pass, then one loop over targets and groups of
# sources; splitting it would scatter that order.
def run_similarity(config: SimilarityConfig) -> None:
    """Score every (target, source) pair and merge the rows into result.tsv; inputs checked before any scoring."""
    if config.quiet:
        quiet_libraries()
    metrics = check_args(config)

    # Everything that can be wrong with the input is checked before any scoring and any writing.
    task_dir, targets = resolve_tasks_in(config.task_dir, config.tasks)
    source_tasks = resolve_tasks(config.source_tasks, flag="--source_tasks") if config.source_tasks else list(targets)
    plan = {t: [s for s in source_tasks if s != t] for t in targets}  # leave-one-out
    lonely = [t for t, sources in plan.items() if not sources]
    if lonely:
        raise UserInputError(f"--source_tasks: target {lonely[0]} has no source other than itself")
    examples = load_targets(config, targets)
    needed = [s for s in source_tasks if any(s in sources for sources in plan.values())]
    sources = {s: inspect_module(config.source_ckpt_path, s, "--source_ckpt_path") for s in needed}
    first = sources[needed[0]]
    cfg = DeltaConfig.from_checkpoint_meta(first.meta)
    if cfg.method != config.delta:
        raise UserInputError(f"--delta {config.delta}: checkpoint {first.folder} holds a {cfg.method} module")
    allow = config.allow_other_backbone
    references: dict[str, Module] = {}
    if any(m.needs_reference for m in metrics):
        references = {t: inspect_module(config.random_tuned_ckpt_path, t, "--random_tuned_ckpt_path") for t in targets}

    device = torch.device(pick_device(config.device))
    model, tokenizer = load_backbone(config.model, config.tokenizer_path, device)
    # every module against the backbone itself (a converted one, e.g. a PEFT adapter, records only part of a
    # fingerprint, so no module's record can stand for the backbone's)
    fingerprint = backbone_fingerprint(model)
    check_modules([*sources.values(), *references.values()], cfg, fingerprint, allow, config.model)
    torch.manual_seed(config.init_seed)
    attach_delta(model, cfg)
    model.to(device)
    init_state = delta_state_dict(model)
    for module in [*sources.values(), *references.values()]:
        check_delta_shapes(model, module.shapes, str(module.folder))  # keys and shapes, before any scoring
    scorer = SimilarityScorer(model, tokenizer.pad_token_id, init_state, config.granularity, config.batch_size, cfg)
    have: set[tuple[str, ...]] = set()
    if config.resume and not config.overwrite:  # a pair with every row there is done; a partial one is redone
        have = {tuple(row[:4]) for row in read_result(Path(config.output_dir) / RESULT_FILE)}
        plan = {t: [s for s in plan[t] if not all((t, s, m.name, g) in have for m in metrics for g in scorer.groups)]
                for t in targets}
        if not any(plan.values()):
            print(f"every row is in {Path(config.output_dir) / RESULT_FILE} already: nothing to score (--resume)")
            return
        targets = [t for t in targets if plan[t]]
    elif not config.overwrite:
        check_no_earlier_rows(Path(config.output_dir) / RESULT_FILE,
                              {(t, s, m.name, g) for t in targets for s in plan[t] for m in metrics
                               for g in scorer.groups})
    encoded = {t: encode_examples(tokenizer, ex, config.max_input_length, config.max_output_length)
               for t, ex in examples.items()}
    size, why = pick_group_size(config.group_size, max(len(p) for p in plan.values()), model.config, device,
                                config.batch_size, longest_example(encoded.values()),
                                training=any(m.needs_grad for m in metrics))
    cheap = METRICS[config.prefilter] if config.prefilter else None
    expensive = [m for m in metrics if m is not cheap]
    if cheap is not None:
        print(f"two-stage retrieval: {cheap.name} ranks every source, the other metrics score its top "
              f"{config.prefilter_top}", flush=True)
    print(f"{len(targets)} target(s) x {len(needed)} source(s), metrics {', '.join(m.name for m in metrics)}, "
          f"{cfg.describe()}, granularity {config.granularity} ({len(scorer.groups)} group(s)), device {device}; "
          f"{why}", flush=True)

    rows: list[list] = []
    pairs, seconds, ranked_pairs, ranking = 0, 0.0, 0, 0.0  # the retrieval's first stage is timed apart
    for t in progress_bar(targets, desc="targets", disable=len(targets) == 1):
        with autocast(device, config.bf16):  # the one autocast policy (models.evaluate): CUDA only
            reference = None
            if t in references:
                reference = scorer.reference(encoded[t], references[t].tensors(), str(references[t].folder))
            classes = label_set(examples[t], metric_for_task(t, task_dir)) is not None
            context = TargetContext(classes, scorer.probes(encoded[t], [*metrics, *([cheap] if cheap else [])]))
            chosen, ranked = plan[t], []
            if cheap is not None:  # stage one: the cheap metric ranks every source, one module read at a time
                start = time.perf_counter()
                for s in progress_bar(plan[t], desc=f"{cheap.name} -> {t}", leave=False):
                    scores = scorer.parameter_scores(cheap, sources[s].tensors(), context)
                    rows.extend([t, s, cheap.name, g, score_text(v)] for g, v in scores.items())
                    ranked.append((-math.fsum(cheap.similarity(v) for v in scores.values()), s))
                chosen = [s for _, s in sorted(ranked)[:config.prefilter_top]]
                ranking += time.perf_counter() - start
                ranked_pairs += len(ranked)
            for group in progress_bar(chunks(chosen, size), desc=f"sources -> {t}", leave=False):
                start = time.perf_counter()
                # Temporaries: the tensors are freed when the group is scored, before the next one is read.
                scored = scorer.score_group(encoded[t], [(sources[s].tensors(), str(sources[s].folder))
                                                         for s in group], expensive, reference, context)
                seconds += time.perf_counter() - start
                pairs += len(group)
                for s, scores in zip(group, scored):
                    for m in expensive:
                        rows.extend([t, s, m.name, g, score_text(v)] for g, v in scores[m.name].items()
                                    if (t, s, m.name, g) not in have)  # resume: an earlier row stays as it was

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with file_lock(out / f".{RESULT_FILE}.lock"):  # parallel jobs writing other targets into one file
        merged = merge_rows(read_result(out / RESULT_FILE), rows)
        write_text_atomic(out / SETTINGS_FILE, json.dumps(score_settings(config), indent=1) + "\n")
        write_tsv_atomic(out / RESULT_FILE, COLUMNS, merged)
    kept = len(merged) - len(rows)
    print(f"{len(rows)} rows -> {out / RESULT_FILE}{f' ({kept} earlier rows kept)' if kept else ''}; "
          f"{seconds / max(pairs, 1):.3f} s per source per target"
          + (f"; {cheap.name} ranked {ranked_pairs} at {ranking / ranked_pairs * 1e3:.2f} ms per source per target"
             if ranked_pairs else ""), flush=True)

