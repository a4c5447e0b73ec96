"""Untrusted checkpoints: malicious pickles, legacy .pt conversion, AdapterHub save_adapter folders."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import T5ForConditionalGeneration

import tune
from models.backbone import load_backbone
from models.delta import DeltaConfig, attach_delta, backbone_fingerprint, delta_state_dict, load_delta_state
from models.formats import load_delta_checkpoint
from models.legacy import read_legacy_pt
from models.run_folders import resolve_checkpoint
from models.settings import TrainConfig
from models.trainer import Trainer
from tests.conftest import DEFAULT_MODEL_DIR, REPO
from utils.errors import UserInputError, run_cli

SCRIPT = REPO / "scripts" / "convert_legacy_ckpt.py"
_spec = importlib.util.spec_from_file_location("convert_legacy_ckpt", SCRIPT)
convert_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_cli)

CONFIGS = {
    "houlsby": DeltaConfig("adapter", adapter_type="houlsby", adapter_size=4),
    "pfeiffer": DeltaConfig("adapter", adapter_type="pfeiffer", adapter_size=4),
    "lora": DeltaConfig("lora", lora_r=4, lora_alpha=8),
    "prefix": DeltaConfig("prefix", prefix_length=5, prefix_mlp=8),
}
SIZE_FLAGS = {"lora": ["--lora_alpha", "8"]}  # alpha is the one size a bare state dict cannot tell


class Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {"input_ids": torch.randint(2, 200, (2, 9), generator=g),
            "labels": torch.randint(2, 200, (2, 4), generator=g)}


def logits(model: T5ForConditionalGeneration) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch()).logits


def random_delta(model_dir: Path, cfg: DeltaConfig, seed: int = 0, zero_bias: bool = False) -> dict[str, torch.Tensor]:
    """A trained-looking (non-neutral) module for the backbone in ``model_dir``."""
    model, _ = load_backbone(model_dir)
    attach_delta(model, cfg)
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.zeros_like(v) if zero_bias and k.endswith(".bias") else torch.randn(v.shape, generator=g) * 0.3)
            for k, v in delta_state_dict(model).items()}


def model_with(model_dir: Path, cfg: DeltaConfig, tensors: dict[str, torch.Tensor]) -> T5ForConditionalGeneration:
    model, _ = load_backbone(model_dir)
    attach_delta(model, cfg)
    load_delta_state(model, tensors, "test")
    return model


def convert(argv: list[str], capsys) -> tuple[int, str]:
    code = run_cli(convert_cli.main, [*argv, "--quiet"])
    return code, capsys.readouterr().err


def assert_one_line_error(err: str, *parts: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for part in parts:
        assert part in lines[0], (part, lines[0])


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temporary sibling


# --------------------------------------------------------------------------------------------------
# Malicious pickles


def _malicious_files(tmp_path: Path, sentinel: Path) -> dict[str, Path]:
    tensors = {"encoder.block.0.layer.0.SelfAttention.q.lora_A": torch.zeros(4, 32)}
    files = {"zip": tmp_path / "evil.pt", "legacy": tmp_path / "evil_legacy.pt", "args": tmp_path / "evil_args.pt"}
    torch.save({"lora": tensors, "current_state": Payload(sentinel)}, files["zip"])
    torch.save({"lora": tensors, "args": Payload(sentinel)}, files["legacy"], _use_new_zipfile_serialization=False)
    # argparse.Namespace is allowed, but not what is inside it.
    torch.save({"lora": tensors, "args": argparse.Namespace(lora_alpha=8, hook=Payload(sentinel))}, files["args"])
    return files


def test_malicious_pickle(tmp_path, tiny_backbone_dir, capsys):
    sentinel = tmp_path / "SENTINEL"
    for kind, path in _malicious_files(tmp_path, sentinel).items():
        with pytest.raises(UserInputError, match=r"refused: unpickling it would import and call posix\.system"):
            read_legacy_pt(path)
        out = tmp_path / f"out_{kind}"
        code, err = convert([str(path), str(out), "--model", str(tiny_backbone_dir)], capsys)
        assert code == 2
        assert_one_line_error(err, str(path), "posix.system", "nothing from the file was run")
        assert_nothing_written(out)
    # tune.py never unpickles a .pt given as a checkpoint: it points to the converter instead.
    code = run_cli(tune.main, ["--do_predict", "--train_checkpoint", str(tmp_path / "evil.pt"), "--model",
                               str(tiny_backbone_dir), "--tune_method", "lora", "--tasks", "sent_review", "--quiet",
                               "--output_dir", str(tmp_path / "runs")])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, "convert it first", "convert_legacy_ckpt.py")
    # Nor does a poisoned AdapterHub folder get further than the restricted unpickler.
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"config": {"architecture": "lora"}, "hidden_size": 32, '
                                                '"model_type": "t5", "name": "x"}', encoding="utf-8")
    torch.save({"x": Payload(sentinel)}, folder / "pytorch_adapter.bin")
    code = run_cli(tune.main, ["--do_predict", "--train_checkpoint", str(folder), "--model", str(tiny_backbone_dir),
                               "--tune_method", "lora", "--tasks", "sent_review", "--quiet",
                               "--output_dir", str(tmp_path / "runs")])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, "pytorch_adapter.bin: refused", "posix.system")
    assert not sentinel.exists()
    assert not (tmp_path / "runs").exists()


@pytest.mark.cli
def test_malicious_pickle_cli_exit_code(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    evil = _malicious_files(tmp_path, sentinel)["zip"]
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), str(evil), str(out)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "refused", "posix.system")
    assert not sentinel.exists()
    assert_nothing_written(out)


def test_pickled_config_object_is_refused_with_how_to_convert(tmp_path, tiny_backbone_dir, capsys):
    from transformers import T5Config

    src, out = tmp_path / "with_config.pt", tmp_path / "out"
    torch.save({"lora": random_delta(tiny_backbone_dir, CONFIGS["lora"]), "config": T5Config(d_model=32),
                "args": {"lora_alpha": 8}}, src)
    code, err = convert([str(src), str(out), "--model", str(tiny_backbone_dir)], capsys)
    assert code == 2
    assert_one_line_error(err, "T5Config", "re-save just its tensor dicts")
    assert_nothing_written(out)


# --------------------------------------------------------------------------------------------------
# Legacy .pt conversion


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tensor_only_pt_converts_to_the_same_model(name, tmp_path, tiny_backbone_dir, capsys):
    cfg = CONFIGS[name]
    tensors = random_delta(tiny_backbone_dir, cfg)
    expected = logits(model_with(tiny_backbone_dir, cfg, tensors))  # the state dict loaded directly
    src, out = tmp_path / "module.pt", tmp_path / "converted"
    torch.save(tensors, src)
    code, err = convert([str(src), str(out), "--model", str(tiny_backbone_dir), *SIZE_FLAGS.get(name, [])], capsys)
    assert code == 0, err
    converted, meta = load_delta_checkpoint(out)
    assert meta["method"] == cfg.method and meta["sizes"] == cfg.sizes()
    assert meta["backbone"] == tiny_backbone_dir.name
    assert meta["backbone_fingerprint"] == backbone_fingerprint(model_with(tiny_backbone_dir, cfg, tensors))
    assert meta["backbone_fingerprint"]["vocab_size"] == 600
    assert meta["extra"]["source_format"] == "project names in a .pt"
    assert converted.keys() == tensors.keys()
    assert all(torch.equal(converted[k], tensors[k]) for k in tensors)
    assert torch.equal(logits(model_with(tiny_backbone_dir, cfg, converted)), expected)
    # tune.py starts from it as from any checkpoint
    assert resolve_checkpoint(out) == out


def test_converter_defaults_to_the_embedded_backbone_and_any_module_name(tmp_path, capsys):
    cfg = DeltaConfig("lora", lora_r=2, lora_alpha=4)
    tensors = random_delta(DEFAULT_MODEL_DIR, cfg)
    renamed = {k.replace(".loras.delta.", ".loras.sent_review.") for k in tensors}
    assert len(renamed) == len(tensors)
    src, out = tmp_path / "adapterhub_state.pt", tmp_path / "converted"
    torch.save({k.replace(".loras.delta.", ".loras.sent_review."): v for k, v in tensors.items()}, src)
    code, err = convert([str(src), str(out), "--lora_alpha", "4", "--task", "sent_review"], capsys)
    assert code == 0, err
    converted, meta = load_delta_checkpoint(out)
    assert meta["backbone"] == "default" and meta["backbone_fingerprint"]["vocab_size"] == 1017
    assert meta["task"] == "sent_review"
    assert all(torch.equal(converted[k], tensors[k]) for k in tensors)


def test_pt_with_namespace_args(tmp_path, tiny_backbone_dir, capsys):
    """argparse.Namespace is the one class allowed: its flags supply lora_alpha and are checked against the tensors."""
    cfg = CONFIGS["lora"]
    tensors = random_delta(tiny_backbone_dir, cfg)
    args = argparse.Namespace(tune_method="lora", apply_lora=True, lora_r=4, lora_alpha=8, learning_rate=5e-4,
                              output_dir="/data/old/run")
    src = tmp_path / "checkpoint-best.pt"
    torch.save({"lora": tensors, "args": args, "current_state": {"epoch": 3, "num_updates": 1200}}, src)
    code, err = convert([str(src), str(tmp_path / "a"), "--model", str(tiny_backbone_dir)], capsys)
    assert code == 0, err
    converted, meta = load_delta_checkpoint(tmp_path / "a")
    assert meta["sizes"] == {"lora_r": 4, "lora_alpha": 8} and meta["step"] == 1200
    assert meta["extra"]["args"]["learning_rate"] == 5e-4
    assert meta["extra"]["current_state"] == {"epoch": 3, "num_updates": 1200}
    assert torch.equal(logits(model_with(tiny_backbone_dir, cfg, converted)),
                       logits(model_with(tiny_backbone_dir, cfg, tensors)))

    # The original trainer saved vars(args), a plain dict: same result.
    torch.save({"lora": tensors, "args": vars(args)}, tmp_path / "vars.pt")
    assert convert([str(tmp_path / "vars.pt"), str(tmp_path / "b"), "--model", str(tiny_backbone_dir)], capsys)[0] == 0
    assert load_delta_checkpoint(tmp_path / "b")[1]["sizes"] == {"lora_r": 4, "lora_alpha": 8}

    # A flag or a saved arg that contradicts the file is refused, not ignored.
    code, err = convert([str(src), str(tmp_path / "c"), "--model", str(tiny_backbone_dir), "--lora_alpha", "16"],
                        capsys)
    assert code == 2
    assert_one_line_error(err, "--lora_alpha 16 conflicts with", "lora_alpha 8")
    torch.save({"lora": tensors, "args": argparse.Namespace(tune_method="lora", lora_r=8, lora_alpha=8)},
               tmp_path / "stale.pt")
    code, err = convert([str(tmp_path / "stale.pt"), str(tmp_path / "d"), "--model", str(tiny_backbone_dir)], capsys)
    assert code == 2
    assert_one_line_error(err, "saved args say lora_r 8 but its tensors have lora_r 4")
    # Without saved args or a flag, alpha is unknown.
    torch.save({"lora": tensors}, tmp_path / "bare.pt")
    code, err = convert([str(tmp_path / "bare.pt"), str(tmp_path / "e"), "--model", str(tiny_backbone_dir)], capsys)
    assert code == 2
    assert_one_line_error(err, "lora_alpha is not in its tensors or saved args; pass --lora_alpha")
    for name in "cde":
        assert_nothing_written(tmp_path / name)


def _hooked(model: T5ForConditionalGeneration, module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) of ``module`` during a forward pass of ``model``."""
    seen = {}
    handle = module.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    try:
        logits(model)
    finally:
        handle.remove()
    return seen["x"], seen["y"]


