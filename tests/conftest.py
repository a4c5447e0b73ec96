"""Shared fixtures: tiny random backbones of both families on disk (fast, offline) and the bundled suite's paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One BLAS thread unless the caller says otherwise (make test does): the test models are tiny, and a job's subprocess
# must use the thread count of the in-process run it is compared with bit for bit (different counts reduce floats
# in another order).
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SUITE_DIR = REPO / "data" / "synthetic"
DEFAULT_MODEL_DIR = REPO / "models" / "default"
REAL_DATA_DIR = REPO.parent / "shared" / "data" / "crossfit-real"


def runs_in(task_folder: Path, pattern: str = "lr_*") -> list[Path]:
    """The run folders of a tune.py task folder, by name (their names end in a hash of the settings)."""
    return sorted(p for p in Path(task_folder).glob(pattern) if p.is_dir())


def only_run(task_folder: Path, pattern: str = "lr_*") -> Path:
    """The one run folder of a tune.py task folder (``predict_*`` for a prediction)."""
    runs = runs_in(task_folder, pattern)
    assert len(runs) == 1, f"expected one run folder in {task_folder}, found {[r.name for r in runs]}"
    return runs[0]


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


@pytest.fixture(scope="session")
def tiny_causal_dir(tmp_path_factory) -> Path:
    """A random 2-layer, width-32 Llama-architecture decoder with the same tokenizer: the causal family's twin of
    ``tiny_backbone_dir``."""
    import torch
    from transformers import LlamaConfig

    from models.backbones import FAMILIES
    from models.pretrain_default import train_tokenizer

    out = tmp_path_factory.mktemp("tiny_causal")
    tokenizer = train_tokenizer(vocab_size=600, seed=0, corpus_size=3000)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    torch.manual_seed(0)
    FAMILIES["causal"].new_model(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session", params=["seq2seq", "causal"])
def family_backbone_dir(request) -> Path:
    """The tiny backbone of each family in turn: tests of the core that must hold on both take this one."""
    return request.getfixturevalue("tiny_backbone_dir" if request.param == "seq2seq" else "tiny_causal_dir")


# The small study that test_study, test_crash_safety and test_jobs each compare an interrupted, resumed or
# parallel run against: four tasks, two targets, LoRA r=2, a few steps per stage.
STUDY_POOL = "sent_review sent_tweet topic_news topic_places"
STUDY_TARGETS = "sent_review topic_news"


def small_study_argv(out: Path, model: Path, fusions: str = "average Loss") -> list[str]:
    return ["--output", str(out), "--model", str(model), "--task_dir", str(SUITE_DIR), "--tasks", STUDY_POOL,
            "--targets", STUDY_TARGETS, "--deltas", "lora", "--fusions", fusions, "--source_k", "16",
            "--transferability", "true", "--source_iters", "2", "--source_valid_interval", "1",
            "--target_budgets", "2", "--target_data_seeds", "100", "--target_valid_interval", "1", "--target_warmup",
            "1", "--max_examples", "4", "--lora_r", "2", "--device", "cpu"]


@pytest.fixture(scope="session")
def reference_study(tiny_backbone_dir: Path, tmp_path_factory) -> Path:
    """``small_study_argv`` run once, uninterrupted and sequential, in this process (read-only for the tests)."""
    import study
    from utils.errors import run_cli

    out = tmp_path_factory.mktemp("reference_study") / "study"
    assert run_cli(study.main, small_study_argv(out, tiny_backbone_dir)) == 0
    return out


def pytest_collection_modifyitems(config, items) -> None:
    """The subprocess cases of the bad-input table check exit codes and messages: they are ``cli`` tests."""
    for item in items:
        if "[subprocess/" in item.nodeid:
            item.add_marker(pytest.mark.cli)


def pytest_report_header(config) -> str:
    """Which CPU kernels PyTorch picked: results that differ across machines usually differ here."""
    import torch

    return f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}"
