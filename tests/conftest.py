"""Shared fixtures: a tiny random T5 backbone on disk (fast, offline) and the bundled suite's paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SUITE_DIR = REPO / "data" / "synthetic"
DEFAULT_MODEL_DIR = REPO / "models" / "default"
REAL_DATA_DIR = REPO.parent / "shared" / "data" / "crossfit-real"


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory) -> Path:
    """A random 2+2-layer, d_model=32 T5 with the project's BPE tokenizer, saved like a real backbone.

    Tests of mechanics (shapes, round trips, formulas, CLI behaviour) use it: it loads in well under a
    second. Tests of learning use the embedded pre-trained default instead.
    """
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from models.pretrain_default import train_tokenizer

    out = tmp_path_factory.mktemp("tiny_backbone")
    tokenizer = train_tokenizer(vocab_size=600, seed=0, corpus_size=3000)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=2, d_kv=16, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                      dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
