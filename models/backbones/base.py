"""What every backbone family answers, and the batching that all families share.

A family is one small subclass of ``BackboneFamily`` in its own file, registered in
``models/backbones/__init__.py``. It owns everything that differs between architectures: loading, how a
batch is laid out, which logits score which answer token, generation, the parameter-name pattern of its
layers, and the numbers of its config that a delta module depends on. The rest of the project asks the
family of its model and never names an architecture.

The contract that makes every metric family-blind: ``collate`` returns a batch whose ``labels`` are the answer
tokens alone, (rows, answer tokens), right-padded with ``IGNORE_INDEX``, and ``answer_logits`` returns logits
of shape (rows, answer tokens, vocabulary) where position j predicts ``labels[:, j]``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a function needs it: the registry loads without it
    import torch
    from torch import nn

IGNORE_INDEX = -100


class BackboneFamily:
    """An architecture family behind the registry. Subclasses set the class attributes and the methods."""

    name: str = ""
    model_types: tuple[str, ...] = ()  # config.json's model_type values this family loads
    # A delta parameter's layer: group "stack" and group "index" (the stack is named when the family has one).
    block_pattern: re.Pattern = re.compile(r"(?!)")
    stacks: Mapping[str, str] = {}  # stack name -> the fingerprint's layer-count key
    # Registered delta methods AdapterHub does not build on this family (every other one it does; all four are
    # measured to work on both families: tests/test_backbones.py), so a new method needs no line here.
    unsupported_methods: tuple[str, ...] = ()
    # Whether AdapterHub's Parallel composition (the library replicates the batch inside the model) works here;
    # where not, a group of modules sharing a batch gets one copy per module under BatchSplit (models/group.py).
    parallel_composition: bool = False
    # LoRA: the module name (its last path component, as PEFT's target_modules names it) -> the AdapterHub location
    # that reaches it (models/methods/lora.py). Measured by attaching each location (tests/test_backbones.py).
    lora_modules: Mapping[str, str] = {}

    def supports(self, method: str) -> bool:
        """Whether AdapterHub builds delta method ``method`` on this family."""
        return method not in self.unsupported_methods

    # -- loading --------------------------------------------------------------------------------------
    def model_class(self) -> Any:
        raise NotImplementedError

    def new_model(self, config: Any) -> Any:
        """A randomly initialised model of ``config`` (drawn from torch's generator)."""
        return self.model_class()(config)

    def prepare_tokenizer(self, tokenizer: Any) -> None:
        """Make ``tokenizer`` usable for batching (a pad token, for instance)."""

    def prepare_for(self, model: nn.Module, method: str) -> None:
        """Set ``model`` up for a delta module of ``method`` before it is added (nothing, unless a family needs it)."""

    def tiny_config(self, vocab_size: int) -> Any:
        """The embedded default's architecture (models/pretrain_default.py)."""
        raise NotImplementedError

    # -- config numbers -------------------------------------------------------------------------------
    def width(self, config: Any) -> int:
        raise NotImplementedError

    def ffn_width(self, config: Any) -> int:
        raise NotImplementedError

    def layer_counts(self, config: Any) -> dict[str, int]:
        """Layers per stack, under the fingerprint's keys."""
        raise NotImplementedError

    def fingerprint(self, config: Any) -> dict[str, int | str]:
        """The architecture's numbers a delta module depends on (the weights hash is added by models/delta.py)."""
        return {"d_model": self.width(config), **self.layer_counts(config), "vocab_size": int(config.vocab_size),
                "family": self.name}

    def block_of(self, name: str) -> tuple[str, int] | None:
        """(stack, layer index) of a parameter inside one of this family's layers, else None."""
        m = self.block_pattern.search(name)
        if m is None:
            return None
        return m.group("stack") if "stack" in m.groupdict() else next(iter(self.stacks)), int(m.group("index"))

    # -- batches ----------------------------------------------------------------------------------------
    def collate(self, inputs: list[list[int]], labels: list[list[int]] | None, pad_id: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward_kwargs(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """The keyword arguments of the model's forward that score ``batch["labels"]``."""
        raise NotImplementedError

    def align(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The forward's logits cut to those that predict ``batch["labels"]``."""
        return logits

    def answer_logits(self, model: nn.Module, batch: Mapping[str, torch.Tensor],
                      call: Callable[..., Any] | None = None) -> torch.Tensor:
        """Logits (rows, answer tokens, vocabulary) aligned with ``batch["labels"]``; ``call`` replaces the
        model's forward (a functional call with other parameters, for instance)."""
        out = (call or model)(**self.forward_kwargs(model, batch))
        return self.align(out.logits, batch)

    def answer_loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over the answer tokens of ``batch`` (what training minimises)."""
        import torch

        logits = self.answer_logits(model, batch)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 batch["labels"].reshape(-1), ignore_index=IGNORE_INDEX)

    # -- generation -------------------------------------------------------------------------------------
    def generate(self, model: nn.Module, batch: Mapping[str, torch.Tensor], tokenizer: Any, max_new_tokens: int,
                 num_beams: int) -> torch.Tensor:
        """The generated answer tokens of each row of ``batch`` (collated without labels)."""
        raise NotImplementedError

    def rank_scores(self, model: nn.Module, inputs: list[list[int]], label_ids: list[list[int]],
                    pad_id: int) -> torch.Tensor:
        """Summed log-likelihood of every label after every input, (inputs, labels), float32 on the CPU."""
        device = next(model.parameters()).device
        rows_in = [x for x in inputs for _ in label_ids]
        rows_out = [y for _ in inputs for y in label_ids]
        batch = {k: v.to(device) for k, v in self.collate(rows_in, rows_out, pad_id).items()}
        scores = token_logp(self.answer_logits(model, batch), batch["labels"]).sum(dim=-1)
        return scores.view(len(inputs), len(label_ids)).cpu()


def token_logp(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) per position in float32; 0 where the label is IGNORE_INDEX."""
    logp = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(labels == IGNORE_INDEX, 0.0)


def pad_rows(rows: list[list[int]], value: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` padded to one width with ``value`` (on the left when ``left``), and the mask of real tokens."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            cols = slice(width - len(r), width) if left else slice(0, len(r))
            ids[i, cols] = torch.tensor(r)
            mask[i, cols] = 1
    return ids, mask
