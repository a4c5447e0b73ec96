"""Tokenised examples, their batches, and predictions from them: greedy/beam generation and rank classification.

Family-blind: how a batch is laid out and which logits score which answer token is the backbone family's
(models/backbones/). Shared by the trainer and the similarity code.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from dataloader.crossfit import Example
from models.backbones import family_of
from utils.progress import progress_bar

# Metrics whose gold outputs are class names: only these tasks can have a fixed label set.
CLASSIFICATION_METRICS = ("ACC", "Classification-F1", "Matthew-Correlation")
MAX_LABELS = 32


@dataclass
class EncodedTask:
    """A split tokenised once: input ids per example and the ids of each of its gold outputs."""

    examples: list[Example]
    inputs: list[list[int]]
    outputs: list[list[list[int]]]

    def subset(self, indices: Sequence[int]) -> EncodedTask:
        """The examples at ``indices``, in that order (a shard of a split, for instance)."""
        return EncodedTask([self.examples[i] for i in indices], [self.inputs[i] for i in indices],
                           [self.outputs[i] for i in indices])


def encode_examples(tokenizer, examples: list[Example], max_input_length: int,
                    max_output_length: int) -> EncodedTask:
    """Tokenise inputs and every gold output once (truncating), so training batches only pad."""
    inputs = tokenizer([ex.input for ex in examples], max_length=max_input_length, truncation=True).input_ids
    flat_ids = encode_answers(tokenizer, [out for ex in examples for out in ex.outputs], max_output_length)
    outputs, pos = [], 0
    for ex in examples:
        outputs.append(flat_ids[pos:pos + len(ex.outputs)])
        pos += len(ex.outputs)
    return EncodedTask(examples, inputs, outputs)


def encode_answers(tokenizer, texts: list[str], max_length: int | None = None) -> list[list[int]]:
    """Each answer's tokens and then EOS, at most ``max_length`` in all: what T5's tokenizer makes of it, and what
    a decoder-only model must learn to stop (Llama's tokenizer would put BOS first and no EOS)."""
    pieces = tokenizer(list(texts), add_special_tokens=False).input_ids
    keep = None if max_length is None else max(0, max_length - 1)
    return [ids[:keep] + [tokenizer.eos_token_id] for ids in pieces]


def longest_example(tasks: Iterable[EncodedTask]) -> int:
    """Tokens of the longest input plus the longest output over ``tasks``: what one row of a batch can cost."""
    tasks = list(tasks)
    inputs = max((len(x) for t in tasks for x in t.inputs), default=1)
    outputs = max((len(y) for t in tasks for ys in t.outputs for y in ys), default=1)
    return inputs + outputs


def collate(model, inputs: list[list[int]], labels: list[list[int]] | None, pad_id: int) -> dict[str, torch.Tensor]:
    """``model``'s family's batch: ``labels`` (the answers alone, IGNORE_INDEX-padded) beside its inputs."""
    return family_of(model).collate(inputs, labels, pad_id)


def training_examples(task: EncodedTask, batch_size: int,
                      rng: random.Random) -> Iterator[tuple[list[list[int]], list[list[int]]]]:
    """Endless shuffled epochs of (input ids, label ids) lists; each epoch draws one gold output at random.

    Uncollated, so that data-parallel ranks can draw the same global batch and each collate its share.
    """
    order = list(range(len(task.inputs)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            labels = [rng.choice(task.outputs[i]) for i in idx]
            yield [task.inputs[i] for i in idx], labels


def training_batches(model, task: EncodedTask, batch_size: int, rng: random.Random,
                     pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled epochs of collated batches (same draws as ``training_examples``)."""
    for inputs, labels in training_examples(task, batch_size, rng):
        yield collate(model, inputs, labels, pad_id)


def first_output_batches(model, task: EncodedTask, batch_size: int,
                         pad_id: int) -> Iterator[tuple[list[int], dict]]:
    """Deterministic batches with each example's first gold output, sorted by input length (less padding)."""
    order = sorted(range(len(task.inputs)), key=lambda i: len(task.inputs[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield idx, collate(model, [task.inputs[i] for i in idx], [task.outputs[i][0] for i in idx], pad_id)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move a CPU batch to ``device``; on CUDA through pinned memory, so the copy is truly asynchronous.

    A non_blocking copy from pageable memory is staged synchronously by the driver; from pinned memory
    it overlaps with queued kernels and the host goes on preparing the next batch. The caching host
    allocator keeps each pinned buffer alive until its copy has finished.
    """
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def label_set(examples: Sequence[Example], metric: str | None = None) -> list[str] | None:
    """The task's fixed label set (sorted), or None when its outputs are free text.

    Pass a task's train and dev examples. The rule: the metric (when given) is a classification metric
    (CLASSIFICATION_METRICS), every example has exactly one gold output, there are at most MAX_LABELS
    distinct outputs, and each appears twice on average (2 * labels <= examples). The last condition
    keeps out tasks scored by ACC whose answers are free text (multiple-choice QA answered with the
    option's text), where almost every output is distinct.
    """
    if metric is not None and metric not in CLASSIFICATION_METRICS:
        return None
    if not examples or any(len(ex.outputs) != 1 for ex in examples):
        return None
    labels = sorted({ex.outputs[0] for ex in examples})
    if len(labels) > MAX_LABELS or 2 * len(labels) > len(examples):
        return None
    return labels


@torch.no_grad()
def generate(model, tokenizer, task: EncodedTask, batch_size: int, max_new_tokens: int, num_beams: int = 1,
             device: torch.device | None = None, desc: str | None = None,
             sort_by_length: bool = True) -> list[str]:
    """Predictions in the examples' order (``generate_channels`` with one module)."""
    return generate_channels(model, tokenizer, task, batch_size, max_new_tokens, num_beams, device, desc,
                             sort_by_length)[0]


@torch.no_grad()
def generate_channels(model, tokenizer, task: EncodedTask, batch_size: int, max_new_tokens: int,
                      num_beams: int = 1, device: torch.device | None = None, desc: str | None = None,
                      sort_by_length: bool = True, slots: Sequence[str] | None = None) -> list[list[str]]:
    """Each slot's predictions in the examples' order (one list: the active module's, when ``slots`` is None).

    Several ``slots`` (models/group.py) generate in one pass per batch, and rows g*B..(g+1)*B-1 of the output are
    slot g's. A family whose library generates under ``Parallel`` (T5: the library replicates each batch inside
    the model) gets that; otherwise each slot takes its own copy of the batch under ``BatchSplit``
    (``models.group.shared_batch``). Greedy rows do not interact, so a slot's rows are what it generates alone on
    the same batches.

    ``sort_by_length`` batches examples sorted by input length, which wastes less padding (False: file
    order, for comparison).

    What a shorter ``max_new_tokens`` changes (greedy decoding): the first steps of a batch do not depend
    on the budget, and generation already stops once every row has emitted EOS. So a row that ends
    within the budget gets exactly the prediction of any larger budget, and a row that would go on is cut
    to a prefix of its longer prediction. The time saved is the steps a batch would spend waiting for
    its longest row: for a label task with a budget of the longest label plus EOS, only rows that would
    not have produced a label are cut.
    """
    from models.group import active, shared_batch

    device = device or next(model.parameters()).device
    family = family_of(model)
    channels = len(slots) if slots else 1
    was_training = model.training
    model.eval()
    predictions: list[list[str]] = [[""] * len(task.inputs) for _ in range(channels)]
    order = list(range(len(task.inputs)))
    if sort_by_length:
        order.sort(key=lambda i: len(task.inputs[i]))
    starts = range(0, len(order), batch_size)
    with active(model, slots) if slots else nullcontext():  # slot 0 alone again afterwards
        for start in progress_bar(starts, desc=desc, leave=False, disable=desc is None):
            idx = order[start:start + batch_size]
            batch = to_device(collate(model, [task.inputs[i] for i in idx], None, tokenizer.pad_token_id), device)
            out = family.generate(model, shared_batch(model, slots, batch) if slots else batch, tokenizer,
                                  max_new_tokens, num_beams)
            if out.shape[0] != channels * len(idx):
                raise RuntimeError(f"generate returned {out.shape[0]} rows for {len(idx)} inputs x {channels} modules")
            texts = tokenizer.batch_decode(out, skip_special_tokens=True)
            for g in range(channels):
                for i, text in zip(idx, texts[g * len(idx):(g + 1) * len(idx)]):
                    predictions[g][i] = text.strip()
    model.train(was_training)
    return predictions


@torch.no_grad()
def rank_scores(model, tokenizer, task: EncodedTask, labels: list[str], batch_size: int,
                device: torch.device | None = None) -> torch.Tensor:
    """Summed log-likelihood of each label's tokens (EOS included) per example, teacher-forced.

    Returns a float32 CPU tensor (examples, labels). A batch holds about ``batch_size`` (example, label) rows;
    the family scores them (T5 runs its encoder once per example).
    """
    if not labels:
        raise ValueError("rank classification needs at least one label")
    device = device or next(model.parameters()).device
    family = family_of(model)
    was_training = model.training
    model.eval()
    label_ids = encode_answers(tokenizer, labels)
    example_bsz = max(1, batch_size // len(labels))
    scores = torch.empty((len(task.inputs), len(labels)), dtype=torch.float32)
    order = sorted(range(len(task.inputs)), key=lambda i: len(task.inputs[i]))
    for start in range(0, len(order), example_bsz):
        idx = order[start:start + example_bsz]
        scores[idx] = family.rank_scores(model, [task.inputs[i] for i in idx], label_ids, tokenizer.pad_token_id)
    model.train(was_training)
    return scores


def rank_classify(model, tokenizer, task: EncodedTask, labels: list[str], batch_size: int,
                  device: torch.device | None = None) -> list[str]:
    """The label with the highest summed token log-likelihood per example (ties: the first label)."""
    scores = rank_scores(model, tokenizer, task, labels, batch_size, device)
    return [labels[j] for j in scores.argmax(dim=1).tolist()]


def predict(model, tokenizer, task: EncodedTask, batch_size: int, max_new_tokens: int, num_beams: int = 1,
            desc: str | None = None, labels: list[str] | None = None) -> list[str]:
    """Rank classification over ``labels`` when given, else generation."""
    if labels:
        return rank_classify(model, tokenizer, task, labels, batch_size)
    return generate(model, tokenizer, task, batch_size, max_new_tokens, num_beams, desc=desc)
