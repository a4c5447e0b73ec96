"""Zero-shot similarity metrics between a source's delta module θ_s and a target task t.

Each metric is a small registered function; ``METRICS`` maps its name to a :class:`Metric` that says
whether a lower or a higher value means "more similar" (``direction``), whether it needs the target's
reference logits (KL) and whether it needs gradients (GraNd).

Token-level metrics (Loss, KL, EL2N, LogitsCos) take ``(logits [B,T,V], labels [B,T], reference_logits
[B,T,V] or None)`` and return ``(values [B,T], mask [B,T])``: one value per target token and a mask that
is False at label padding (``-100``). Callers sum the masked values over *all* target tokens of D_t and
divide by the number of tokens (:class:`TokenMean`): a pooled mean over tokens, so a long answer weighs
more than a short one, not a mean of per-example means.

* Loss: -log p_s(y_j | x, y_<j); lower is more similar.
* KL: KL(P_t ‖ p_s) = Σ_v P_t(v) (log P_t(v) - log p_s(v)) per token, P_t from a module tuned from random
  initialisation on t's few-shot train split; lower.
* EL2N: ‖p_s - onehot(y_j)‖₂ per token; lower.
* LogitsCos: cos(p_s, onehot(y_j)) = p_s(y_j) / ‖p_s‖₂ per token; higher.

Answer-level metrics (``kind="answer"``: LEEP, LogME) see the whole split at once: ``fn(AnswerOutputs)`` gets
every example's log-distribution over its first answer token, its features there (the input of the output
layer) and its target label, and returns one value, or None where the metric is undefined (LogME on a target
without classes: an unknown, written "-").

Parameter-space metrics (``kind="parameter"``: Arrow, GradAlign) run no forward pass per source: the scorer
computes one probe per target (``probe``: the base model's inputs to each adapted projection, or the target's
loss gradient at the neutral module) and ``fn(probe, updates)`` compares it with the source's task vector
(get_similarity/estimators.py). A metric that needs a method's structure names the methods it applies to.

GraNd works per example instead: ``fn(grads)`` is the L2 norm of one example's gradient of its mean token
loss with respect to θ_s (or one group of θ_s), and the score is the mean over examples of D_t.
:func:`per_example_grad_norms` computes these norms, one backward pass per example.

All arithmetic is in float32 (logits may come in bf16 from a GPU).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from get_similarity import estimators
from models.backbones import IGNORE_INDEX, family_of, token_logp
from models.examples import EncodedTask, collate, to_device
from utils.errors import UserInputError

DIRECTIONS = ("lower", "higher")
KINDS = ("token", "grad", "answer", "parameter")
PROBES = ("inputs", "gradient")  # what a parameter-space metric needs of the target, computed once per target
TokenFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Metric:
    """A registered similarity metric; ``direction`` says which way is more similar."""

    name: str
    direction: str
    fn: Callable
    needs_reference: bool = False
    needs_grad: bool = False
    kind: str = "token"
    probe: str | None = None  # parameter-space metrics: the target probe they read
    methods: tuple[str, ...] = ()  # the delta methods it applies to; empty: every one

    def applies_to(self, method: str) -> bool:
        return not self.methods or method in self.methods

    def require_method(self, method: str, where: str, method_flag: str = "--delta") -> None:
        """Refuse, in one line that starts with ``where``, a delta method this metric does not apply to."""
        if not self.applies_to(method):
            raise UserInputError(f"{where}: applies to {', '.join(self.methods)} modules, not to "
                                 f"{method_flag} {method}")

    def similarity(self, value: float) -> float:
        """The value oriented so that higher always means more similar (negated for "lower" metrics)."""
        return value if self.direction == "higher" else -value


METRICS: dict[str, Metric] = {}


def register(name: str, direction: str, needs_reference: bool = False, needs_grad: bool = False,
             kind: str | None = None, probe: str | None = None,
             methods: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Add the decorated function to METRICS under ``name``; the function itself is returned unchanged."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, found {direction!r}")
    kind = kind or ("grad" if needs_grad else "token")
    if kind not in KINDS or (kind == "parameter") != (probe is not None) or (probe and probe not in PROBES):
        raise ValueError(f"metric {name!r}: kind {kind!r} with probe {probe!r}; expected a kind of {KINDS}, and a "
                         f"probe of {PROBES} exactly for parameter-space metrics")

    def decorate(fn: Callable) -> Callable:
        if name in METRICS:
            raise ValueError(f"similarity metric {name!r} registered twice")
        METRICS[name] = Metric(name, direction, fn, needs_reference, needs_grad, kind, probe, methods)
        return fn

    return decorate


def resolve_metrics(names: list[str] | str, method: str | None = None) -> list[Metric]:
    """Metrics named on the command line (space- or comma-separated; ``all`` = every one that applies to
    ``method``), in order given; a named metric that does not apply to ``method`` is refused."""
    if isinstance(names, str):
        names = [names]
    tokens = [t for name in names for t in name.replace(",", " ").split()]
    if not tokens:
        raise UserInputError("--metric: no metric given")
    picked: list[str] = []
    for token in tokens:
        if token == "all":
            picked.extend(n for n, m in METRICS.items() if method is None or m.applies_to(method))
        elif token in METRICS:
            if method is not None:
                METRICS[token].require_method(method, f"--metric {token}")
            picked.append(token)
        else:
            raise UserInputError(f"--metric: unknown metric {token!r}; expected 'all' or some of {', '.join(METRICS)}")
    return [METRICS[n] for n in dict.fromkeys(picked)]  # de-duplicated, first mention wins


def check_prefilter(name: str, method: str, flag: str = "--prefilter", method_flag: str = "--delta") -> Metric:
    """The metric of a two-stage retrieval: one that runs no forward pass per source and applies to ``method``."""
    cheap = METRICS.get(name)
    if cheap is None or cheap.kind != "parameter":
        cheap_ones = [m.name for m in METRICS.values() if m.kind == "parameter"]
        raise UserInputError(f"{flag} {name}: expected a metric that runs no forward pass per source, one of "
                             f"{', '.join(cheap_ones)}")
    cheap.require_method(method, f"{flag} {name}", method_flag)
    return cheap


# --- token-level metrics ----------------------------------------------------------------------------------


def _answer_mask(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mask of real target tokens, once the logits are checked to score the labels."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    return labels != IGNORE_INDEX


def _prepare(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probabilities in float32, labels safe to gather with, mask of real target tokens)."""
    mask = _answer_mask(logits, labels)
    return logits.float().log_softmax(-1), labels.clamp_min(0), mask  # -100 -> 0: gathered, then masked out


