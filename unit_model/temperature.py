"""``--tem auto``: each target's softmax temperature chosen on its few-shot dev split, never on test.

For every target whose weights come from scores, each T of ``TEMPERATURE_GRID`` gives weights, the weights
give a fused module, and the fused module is scored zero-shot (no tuning) on the target's dev split with
the task's metric. The T with the best dev score is kept; a tie goes to the larger T, whose weights are
closer to uniform (the choice that trusts the scores least). Only the dev split is read: the test split
of a target is never opened here, so it cannot leak into the choice.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from unit_model.config import FusionConfig
from unit_model.weightings import Plan, group_softmax_weights, keep_top_k

AUTO = "auto"
TEMPERATURE_GRID = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)

FusePlan = Callable[[Plan, dict[str, dict[str, float]]], dict[str, torch.Tensor]]


def parse_temperature(text: str | float) -> float | str:
    """``auto`` or a positive finite number (the type of every script's ``--tem``)."""
    if isinstance(text, str) and text.strip().lower() == AUTO:
        return AUTO
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or auto, found {text!r}") from None


class DevScorer:
    """The zero-shot dev score of a fused module on its target; the backbone is loaded once for all targets."""

    def __init__(self, config: FusionConfig, delta_meta: dict) -> None:
        from dataloader.crossfit import load_task
        from dataloader.metrics import metric_for_task
        from models.delta import DeltaConfig
        from models.trainer import TaskData, TrainConfig, Trainer

        self.config = config
        cfg = DeltaConfig.from_checkpoint_meta(delta_meta)
        from models.backbone import DEFAULT_MODEL_DIR

        train = TrainConfig(model=config.model or str(DEFAULT_MODEL_DIR), device=config.device, bf16=config.bf16,
                            k=config.k, data_seed=config.data_seed, max_input_length=config.max_input_length,
                            max_output_length=config.max_output_length, predict_batch_size=100)
        self.trainer = Trainer(train, cfg)
        self.tasks: dict[str, TaskData] = {}
        for t in config.target_list:  # every dev split is read (and checked) before any scoring
            dev = load_task(config.task_dir, t, config.k, config.data_seed, ["dev"])["dev"]
            metric = metric_for_task(t, config.task_dir)
            decoding = train.plan_decoding(self.trainer.tokenizer, metric, dev)
            self.tasks[t] = TaskData(t, metric, {"dev": self.trainer.encode(dev)}, decoding)

    def __call__(self, target: str, tensors: dict[str, torch.Tensor]) -> float:
        from models.delta import load_delta_state

        load_delta_state(self.trainer.model, tensors, f"fused module for {target}")
        score, _ = self.trainer.evaluate(self.tasks[target], "dev", desc=None)
        return float(score)


def choose_temperatures(plans: list[Plan], weight_norm: str, fuse_plan: FusePlan,
                        score: Callable[[str, dict[str, torch.Tensor]], float],
                        grid: tuple[float, ...] = TEMPERATURE_GRID, top_k: int = 0) -> None:
    """Set each scored plan's weights, ``temperature`` and ``temperature_dev`` from the grid search (each T's
    weights cut to the ``top_k`` heaviest sources, as the fusion will)."""
    scored = [p for p in plans if p.scores is not None]
    bar = tqdm(total=len(scored) * len(grid), desc="--tem auto (dev split)", leave=False,
               disable=len(scored) * len(grid) < 10)
    for plan in scored:
        dev: dict[float, float] = {}
        for temperature in grid:
            weights = keep_top_k(group_softmax_weights(plan.scores, plan.direction, temperature, plan.target,
                                                       weight_norm), top_k)
            dev[temperature] = score(plan.target, fuse_plan(plan, weights))
            bar.update()
        best = max(grid, key=lambda t: (dev[t], t))
        plan.weights = keep_top_k(group_softmax_weights(plan.scores, plan.direction, best, plan.target, weight_norm),
                                  top_k)
        plan.temperature, plan.temperature_dev = best, dev
    bar.close()
