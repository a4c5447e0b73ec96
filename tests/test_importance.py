"""Group importance (get_similarity/importance.py) on a tiny backbone with small synthetic modules."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dataloader.crossfit import load_task
from get_similarity import importance
from get_similarity.importance import pooled_loss, reset
from models.backbone import load_backbone
from models.delta import (
    DeltaConfig,
    attach_delta,
    backbone_fingerprint,
    delta_state_dict,
    load_delta_state,
    save_delta_checkpoint,
)
from models.evaluate import evaluate
from models.examples import encode_examples, generate
from tests.conftest import REPO, SUITE_DIR
from utils.errors import run_cli

CONFIGS = {"lora": DeltaConfig("lora", lora_r=4, lora_alpha=8),
           "prefix": DeltaConfig("prefix", prefix_length=3, prefix_mlp=8)}
LAYERS = {"lora": ["encoder.0", "encoder.1", "decoder.0", "decoder.1"],
          "prefix": ["encoder.prefix", "decoder.self_prefix", "decoder.cross_prefix"]}
N, MAX_OUT, BSZ = 8, 6, 4  # examples, generated tokens, batch size


def fresh(backbone_dir: Path, method: str | None):
    """The tiny backbone, with the delta module at importance.py's default initial state (seed 42)."""
    model, tokenizer = load_backbone(backbone_dir)
    if method is not None:
        torch.manual_seed(42)
        attach_delta(model, CONFIGS[method])
    return model, tokenizer