def test_original_lora_names_convert_exactly(tmp_path, tiny_backbone_dir, capsys):
    """module/lora.py stored lora_A (in, r) and lora_B (r, out) and added x @ A @ B * alpha / r."""
    cfg = CONFIGS["lora"]
    ours = random_delta(tiny_backbone_dir, cfg)
    original = {k.replace(f".loras.{'delta'}.", "."): v.t().contiguous() for k, v in ours.items()}
    assert "decoder.block.1.layer.1.EncDecAttention.v.lora_B" in original
    src, out = tmp_path / "checkpoint-best.pt", tmp_path / "converted"
    torch.save({"lora": original, "args": {"tune_method": "lora", "lora_r": 4, "lora_alpha": 8}}, src)
    code, err = convert([str(src), str(out), "--model", str(tiny_backbone_dir)], capsys)
    assert code == 0, err
    converted, meta = load_delta_checkpoint(out)
    assert meta["extra"]["source_format"] == "original names in a .pt"
    assert all(torch.equal(converted[k], ours[k]) for k in ours)
    # The converted module computes the original formula.
    model = model_with(tiny_backbone_dir, cfg, converted)
    q = model.decoder.block[1].layer[1].EncDecAttention.q
    x, y = _hooked(model, q)
    a = original["decoder.block.1.layer.1.EncDecAttention.q.lora_A"]
    b = original["decoder.block.1.layer.1.EncDecAttention.q.lora_B"]
    expected = torch.nn.functional.linear(x, q.weight) + x @ a @ b * (8 / 4)
    assert torch.allclose(y, expected, atol=1e-5)


