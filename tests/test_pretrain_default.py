"""The default backbones' pre-training script: the causal family's one-sequence encoding, by hand, and a short
run that writes a loadable model folder with its report."""

from __future__ import annotations

import json

import pytest
import torch

from models.pretrain_default import encode_causal, main, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(vocab_size=600, seed=0, corpus_size=3000)


def test_a_causal_example_is_prompt_then_answer_with_the_loss_on_the_answer_alone(tokenizer):
    pairs = [("review : good film", "positive"), ("a", "no")]
    batch = encode_causal(tokenizer, pairs)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for i, (x, y) in enumerate(pairs):
        prompt = tokenizer(x).input_ids  # ends with </s>: the separator
        answer = tokenizer(y).input_ids  # ends with </s>: the end of the answer
        assert prompt[-1] == eos and answer[-1] == eos
        n = len(prompt) + len(answer)
        assert batch["input_ids"][i, :n].tolist() == prompt + answer
        assert batch["labels"][i, :n].tolist() == [-100] * len(prompt) + answer
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert batch["input_ids"][i, n:].eq(pad).all() and batch["labels"][i, n:].eq(-100).all()


@pytest.mark.slow
def test_a_short_causal_pre_training_writes_a_llama_folder_and_its_report(tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = tmp_path / "causal"
    main(["--family", "causal", "--steps", "4", "--warmup_steps", "2", "--batch_size", "4", "--eval_every", "100",
          "--threads", "1", "--output_dir", str(out)])
    report = json.loads((out / "pretrain_report.json").read_text())
    assert report["family"] == "causal" and report["steps"] == 4
    assert set(report["skill_accuracy"]) == {"sentiment", "topic", "lookup", "entail", "extract", "copy"}
    model = LlamaForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "llama" and model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert 2e6 < sum(p.numel() for p in model.parameters()) < 4e6  # about the T5 default's size
    with torch.no_grad():
        logits = model(**tokenizer(["review : good film"], return_tensors="pt")).logits
    assert torch.isfinite(logits).all()


def test_the_committed_causal_default_is_good_enough_and_shares_the_tokenizer():
    """models/default-causal: a Llama-architecture decoder of the T5 default's size, with the very same tokenizer,
    at 0.9 or more held-out accuracy on the four skills the suite's families are built on."""
    from transformers import LlamaForCausalLM

    from tests.conftest import DEFAULT_MODEL_DIR

    causal = DEFAULT_MODEL_DIR.parent / "default-causal"
    report = json.loads((causal / "pretrain_report.json").read_text())
    assert report["family"] == "causal"
    assert all(report["skill_accuracy"][skill] >= 0.9 for skill in ("sentiment", "topic", "lookup", "entail"))
    assert (causal / "tokenizer.json").read_bytes() == (DEFAULT_MODEL_DIR / "tokenizer.json").read_bytes()
    model = LlamaForCausalLM.from_pretrained(causal)
    assert sum(p.numel() for p in model.parameters()) == report["parameters"]