@pytest.fixture(scope="module", params=list(CONFIGS))
def setup(request, tiny_backbone_dir: Path, tmp_path_factory) -> dict:
    """A perturbed module, and a one-split task whose gold answers are that module's own generations for
    the first half of the examples (so the full module scores exactly 0.5 ACC) and nonsense for the rest."""
    method = request.param
    root = tmp_path_factory.mktemp(f"importance_{method}")
    model, tokenizer = fresh(tiny_backbone_dir, method)
    g = torch.Generator().manual_seed(7)
    tensors = {n: t + 0.3 * torch.randn(t.shape, generator=g) for n, t in delta_state_dict(model).items()}
    ckpt = save_delta_checkpoint(root / "ckpt", tensors, CONFIGS[method], "tiny", backbone_fingerprint(model),
                                 task="mini")
    load_delta_state(model, tensors, "module")
    examples = load_task(SUITE_DIR, "sent_review", 16, 100, ["dev"])["dev"][:N]
    predictions = generate(model, tokenizer, encode_examples(tokenizer, examples, 256, MAX_OUT), BSZ, MAX_OUT)
    assert all(p and "\t" not in p and "\n" not in p for p in predictions[: N // 2])
    lines = [f"{ex.input}\t{pred if i < N // 2 else 'zzz qqq'}" for i, (ex, pred) in
             enumerate(zip(examples, predictions))]
    (root / "data" / "mini").mkdir(parents=True)
    (root / "data" / "mini" / "mini_16_100_dev.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"method": method, "root": root, "ckpt": ckpt, "tensors": tensors, "task_dir": root / "data"}


def args(backbone_dir: Path, setup: dict, out: Path) -> list[str]:
    return ["--checkpoint", str(setup["ckpt"]), "--task", "mini", "--model", str(backbone_dir), "--task_dir",
            str(setup["task_dir"]), "--max_output_length", str(MAX_OUT), "--batch_size", str(BSZ),
            "--output_dir", str(out), "--device", "cpu", "--quiet"]


def read(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        assert reader.fieldnames == ["granularity", "group", "dev_score", "dev_loss", "delta_score", "delta_loss"]
        return list(reader)


@pytest.fixture(scope="module")
def result(setup: dict, tiny_backbone_dir: Path) -> dict:
    out = setup["root"] / "out"
    assert importance.main(args(tiny_backbone_dir, setup, out)) == 0
    return {"out": out, "rows": read(out / "importance.tsv")}


def test_rows_and_files(result: dict, setup: dict) -> None:
    rows, out = result["rows"], result["out"]
    assert [(r["granularity"], r["group"]) for r in rows] == [
        ("model", "full"), ("block", "encoder"), ("block", "decoder"),
        *[("layer", g) for g in LAYERS[setup["method"]]], ("model", "init")]
    full = rows[0]
    for r in rows:  # deltas are relative to the full module
        assert float(r["delta_score"]) == pytest.approx(float(r["dev_score"]) - float(full["dev_score"]), abs=1e-9)
        assert float(r["delta_loss"]) == pytest.approx(float(r["dev_loss"]) - float(full["dev_loss"]), rel=1e-8,
                                                       abs=1e-8)
    assert float(full["delta_score"]) == 0.0 and float(full["delta_loss"]) == 0.0
    assert sorted(p.name for p in out.iterdir()) == ["importance.tsv", "importance_layers.png"]
    assert (out / "importance_layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Resetting a group changes the loss: the table is not constant.
    assert len({r["dev_loss"] for r in rows}) > 2


def test_full_row_is_the_unreset_module(result: dict, setup: dict, tiny_backbone_dir: Path) -> None:
    full = result["rows"][0]
    assert float(full["dev_score"]) == 0.5  # its own generations for half of the examples
    model, tokenizer = fresh(tiny_backbone_dir, setup["method"])
    load_delta_state(model, setup["tensors"], "module")
    examples = load_task(setup["task_dir"], "mini", 16, 100, ["dev"])["dev"]
    task = encode_examples(tokenizer, examples, 256, MAX_OUT)
    score, _ = evaluate(model, tokenizer, task, "ACC", BSZ, MAX_OUT)
    assert score == 0.5
    assert float(full["dev_loss"]) == pytest.approx(pooled_loss(model, task, tokenizer.pad_token_id, BSZ), rel=1e-8)


def test_resetting_everything_is_the_initial_state(result: dict, setup: dict, tiny_backbone_dir: Path) -> None:
    init_row = result["rows"][-1]
    examples = load_task(setup["task_dir"], "mini", 16, 100, ["dev"])["dev"]
    # LoRA starts neutral: the initial state is the bare backbone. Prefix starts random: a fresh attach.
    model, tokenizer = fresh(tiny_backbone_dir, None if setup["method"] == "lora" else setup["method"])
    task = encode_examples(tokenizer, examples, 256, MAX_OUT)
    score, _ = evaluate(model, tokenizer, task, "ACC", BSZ, MAX_OUT)
    assert float(init_row["dev_score"]) == score
    assert float(init_row["dev_loss"]) == pytest.approx(pooled_loss(model, task, tokenizer.pad_token_id, BSZ),
                                                        rel=1e-8)
    assert init_row["dev_loss"] != result["rows"][0]["dev_loss"]
    # Resetting both blocks, or all layers, is the same state as resetting everything.
    model, _ = fresh(tiny_backbone_dir, setup["method"])
    init = delta_state_dict(model)
    assert all(torch.equal(t, init[n]) for n, t in reset(setup["tensors"], init, list(init)).items())
    untouched = reset(setup["tensors"], init, [])
    assert all(torch.equal(t, setup["tensors"][n]) for n, t in untouched.items())


def test_bad_inputs_exit_2_and_write_nothing(setup: dict, tiny_backbone_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "imp"
    cases = [("--checkpoint", str(tmp_path / "missing"), "--checkpoint"),
             ("--task", "nope", "nope"),
             ("--max_examples", "0", "--max_examples")]
    for flag, value, fragment in cases:
        argv = args(tiny_backbone_dir, setup, out)
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
        assert run_cli(importance.main, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ") and fragment in err
        assert not out.exists()


@pytest.mark.slow
def test_block_script_dry_run_and_real_run(setup: dict, tiny_backbone_dir: Path, tmp_path: Path) -> None:
    if setup["method"] != "lora":
        pytest.skip("one method is enough for the script wiring")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    scripts = REPO / "scripts" / "get_similarity"
    for method in ("adapter", "lora", "prefix"):
        proc = subprocess.run(["bash", str(scripts / f"{method}_block.sh")], env={**env, "DRY_RUN": "1"},
                              capture_output=True, text=True, timeout=60, check=True)
        words = proc.stdout.split()
        assert words[words.index("--checkpoint") + 1] == f"runs/sources/{method}/sent_review"
        assert words[words.index("--output_dir") + 1] == f"runs/importance/{method}/sent_review"
    overrides = {"MODEL": str(tiny_backbone_dir), "TASK_DIR": str(setup["task_dir"]), "TASK": "mini",
                 "CHECKPOINT": str(setup["ckpt"]), "MAX_OUTPUT_LENGTH": str(MAX_OUT), "DEVICE": "cpu",
                 "OUTPUT_DIR": str(tmp_path / "via_script"), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(scripts / "lora_block.sh")], env={**env, **overrides}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(read(tmp_path / "via_script" / "importance.tsv")[0]["dev_score"]) == 0.5