def test_original_adapters_and_prefix(tmp_path, tiny_backbone_dir, capsys):
    """Houlsby converts without its cross-attention adapters (on request); Pfeiffer and prefix are refused."""
    cfg = CONFIGS["houlsby"]
    ours = random_delta(tiny_backbone_dir, cfg, zero_bias=True)  # the original adapters had no biases
    original = {}
    for k, v in ours.items():
        base = k.split(".adapters.")[0]
        if k.endswith("adapter_down.0.weight"):
            original[f"{base}.adapter.adapter_A"] = v.t().contiguous()  # nn.Parameter (d_model, size)
        elif k.endswith("adapter_up.weight"):
            original[f"{base}.adapter.adapter_B"] = v.t().contiguous()
    g = torch.Generator().manual_seed(5)
    for i in range(2):  # the original also adapted the decoder's cross-attention
        original[f"decoder.block.{i}.layer.1.adapter.adapter_A"] = torch.randn(32, 4, generator=g)
        original[f"decoder.block.{i}.layer.1.adapter.adapter_B"] = torch.randn(4, 32, generator=g)
    args = {"tune_method": "adapter", "apply_adapter": True, "adapter_type": "houlsby", "adapter_size": 4}
    src = tmp_path / "houlsby.pt"
    torch.save({"adapter": original, "args": args}, src)
    base = ["--model", str(tiny_backbone_dir)]
    code, err = convert([str(src), str(tmp_path / "refused"), *base], capsys)
    assert code == 2
    assert_one_line_error(err, "2 decoder cross-attention adapters", "--drop_cross_adapters")
    assert_nothing_written(tmp_path / "refused")

    code = run_cli(convert_cli.main, [str(src), str(tmp_path / "out"), *base, "--drop_cross_adapters", "--quiet"])
    err = capsys.readouterr().err
    assert code == 0 and "dropped 2 decoder cross-attention adapters" in err, err
    converted, meta = load_delta_checkpoint(tmp_path / "out")
    assert meta["sizes"] == {"adapter_type": "houlsby", "adapter_size": 4}
    assert meta["extra"]["dropped"] == ["decoder.block.0.layer.1.adapter", "decoder.block.1.layer.1.adapter"]
    assert all(torch.equal(converted[k], ours[k]) for k in ours)
    # An encoder FFN sub-layer computes the original h + f + B(swish(A f)), f the FFN output.
    model = model_with(tiny_backbone_dir, cfg, converted)
    layer = model.encoder.block[1].layer[1]
    h, y = _hooked(model, layer)
    with torch.no_grad():
        f = layer.DenseReluDense(layer.layer_norm(h))
    a, b = original["encoder.block.1.layer.1.adapter.adapter_A"], original["encoder.block.1.layer.1.adapter.adapter_B"]
    assert torch.allclose(y, h + f + torch.nn.functional.silu(f @ a) @ b, atol=1e-5)

    pfeiffer = {k: v for k, v in original.items() if ".layer.1." in k and k.startswith("encoder")
                or ".layer.2." in k}
    torch.save({"adapter": pfeiffer}, tmp_path / "pfeiffer.pt")
    code, err = convert([str(tmp_path / "pfeiffer.pt"), str(tmp_path / "p"), *base], capsys)
    assert code == 2
    assert_one_line_error(err, "Pfeiffer adapter (after the FFN only) cannot be converted")

    prefix = {"encoder.prefix.prefix": torch.randn(5, 32), "encoder.prefix.prefix_project.0.weight": torch.randn(8, 32),
              "encoder.prefix.prefix_project.2.weight": torch.randn(128, 8)}
    torch.save({"prefix": prefix}, tmp_path / "prefix.pt")
    code, err = convert([str(tmp_path / "prefix.pt"), str(tmp_path / "q"), *base], capsys)
    assert code == 2
    assert_one_line_error(err, "original-code prefix module cannot be converted")
    for name in "pq":
        assert_nothing_written(tmp_path / name)


