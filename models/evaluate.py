"""The one evaluator: a split's predictions (generation or rank classification) and the task's metric.

The trainer's validation and test, dev-all, the study's single-source scores and importance all score through
``evaluate`` (the trainer, which shards a split across processes, through ``predict_split`` and
``score_predictions``), so decoding and the autocast policy are the same everywhere: bf16 autocast only when
asked for and only on CUDA; on the CPU everything runs in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dataloader.crossfit import Example
from dataloader.metrics import score
from models.examples import EncodedTask, generate_channels, label_set, predict
from models.group import active, chunks, load_slot_state


@dataclass
class Decoding:
    """How a task is predicted at validation and test (see ``plan_decoding``)."""

    max_new_tokens: int
    rank_labels: list[str] | None = None  # rank classification over these labels instead of generation
    label_budget: bool = False  # max_new_tokens is the longest label + EOS

    def describe(self) -> str:
        if self.rank_labels:
            shown = ", ".join(self.rank_labels[:5]) + (", ..." if len(self.rank_labels) > 5 else "")
            return f"rank classification over {len(self.rank_labels)} labels ({shown})"
        if self.label_budget:
            return f"generation, max_new_tokens {self.max_new_tokens} (label task: the longest label + EOS)"
        return f"generation, max_new_tokens {self.max_new_tokens}"


def plan_decoding(tokenizer, metric: str, examples: list[Example], max_output_length: int,
                  max_new_tokens: int | str = "auto", num_beams: int = 1,
                  rank_classification: bool = False) -> Decoding:
    """Budget and method of prediction for one task, from its label set (train and dev examples).

    A label task generates at most its longest label + EOS: a row that produces a label (in the label's
    own tokenisation) ends within that budget and keeps its prediction; a row that would go on is cut,
    and it was not going to be a label (see models.examples.generate). Beam search keeps the full budget,
    since its choice among beams can depend on the maximum length.
    """
    labels = label_set(examples, metric)
    if rank_classification and labels:
        return Decoding(max_output_length, rank_labels=labels)
    if max_new_tokens != "auto":
        return Decoding(int(max_new_tokens))
    if not labels or num_beams > 1:
        return Decoding(max_output_length)
    longest = max(len(tokenizer(label, add_special_tokens=False).input_ids) for label in labels) + 1  # + EOS
    if longest >= max_output_length:
        return Decoding(max_output_length)
    return Decoding(longest, label_budget=True)


def autocast(device: torch.device, bf16: bool) -> torch.autocast:
    """The one autocast policy: bf16 when asked for and ``device`` is CUDA, else none."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")


def predict_split(model, tokenizer, task: EncodedTask, decoding: Decoding, batch_size: int, num_beams: int = 1,
                  bf16: bool = False, desc: str | None = None) -> list[str]:
    with autocast(next(model.parameters()).device, bf16):
        return predict(model, tokenizer, task, batch_size, decoding.max_new_tokens, num_beams, desc=desc,
                       labels=decoding.rank_labels)


def predict_group(model, tokenizer, task: EncodedTask, decoding: Decoding, batch_size: int, slots: list[str],
                  num_beams: int = 1, bf16: bool = False, desc: str | None = None) -> list[list[str]]:
    """Each slot's predictions on one split (models/group.py), slot 0 active again afterwards.

    Greedy generation runs every slot in one ``Parallel`` generate per batch, on the batches a single module
    gets. Beam search and rank classification predict one slot at a time: the library's Parallel generate
    is not checked with beams here, and rank classification calls the encoder on its own.
    """
    if len(slots) > 1 and not decoding.rank_labels and num_beams == 1:
        with autocast(next(model.parameters()).device, bf16):
            return generate_channels(model, tokenizer, task, batch_size, decoding.max_new_tokens, desc=desc,
                                     slots=slots)
    predictions = []
    for slot in slots:
        with active(model, [slot]):
            predictions.append(predict_split(model, tokenizer, task, decoding, batch_size, num_beams, bf16, desc))
    return predictions


def score_predictions(metric: str, predictions: list[str], task: EncodedTask) -> float:
    return score(metric, predictions, [list(ex.outputs) for ex in task.examples])


def evaluate(model, tokenizer, task: EncodedTask, metric: str, batch_size: int, max_new_tokens: int,
             num_beams: int = 1, desc: str | None = None, labels: list[str] | None = None,
             bf16: bool = False) -> tuple[float, list[str]]:
    """Task score of the predictions (rank classification over ``labels`` when given, else generation with at
    most ``max_new_tokens`` tokens) and the predictions."""
    predictions = predict_split(model, tokenizer, task, Decoding(max_new_tokens, rank_labels=labels), batch_size,
                                num_beams, bf16, desc)
    return score_predictions(metric, predictions, task), predictions


def decoding_for(config: Any, tokenizer, metric: str, examples: list) -> Decoding:
    """How a task with these train and dev ``examples`` is predicted under a run's settings (a ``TrainConfig``)."""
    return plan_decoding(tokenizer, metric, examples, config.max_output_length, config.max_new_tokens,
                         config.num_beams, config.rank_classification)


# A module to score: its key in the result, a function that reads its tensors, and its folder (for messages).
ScoredModule = tuple[Hashable, Callable[[], dict[str, torch.Tensor]], str]


def score_modules(model, tokenizer, task: EncodedTask, metric: str, modules: Sequence[ScoredModule],
                  slots: list[str], decoding: Decoding, batch_size: int, num_beams: int = 1, bf16: bool = False,
                  done: Callable[[int], Any] | None = None) -> dict[Hashable, float]:
    """Each module's score on ``task`` (generation and the task's metric), ``len(slots)`` modules per generation
    (``predict_group``): what dev-all scores its sources and tuned modules with, and the study's pairs stage its
    single-source transfers. A module's tensors are read when its group runs; ``done(n)`` follows progress."""
    scores: dict[Hashable, float] = {}
    for group in chunks(list(modules), len(slots)):
        for slot, (_, tensors, folder) in zip(slots, group):
            load_slot_state(model, slot, tensors(), folder)
        predictions = predict_group(model, tokenizer, task, decoding, batch_size, slots[:len(group)], num_beams, bf16)
        for (key, _, _), prediction in zip(group, predictions):
            scores[key] = score_predictions(metric, prediction, task)
        if done is not None:
            done(len(group))
    return scores
