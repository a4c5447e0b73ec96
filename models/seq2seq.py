"""Tokenised batches, greedy/beam generation and task scoring shared by the trainer and the similarity code."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from dataloader.crossfit import Example
from dataloader.metrics import score

IGNORE_INDEX = -100


@dataclass
class EncodedTask:
    """A split tokenised once: input ids per example and the ids of each of its gold outputs."""

    examples: list[Example]
    inputs: list[list[int]]
    outputs: list[list[list[int]]]


def encode_examples(tokenizer, examples: list[Example], max_input_length: int,
                    max_output_length: int) -> EncodedTask:
    """Tokenise inputs and every gold output once (truncating), so training batches only pad."""
    inputs = tokenizer([ex.input for ex in examples], max_length=max_input_length, truncation=True).input_ids
    flat = [out for ex in examples for out in ex.outputs]
    flat_ids = tokenizer(flat, max_length=max_output_length, truncation=True).input_ids
    outputs, pos = [], 0
    for ex in examples:
        outputs.append(flat_ids[pos:pos + len(ex.outputs)])
        pos += len(ex.outputs)
    return EncodedTask(examples, inputs, outputs)


def collate(inputs: list[list[int]], labels: list[list[int]] | None, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad inputs (with an attention mask) and labels (with IGNORE_INDEX)."""
    width = max(len(x) for x in inputs)
    input_ids = torch.full((len(inputs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(inputs), width), dtype=torch.long)
    for i, ids in enumerate(inputs):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention_mask[i, :len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if labels is not None:
        out_width = max(len(y) for y in labels)
        label_ids = torch.full((len(labels), out_width), IGNORE_INDEX, dtype=torch.long)
        for i, ids in enumerate(labels):
            label_ids[i, :len(ids)] = torch.tensor(ids)
        batch["labels"] = label_ids
    return batch


def training_batches(task: EncodedTask, batch_size: int, rng: random.Random,
                     pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled epochs; each epoch draws one of an example's gold outputs at random."""
    order = list(range(len(task.inputs)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            labels = [rng.choice(task.outputs[i]) for i in idx]
            yield collate([task.inputs[i] for i in idx], labels, pad_id)


def first_output_batches(task: EncodedTask, batch_size: int, pad_id: int) -> Iterator[tuple[list[int], dict]]:
    """Deterministic batches with each example's first gold output, sorted by input length (less padding)."""
    order = sorted(range(len(task.inputs)), key=lambda i: len(task.inputs[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield idx, collate([task.inputs[i] for i in idx], [task.outputs[i][0] for i in idx], pad_id)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}


@torch.no_grad()
def generate(model, tokenizer, task: EncodedTask, batch_size: int, max_new_tokens: int, num_beams: int = 1,
             device: torch.device | None = None, desc: str | None = None) -> list[str]:
    """Predictions in the examples' order; batches are sorted by input length to waste less padding."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    predictions: list[str] = [""] * len(task.inputs)
    order = sorted(range(len(task.inputs)), key=lambda i: len(task.inputs[i]))
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, leave=False, disable=desc is None):
        idx = order[start:start + batch_size]
        batch = to_device(collate([task.inputs[i] for i in idx], None, tokenizer.pad_token_id), device)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
        for i, text in zip(idx, tokenizer.batch_decode(out, skip_special_tokens=True)):
            predictions[i] = text.strip()
    model.train(was_training)
    return predictions


def evaluate(model, tokenizer, task: EncodedTask, metric: str, batch_size: int, max_new_tokens: int,
             num_beams: int = 1, desc: str | None = None) -> tuple[float, list[str]]:
    """Task score by generation and the task's metric; returns (score, predictions)."""
    predictions = generate(model, tokenizer, task, batch_size, max_new_tokens, num_beams, desc=desc)
    return score(metric, predictions, [list(ex.outputs) for ex in task.examples]), predictions