def test_key_map_renames_unknown_names(tmp_path, tiny_backbone_dir, capsys):
    cfg = CONFIGS["lora"]
    tensors = random_delta(tiny_backbone_dir, cfg)
    src = tmp_path / "wrapped.pt"
    torch.save({f"t5.{k}": v for k, v in tensors.items()}, src)
    base = ["--model", str(tiny_backbone_dir), "--lora_alpha", "8"]
    code, err = convert([str(src), str(tmp_path / "a"), *base], capsys)
    assert code == 2
    assert_one_line_error(err, "24 tensor names match neither", "'t5.decoder.block.0.", "--key_map")
    code, err = convert([str(src), str(tmp_path / "b"), *base, "--key_map", r"^t5\.", ""], capsys)
    assert code == 0, err
    converted, _ = load_delta_checkpoint(tmp_path / "b")
    assert all(torch.equal(converted[k], tensors[k]) for k in tensors)
    code, err = convert([str(src), str(tmp_path / "c"), *base, "--key_map", "(", ""], capsys)
    assert code == 2
    assert_one_line_error(err, "--key_map: invalid regular expression '('")
    for name in "ac":
        assert_nothing_written(tmp_path / name)


def test_bad_input_writes_nothing(tmp_path, tiny_backbone_dir, capsys):
    base = ["--model", str(tiny_backbone_dir), "--lora_alpha", "8"]
    out = tmp_path / "out"
    (tmp_path / "notes.pt").write_text("not a checkpoint\n", encoding="utf-8")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save({"model": {"shared.weight": torch.zeros(2)}}, tmp_path / "full.pt")
    wide = random_delta(DEFAULT_MODEL_DIR, CONFIGS["lora"])  # made for d_model 128, not the tiny 32
    torch.save(wide, tmp_path / "wide.pt")
    nan = random_delta(tiny_backbone_dir, CONFIGS["lora"])
    next(iter(nan.values()))[0, 0] = float("nan")
    torch.save(nan, tmp_path / "nan.pt")
    cases = {
        "missing.pt": "not found",
        "notes.pt": "neither a zip archive nor a pickle",
        "tensor.pt": "expected a dict",
        "full.pt": "'model' (a whole fine-tuned model), not a delta module",
        "wide.pt": "delta weights do not fit this model: 24 unexpected keys",
        "nan.pt": "NaN or infinite",
    }
    for name, message in cases.items():
        code, err = convert([str(tmp_path / name), str(out), *base], capsys)
        assert code == 2, name
        assert_one_line_error(err, message)
        assert_nothing_written(out)
    # An existing output folder is only replaced on request.
    torch.save(random_delta(tiny_backbone_dir, CONFIGS["lora"]), tmp_path / "good.pt")
    out.mkdir()
    code, err = convert([str(tmp_path / "good.pt"), str(out), *base], capsys)
    assert code == 2
    assert_one_line_error(err, "exists; pass --overwrite")
    assert list(out.iterdir()) == []
    assert convert([str(tmp_path / "good.pt"), str(out), *base, "--overwrite"], capsys)[0] == 0


