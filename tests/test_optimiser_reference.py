"""The trainer's optimisation against an independent, hand-written loop.

``tests/test_grouped.py`` compares a module trained in a group with the same module trained alone: both go through
the trainer's one AdamW and LambdaLR set-up, so a mistake they share would pass. Here three steps are recomputed
by hand: Adam's moments and bias correction, decoupled weight decay, the warm-up/decay factor and gradient
clipping written out from their definitions (Loshchilov & Hutter 2019; the trainer's schedule: linear warm-up to
the learning rate, then linear decay to 0 at the last step), on the batches the trainer draws.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from models.backbone import load_backbone
from models.delta import DeltaConfig, attach_delta, delta_params, load_delta_state
from models.examples import collate, training_examples
from models.trainer import Run
from tests.test_grouped import make_trainer, perturbed, quiet_log, task_data

STEPS, WARMUP, BSZ = 3, 1, 4
BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW's defaults, which the trainer uses


def schedule(step: int) -> float:
    """The factor of the learning rate at optimiser step ``step`` (0-based), by hand for 3 steps, 1 of warm-up:
    warm-up reaches 1 at step 0; then (3 - step) / (3 - 1) decays linearly: 1, then 0.5."""
    return [1.0, 1.0, 0.5][step]


def reference_run(backbone, method: str, start: dict[str, torch.Tensor], batches, lr: float, weight_decay: float,
                  max_grad_norm: float, pad_id: int) -> dict[str, torch.Tensor]:
    model, _ = load_backbone(backbone)
    torch.manual_seed(0)
    attach_delta(model, DeltaConfig(method, lora_r=2, prefix_length=3, prefix_mlp=8, adapter_size=4))
    load_delta_state(model, start, "start")
    params = delta_params(model)
    for p in params.values():
        p.requires_grad_(True)
    moments = {n: (torch.zeros_like(p), torch.zeros_like(p)) for n, p in params.items()}
    model.train()
    for step, (inputs, labels) in enumerate(batches):
        loss = model(**collate(model, inputs, labels, pad_id)).loss
        grads = torch.autograd.grad(loss, list(params.values()))
        norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
        clip = min(1.0, max_grad_norm / (norm + 1e-6))  # clip_grad_norm_'s definition
        rate = lr * schedule(step)
        t = step + 1
        with torch.no_grad():
            for (name, p), g in zip(params.items(), grads):
                g = g * clip
                m, v = moments[name]
                m.mul_(BETAS[0]).add_((1 - BETAS[0]) * g)
                v.mul_(BETAS[1]).add_((1 - BETAS[1]) * g * g)
                m_hat = m / (1 - BETAS[0] ** t)
                v_hat = v / (1 - BETAS[1] ** t)
                p.mul_(1 - rate * weight_decay)  # decoupled weight decay, before the Adam step
                p.sub_(rate * m_hat / (v_hat.sqrt() + EPS))
    model.eval()
    return {n: p.detach().clone() for n, p in params.items()}


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_three_steps_equal_a_hand_written_adamw_with_warmup_decay_and_clipping(method, tiny_backbone_dir):
    weight_decay, max_grad_norm = 0.1, 0.05  # a small norm: the clipping is active at every step
    trainer = make_trainer(tiny_backbone_dir, method, train_iters=STEPS, warmup_steps=WARMUP, valid_interval=STEPS,
                           weight_decay=weight_decay, max_grad_norm=max_grad_norm, save_last=True, seed=3)
    task = task_data(trainer, "sent_review")
    starts = [perturbed(trainer.init_state, i) for i in range(2)]
    runs = [Run(task, lr, BSZ, start, f"start {i}", None, quiet_log()) for i, (lr, start) in
            enumerate(zip((3e-3, 1e-2), starts))]
    results = trainer.train_group(runs)  # two runs in one group, as the study trains them
    # the batches each run draws: the trainer's sampler, seeded by the training seed (not under test here)
    draws = training_examples(task.splits["train"], BSZ, random.Random(3))
    batches = [next(draws) for _ in range(STEPS)]
    pad_id = trainer.tokenizer.pad_token_id
    for run, result in zip(runs, results):
        expected = reference_run(tiny_backbone_dir, method, run.init_state, batches, run.lr, weight_decay,
                                 max_grad_norm, pad_id)
        assert result.best_step == STEPS
        assert result.state.keys() == expected.keys()
        moved = max(float((expected[n] - run.init_state[n]).abs().max()) for n in expected)
        assert moved > 1e-4  # the three steps moved the module: the comparison is not of untouched starts
        for name in expected:
            assert torch.allclose(result.state[name], expected[name], rtol=1e-5, atol=1e-7), name

