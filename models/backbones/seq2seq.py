"""Encoder-decoder backbones: T5, mT5, Flan-T5 and T5 v1.1 (``T5ForConditionalGeneration``).

The input goes to the encoder, the answer is teacher-forced into the decoder (labels shifted right behind the
decoder start token), so the decoder's logits line up with the answer tokens as they come. This is the only
file that names T5's classes, ``decoder_input_ids`` or ``encoder_outputs`` (tests/test_backbones.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from models.backbones.base import IGNORE_INDEX, BackboneFamily, pad_rows, token_logp

if TYPE_CHECKING:
    import torch
    from torch import nn


class Seq2Seq(BackboneFamily):
    name = "seq2seq"
    model_types = ("t5", "mt5")  # Flan-T5 and T5 v1.1 are "t5"
    block_pattern = re.compile(r"(?:^|\.)(?P<stack>encoder|decoder)\.block\.(?P<index>\d+)\.")
    stacks = {"encoder": "num_layers", "decoder": "num_decoder_layers"}
    parallel_composition = True
    # wi: T5's feed-forward input; wi_1 the linear half of a gated one (v1.1, Flan-T5): intermediate_lora reaches it,
    # and nothing reaches wi_0 or the attention output o.
    lora_modules = {"q": "q", "k": "k", "v": "v", "wi": "intermediate", "wi_1": "intermediate", "wo": "output"}

    def model_class(self) -> Any:
        from transformers import T5ForConditionalGeneration

        return T5ForConditionalGeneration

    def tiny_config(self, vocab_size: int) -> Any:
        """About 2.6M parameters: 4+4 layers of width 128 (the embedded default, models/default)."""
        from transformers import T5Config

        return T5Config(vocab_size=vocab_size, d_model=128, d_ff=512, num_layers=4, num_decoder_layers=4,
                        num_heads=4, d_kv=32, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                        dropout_rate=0.1, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)

    def width(self, config: Any) -> int:
        return int(config.d_model)

    def ffn_width(self, config: Any) -> int:
        return int(config.d_ff)

    def layer_counts(self, config: Any) -> dict[str, int]:
        return {"num_layers": int(config.num_layers), "num_decoder_layers": int(config.num_decoder_layers)}

    def collate(self, inputs: list[list[int]], labels: list[list[int]] | None, pad_id: int) -> dict[str, torch.Tensor]:
        """Right-padded inputs with their mask; labels apart, right-padded with IGNORE_INDEX."""
        input_ids, attention_mask = pad_rows(inputs, pad_id)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if labels is not None:
            batch["labels"] = pad_rows(labels, IGNORE_INDEX)[0]
        return batch

    def forward_kwargs(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        # use_cache stays at the model's default: the bare (no delta) T5 of transformers 4.57 computes logits
        # 1e-5 apart without its cache, and those of a T5 with a delta module either way.
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])}

    def generate(self, model: nn.Module, batch: Mapping[str, torch.Tensor], tokenizer: Any, max_new_tokens: int,
                 num_beams: int) -> torch.Tensor:
        return model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)

    def rank_scores(self, model: nn.Module, inputs: list[list[int]], label_ids: list[list[int]],
                    pad_id: int) -> torch.Tensor:
        """The encoder runs once per input; its states are repeated for every label."""
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in self.collate(inputs, None, pad_id).items()}
        labels = pad_rows(label_ids, IGNORE_INDEX)[0].to(device)
        n, n_labels = len(inputs), len(label_ids)
        encoded = encode(model, batch)
        # Row r of the decoder batch is input r // n_labels with label r % n_labels.
        targets = labels.repeat(n, 1)
        out = model(encoder_outputs=(encoded.repeat_interleave(n_labels, dim=0),),
                    attention_mask=batch["attention_mask"].repeat_interleave(n_labels, dim=0),
                    decoder_input_ids=model.prepare_decoder_input_ids_from_labels(labels=targets), use_cache=False)
        return token_logp(out.logits, targets).sum(dim=-1).view(n, n_labels).cpu()


def encode(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Encoder states of a batch, inside the delta library's forward context when it has one.

    The ``adapters`` library sets up per-batch state (prefix tuning's keys and values) in a context that the
    model's forward() opens; calling the encoder alone must open it too, as its own generate() does.
    """
    encoder = model.get_encoder()
    if getattr(model, "adapters_config", None) is None:
        return encoder(**batch, return_dict=True).last_hidden_state
    from adapters.context import ForwardContext

    with ForwardContext(model, **batch):
        return encoder(**batch, return_dict=True).last_hidden_state