# --------------------------------------------------------------------------------------------------
# AdapterHub save_adapter folders


def _library_configs() -> dict:
    from adapters import DoubleSeqBnConfig, LoRAConfig, PrefixTuningConfig, SeqBnConfig

    return {  # as a user of the library would write them (d_model 32: reduction factor 8 -> size 4)
        "houlsby": (DoubleSeqBnConfig(reduction_factor=8), ["--tune_method", "adapter", "--adapter_size", "4"]),
        "pfeiffer": (SeqBnConfig(reduction_factor=8),
                     ["--tune_method", "adapter", "--adapter_type", "pfeiffer", "--adapter_size", "4"]),
        "lora": (LoRAConfig(r=4, alpha=8), ["--tune_method", "lora", "--lora_r", "4", "--lora_alpha", "8"]),
        "prefix": (PrefixTuningConfig(prefix_length=5, bottleneck_size=8),
                   ["--tune_method", "prefix", "--prefix_length", "5", "--prefix_mlp", "8"]),
    }


def save_adapterhub(model_dir: Path, config, folder: Path, use_safetensors: bool) -> torch.Tensor:
    """Train-looking module saved with ``save_adapter``; returns the saving model's logits."""
    import adapters

    model, _ = load_backbone(model_dir)
    adapters.init(model)
    model.add_adapter("my_task", config=config)
    model.set_active_adapters("my_task")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".my_task." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    expected = logits(model)
    model.save_adapter(str(folder), "my_task", use_safetensors=use_safetensors)
    return expected