@register("Loss", direction="lower")
def token_loss(logits: torch.Tensor, labels: torch.Tensor,
               reference_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy -log p(y_j) per token."""
    mask = _answer_mask(logits, labels)
    return -token_logp(logits, labels), mask  # one log-softmax over the vocabulary: token_logp's


@register("KL", direction="lower", needs_reference=True)
def token_kl(logits: torch.Tensor, labels: torch.Tensor,
             reference_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(P_t ‖ p_s) per token, P_t = softmax(reference_logits), p_s = softmax(logits)."""
    if reference_logits is None:
        raise ValueError("KL needs reference_logits (the target's random-init tuned module)")
    if reference_logits.shape != logits.shape:
        raise ValueError(f"reference logits {tuple(reference_logits.shape)} != logits {tuple(logits.shape)}")
    logp, _, mask = _prepare(logits, labels)
    ref_logp = reference_logits.float().log_softmax(-1)
    values = F.kl_div(logp, ref_logp, reduction="none", log_target=True).sum(-1)  # Σ P_t (log P_t - log p_s)
    return values.masked_fill(~mask, 0.0), mask


@register("EL2N", direction="lower")
def token_el2n(logits: torch.Tensor, labels: torch.Tensor,
               reference_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Error L2 norm ‖softmax(logits) - onehot(y_j)‖₂ per token."""
    logp, safe, mask = _prepare(logits, labels)
    error = logp.exp() - F.one_hot(safe, logp.shape[-1]).float()
    return error.norm(dim=-1).masked_fill(~mask, 0.0), mask


@register("LogitsCos", direction="higher")
def token_logits_cos(logits: torch.Tensor, labels: torch.Tensor,
                     reference_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos(softmax(logits), onehot(y_j)) = p(y_j) / ‖p‖₂ per token (the one-hot vector has norm 1)."""
    logp, safe, mask = _prepare(logits, labels)
    p = logp.exp()
    values = p.gather(-1, safe.unsqueeze(-1)).squeeze(-1) / p.norm(dim=-1)
    return values.masked_fill(~mask, 0.0), mask


def pooled_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of ``values`` over the tokens where ``mask`` is True (all examples pooled)."""
    count = int(mask.sum())
    if count == 0:
        raise ValueError("no target tokens to average over")
    return float(values[mask].double().sum()) / count


class TokenMean:
    """Running pooled mean over the target tokens of several batches."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def add(self, values: torch.Tensor, mask: torch.Tensor) -> None:
        self.total += float(values[mask].double().sum())
        self.count += int(mask.sum())

    def value(self) -> float:
        if self.count == 0:
            raise ValueError("no target tokens to average over")
        return self.total / self.count


# --- answer-level metrics (LEEP, LogME) ---------------------------------------------------------------


@dataclass
class AnswerOutputs:
    """What the answer-level metrics see of one module on one target split, one row per example."""

    first_logp: torch.Tensor  # (n, V) log-distribution over the first answer token, float32
    features: torch.Tensor  # (n, d) the output layer's input at the first answer token
    labels: list[Hashable]  # the target label: the gold answer on a classification target, else its first token
    has_classes: bool  # whether the target is a classification task (models.examples.label_set)


@register("LEEP", direction="higher", kind="answer")
def answer_leep(outputs: AnswerOutputs) -> float:
    """LEEP of the first-answer-token distribution for the target's labels (label-agnostic)."""
    return estimators.leep(outputs.first_logp, outputs.labels)


@register("LogME", direction="higher", kind="answer")
def answer_logme(outputs: AnswerOutputs) -> float | None:
    """LogME of the first-answer-token features for the target's classes; None (unknown) without classes."""
    if not outputs.has_classes or len(set(outputs.labels)) < 2:
        return None
    return estimators.logme(outputs.features, outputs.labels)


# --- parameter-space metrics (Arrow, GradAlign): no forward pass per source ----------------------------------


@register("Arrow", direction="higher", kind="parameter", probe="inputs", methods=("lora",))
def parameter_arrow(probe: dict[str, torch.Tensor], updates: dict[str, estimators.Update]) -> float:
    """Mean |cos| of each LoRA update's top right singular vector with the target's inputs to its projection."""
    return estimators.arrow_alignment(probe, updates)


@register("GradAlign", direction="higher", kind="parameter", probe="gradient", methods=("lora", "ia3"))
def parameter_grad_align(probe: dict[str, torch.Tensor], updates: dict[str, estimators.Update]) -> float:
    """cos(-∇L_target, task vector) at the neutral module, in the method's linear update space."""
    return estimators.gradient_alignment(probe, updates)


# --- gradient-based metric ------------------------------------------------------------------------------


@register("GraNd", direction="lower", needs_grad=True)
def grad_norm(grads: Iterable[torch.Tensor]) -> float:
    """L2 norm of one example's gradient, taken over all the given tensors together."""
    return float(sum((g.double() ** 2).sum() for g in grads) ** 0.5)


def per_example_grad_norms(model: nn.Module, task: EncodedTask, pad_id: int,
                           groups: dict[str, list[str]]) -> dict[str, list[float]]:
    """‖∇_θ ℓ(x, y)‖₂ for each example of ``task`` and each group of delta parameter names.

    ℓ is the example's mean token cross-entropy with its first gold output (what the model's own loss
    computes for a batch of one). One forward/backward per example: a plain loop, so nothing depends on
    whether the adapters library's forward works under torch.func transforms.
    """
    params = dict(model.named_parameters())
    family = family_of(model)
    return modules_grad_norms(model, task, pad_id, groups, [params],
                              lambda batch: [family.answer_loss(model, batch)])[0]


def modules_grad_norms(model: nn.Module, task: EncodedTask, pad_id: int, groups: dict[str, list[str]],
                       modules: list[dict[str, nn.Parameter]],
                       losses: Callable[[dict[str, torch.Tensor]], list[torch.Tensor]]) -> list[dict[str, list[float]]]:
    """``per_example_grad_norms`` of several modules that one forward pass serves (models/group.py).

    ``modules[i]`` maps the canonical parameter names of ``groups`` to module i's parameters; ``losses(batch)``
    gives each module's mean token loss on a batch of one example. The modules share no parameter, so the
    gradient of the summed losses with respect to module i's parameters is module i's own gradient.
    """
    names = [n for members in groups.values() for n in members]
    for params in modules:
        missing = [n for n in names if n not in params or not params[n].requires_grad]
        if missing:
            raise ValueError(f"not trainable parameters of the model: {missing[:3]}")
    position = {n: i for i, n in enumerate(names)}
    device = modules[0][names[0]].device
    flat = [params[n] for params in modules for n in names]
    norms: list[dict[str, list[float]]] = [{g: [] for g in groups} for _ in modules]
    for ids, outputs in zip(task.inputs, task.outputs):
        batch = to_device(collate(model, [ids], [outputs[0]], pad_id), device)
        with torch.enable_grad():
            total = torch.stack(losses(batch)).sum()
            grads = torch.autograd.grad(total, flat, allow_unused=True)
        # A parameter the loss does not reach has a zero gradient, not a missing one.
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(flat, grads)]
        for i in range(len(modules)):
            mine = grads[i * len(names):(i + 1) * len(names)]
            for group, members in groups.items():
                norms[i][group].append(grad_norm(mine[position[n]] for n in members))
    return norms
