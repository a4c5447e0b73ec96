"""Decoder-only backbones of the Llama family (Llama, Mistral): ``AutoModelForCausalLM``.

One sequence per example: the prompt (the tokenizer's encoding of the input, with whatever it adds: T5-style
``</s>`` after it, or Llama's ``<bos>`` before it) and then the answer, which ends with EOS. Prompts are padded
on the left and answers on the right, so every row's answer starts at one column: the logits that predict
answer token j sit at that column + j - 1 for every row, and one slice aligns them with the labels. Position
ids count real tokens only, as generation counts them, so a left-padded row computes what it computes alone.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from models.backbones.base import IGNORE_INDEX, BackboneFamily, pad_rows

if TYPE_CHECKING:
    import torch
    from torch import nn


class Causal(BackboneFamily):
    name = "causal"
    model_types = ("llama", "mistral")  # AdapterHub 1.3.0 builds every method on these natively
    block_pattern = re.compile(r"(?:^|\.)layers\.(?P<index>\d+)\.")
    stacks = {"decoder": "num_decoder_layers"}  # one stack: granularity "block" is the whole decoder
    # Not Parallel: the library replicates hidden states but not the rotary position embeddings of per-row
    # position ids (a shape error), nor generate()'s own rows.
    parallel_composition = False
    # As AdapterHub 1.3.0 wires Llama: intermediate_lora reaches down_proj and output_lora up_proj; nothing reaches
    # o_proj or gate_proj.
    lora_modules = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "down_proj": "intermediate", "up_proj": "output"}

    def model_class(self) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def new_model(self, config: Any) -> Any:
        return self.model_class().from_config(config)

    def prepare_tokenizer(self, tokenizer: Any) -> None:
        if tokenizer.pad_token_id is None:  # Llama's tokenizers have none; pads are masked, so EOS serves
            tokenizer.pad_token = tokenizer.eos_token

    def prepare_for(self, model: nn.Module, method: str) -> None:
        # AdapterHub 1.3.0 marks its prefix positions in the attention mask as if the mask were additive; under
        # transformers' SDPA attention the mask of a padded batch is boolean, so the prefix is masked out and the
        # module does nothing (tests/test_backbones.py). Eager attention takes the additive mask it expects.
        if method == "prefix":
            model.set_attn_implementation("eager")

    def tiny_config(self, vocab_size: int) -> Any:
        """About the T5 default's size (2.4M parameters): 8 layers of width 128, rotary positions
        (the embedded causal default, models/default-causal)."""
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=512, num_hidden_layers=8,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                           tie_word_embeddings=False, attention_dropout=0.0, pad_token_id=0, bos_token_id=1,
                           eos_token_id=1)

    def width(self, config: Any) -> int:
        return int(config.hidden_size)

    def ffn_width(self, config: Any) -> int:
        return int(config.intermediate_size)

    def layer_counts(self, config: Any) -> dict[str, int]:
        return {"num_decoder_layers": int(config.num_hidden_layers)}

    def collate(self, inputs: list[list[int]], labels: list[list[int]] | None, pad_id: int) -> dict[str, torch.Tensor]:
        """Left-padded prompts, then (with ``labels``) right-padded answers; ``labels`` are the answers alone."""
        import torch

        prompt_ids, prompt_mask = pad_rows(inputs, pad_id, left=True)
        if labels is None:
            input_ids, attention_mask = prompt_ids, prompt_mask
        else:
            answer_ids, answer_mask = pad_rows(labels, pad_id)
            input_ids = torch.cat([prompt_ids, answer_ids], dim=1)
            attention_mask = torch.cat([prompt_mask, answer_mask], dim=1)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0)}
        if labels is not None:
            batch["labels"] = answer_ids.masked_fill(answer_mask == 0, IGNORE_INDEX)
        return batch

    def forward_kwargs(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        # Only the logits that predict answer tokens: the last (answer width + 1) positions, less the last one.
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "position_ids": batch["position_ids"], "logits_to_keep": batch["labels"].shape[1] + 1,
                "use_cache": False}

    def align(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        width = batch["labels"].shape[1]
        return logits[:, -width - 1:-1]

    def generate(self, model: nn.Module, batch: Mapping[str, torch.Tensor], tokenizer: Any, max_new_tokens: int,
                 num_beams: int) -> torch.Tensor:
        # generate() derives the same position ids from the mask; what follows the prompt is the answer. Without
        # the key-value cache: under AdapterHub 1.3.0 a LoRA, (IA)³ or prefix module of a Llama-family model
        # generates other tokens with the cache than its own forward pass predicts (the first token agrees, the
        # next ones do not; tests/test_backbones.py), so every step recomputes the whole sequence.
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False, use_cache=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        return out[:, batch["input_ids"].shape[1]:]