def trainer_logits(model_dir: Path, folder: Path, flags: list[str], tmp_path: Path) -> torch.Tensor:
    args = tune.build_parser().parse_args(["--do_predict", "--train_checkpoint", str(folder), "--model", str(model_dir),
                                           "--device", "cpu", "--output_dir", str(tmp_path / "runs"), *flags])
    trainer = Trainer(TrainConfig.from_values(args), tune.check_args(args))
    assert trainer.init_source == str(folder)
    return logits(trainer.model)


@pytest.mark.parametrize("name,use_safetensors", [("houlsby", False), ("houlsby", True), ("pfeiffer", True),
                                                  ("lora", False), ("lora", True), ("prefix", False)])
def test_adapterhub_folder_loads_through_tune(name, use_safetensors, tmp_path, tiny_backbone_dir):
    config, flags = _library_configs()[name]
    folder = tmp_path / "saved"
    expected = save_adapterhub(tiny_backbone_dir, config, folder, use_safetensors)
    weights = "adapter.safetensors" if use_safetensors else "pytorch_adapter.bin"
    assert (folder / "adapter_config.json").is_file() and (folder / weights).is_file()
    assert torch.equal(trainer_logits(tiny_backbone_dir, folder, flags, tmp_path), expected)


def test_adapterhub_prefix_in_safetensors(tmp_path, tiny_backbone_dir):
    """The library cannot save_adapter a prefix with safetensors (shared tensors); one alias per tensor loads."""
    from safetensors.torch import save_file

    config, flags = _library_configs()["prefix"]
    folder = tmp_path / "saved"
    expected = save_adapterhub(tiny_backbone_dir, config, folder, use_safetensors=False)
    state = read_legacy_pt(folder / "pytorch_adapter.bin").tensors
    one_alias = {k: v.clone() for k, v in state.items() if k.startswith("prefix_tuning.")}
    save_file(one_alias, folder / "adapter.safetensors")
    (folder / "pytorch_adapter.bin").unlink()
    assert torch.equal(trainer_logits(tiny_backbone_dir, folder, flags, tmp_path), expected)


def _task_dir(root: Path) -> Path:
    lines = "the cat sat\tyes\nthe dog ran\tno\n"
    (root / "alpha").mkdir(parents=True)
    for split in ("dev", "test"):
        (root / "alpha" / f"alpha_16_100_{split}.tsv").write_text(lines, encoding="utf-8")
    return root


