"""A fused module tried on its target's few-shot data, without tuning: the backbone loaded once, one split read.

``--tem auto`` scores each candidate on the dev split with the task's metric; learned weights minimise the
mean cross-entropy on the train split (``differentiable_loss`` for a gradient search: the delta tensors are
passed to the forward, not copied into the model, so their graph reaches the fusion weights). Each reads only
its own split: nothing here opens a target's test file.
"""

from __future__ import annotations

import torch

from unit_model.config import FusionConfig


class OnTarget:
    """The backbone with the sources' delta module attached, and one few-shot split of every target."""

    def __init__(self, config: FusionConfig, delta_meta: dict, split: str) -> None:
        from dataloader.crossfit import load_task
        from dataloader.metrics import metric_for_task
        from models.delta import DeltaConfig
        from models.evaluate import decoding_for
        from models.settings import DEFAULT_MODEL_DIR, TrainConfig
        from models.trainer import TaskData, Trainer

        self.split = split
        train = TrainConfig(model=config.model or str(DEFAULT_MODEL_DIR), device=config.device, bf16=config.bf16,
                            k=config.k, data_seed=config.data_seed, max_input_length=config.max_input_length,
                            max_output_length=config.max_output_length, predict_batch_size=100)
        self.trainer = Trainer(train, DeltaConfig.from_checkpoint_meta(delta_meta))
        self.tasks: dict[str, TaskData] = {}
        for t in config.target_list:  # every target's split is read (and checked) before anything is scored
            examples = load_task(config.task_dir, t, config.k, config.data_seed, [split])[split]
            metric = metric_for_task(t, config.task_dir)
            decoding = decoding_for(train, self.trainer.tokenizer, metric, examples)
            self.tasks[t] = TaskData(t, metric, {split: self.trainer.encode(examples)}, decoding)

    def load(self, target: str, tensors: dict[str, torch.Tensor]) -> None:
        from models.delta import load_delta_state

        load_delta_state(self.trainer.model, tensors, f"fused module for {target}")

    def score(self, target: str, tensors: dict[str, torch.Tensor]) -> float:
        """The task's metric on the split, by the trainer's own decoding (higher is better)."""
        self.load(target, tensors)
        value, _ = self.trainer.evaluate(self.tasks[target], self.split, desc=None)
        return float(value)

    def loss(self, target: str, tensors: dict[str, torch.Tensor], batch_size: int = 32) -> float:
        """Mean cross-entropy per target token of each example's first gold output on the split."""
        self.load(target, tensors)  # checks every name and shape against the model's module
        with torch.no_grad():
            return float(self._mean_token_loss(target, None, batch_size))

    def differentiable_loss(self, target: str, tensors: dict[str, torch.Tensor], batch_size: int = 32) -> torch.Tensor:
        """``loss`` as a tensor with its graph: the model runs with ``tensors`` in place of its delta parameters
        (any shapes its layers accept, e.g. stacked LoRA factors); dropout off, as in ``loss``."""
        on_device = {k: v.to(self.trainer.device) for k, v in tensors.items()}
        return self._mean_token_loss(target, on_device, batch_size)

    def _mean_token_loss(self, target: str, override: dict[str, torch.Tensor] | None, batch_size: int) -> torch.Tensor:
        """The zero-shot Loss metric's per-token cross-entropy, pooled over the split's target tokens in float64;
        ``override`` replaces the model's delta parameters for this forward (None: the model as loaded)."""
        from get_similarity.metrics import token_loss
        from models.evaluate import autocast
        from models.examples import first_output_batches, to_device

        model, device = self.trainer.model, self.trainer.device
        model.eval()
        total, count = None, 0
        pad = self.trainer.tokenizer.pad_token_id
        family = self.trainer.family
        for _, batch in first_output_batches(model, self.tasks[target].splits[self.split], batch_size, pad):
            batch = to_device(batch, device)
            with autocast(device, self.trainer.config.bf16):
                if override is None:
                    logits = family.answer_logits(model, batch)
                else:
                    logits = family.answer_logits(model, batch, call=lambda **kwargs: torch.func.functional_call(
                        model, override, args=(), kwargs=kwargs, strict=False))
            values, mask = token_loss(logits, batch["labels"])
            part = values[mask].double().sum()
            total = part if total is None else total + part
            count += int(mask.sum())
        if not count:
            raise ValueError("no target tokens to average over")
        return total / count