def test_adapterhub_folder_in_tune_cli_and_mismatches(tmp_path, tiny_backbone_dir, capsys):
    from adapters import LoRAConfig

    folder = tmp_path / "saved"
    save_adapterhub(tiny_backbone_dir, LoRAConfig(r=4, alpha=8), folder, use_safetensors=True)
    common = ["--do_predict", "--train_checkpoint", str(folder), "--model", str(tiny_backbone_dir), "--task_dir",
              str(_task_dir(tmp_path / "data")), "--tasks", "alpha", "--max_output_length", "4", "--quiet",
              "--device", "cpu"]
    lora = ["--tune_method", "lora", "--lora_alpha", "8"]
    assert run_cli(tune.main, [*common, *lora, "--lora_r", "4", "--output_dir", str(tmp_path / "ok")]) == 0
    assert list((tmp_path / "ok" / "alpha").glob("predict_*/test_predictions.tsv"))
    capsys.readouterr()

    assert run_cli(tune.main, [*common, *lora, "--lora_r", "8", "--output_dir", str(tmp_path / "r8")]) == 2
    assert_one_line_error(capsys.readouterr().err, "made with method=lora lora_r=4 lora_alpha=8",
                          "this run uses method=lora lora_r=8 lora_alpha=8")

    # A module made for another backbone (d_model 128) is refused by its fingerprint.
    wide = tmp_path / "wide"
    save_adapterhub(DEFAULT_MODEL_DIR, LoRAConfig(r=4, alpha=8), wide, use_safetensors=True)
    argv = [*common, *lora, "--lora_r", "4", "--output_dir", str(tmp_path / "w")]
    argv[argv.index(str(folder))] = str(wide)
    assert run_cli(tune.main, argv) == 2
    assert_one_line_error(capsys.readouterr().err, "with d_model=128 num_layers=4 num_decoder_layers=4",
                          "this run's backbone has d_model=32")

    # A LoRA on k too is read as lora_targets q,k,v, and a run on the default targets refuses it by its sizes.
    qkv = tmp_path / "qkv"
    save_adapterhub(tiny_backbone_dir, LoRAConfig(r=4, alpha=8, attn_matrices=["q", "k", "v"]), qkv, True)
    argv[argv.index(str(wide))] = str(qkv)
    assert run_cli(tune.main, argv) == 2
    assert_one_line_error(capsys.readouterr().err, "made with method=lora lora_r=4 lora_alpha=8 lora_targets=q,k,v; "
                          "this run uses method=lora lora_r=4 lora_alpha=8")

    # A library config this project does not build (a layer left out) is named, not loaded half-way.
    odd = tmp_path / "odd"
    save_adapterhub(tiny_backbone_dir, LoRAConfig(r=4, alpha=8, leave_out=[0]), odd, True)
    argv[argv.index(str(qkv))] = str(odd)
    assert run_cli(tune.main, argv) == 2
    assert_one_line_error(capsys.readouterr().err, "adapter_config.json: an AdapterHub module this project cannot "
                          "load as is: leave_out=[0]")
    for name in ("r8", "w"):
        assert not (tmp_path / name).exists()


def test_adapterhub_folder_converts_with_full_fingerprint(tmp_path, tiny_backbone_dir, capsys):
    from adapters import DoubleSeqBnConfig

    folder, out = tmp_path / "saved", tmp_path / "converted"
    expected = save_adapterhub(tiny_backbone_dir, DoubleSeqBnConfig(reduction_factor=8), folder, False)
    code, err = convert([str(folder), str(out), "--model", str(tiny_backbone_dir)], capsys)
    assert code == 0, err
    tensors, meta = load_delta_checkpoint(out)
    assert meta["extra"]["source_format"] == "adapterhub"
    model, _ = load_backbone(tiny_backbone_dir)
    assert meta["backbone_fingerprint"] == backbone_fingerprint(model)
    assert torch.equal(logits(model_with(tiny_backbone_dir, CONFIGS["houlsby"], tensors)), expected)
