"""Delta modules on a random tiny T5: trainable set, neutral start, checkpoints, refusals, groups."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from models.backbone import backbone_name, load_backbone
from models.delta import (
    DELTA_NAME,
    DeltaConfig,
    attach_delta,
    backbone_fingerprint,
    check_compatible,
    delta_state_dict,
    load_delta_state,
    param_group,
    save_delta_checkpoint,
)
from models.formats import load_delta_checkpoint
from models.methods.adapter import reduction_factor
from utils.errors import UserInputError

REPO = Path(__file__).resolve().parent.parent
D, L_ENC, L_DEC, HEADS, D_KV = 32, 2, 2, 2, 16

# One config per method (prefix kept short so the tests stay fast).
CONFIGS = {
    "houlsby": DeltaConfig("adapter", adapter_type="houlsby", adapter_size=12),
    "pfeiffer": DeltaConfig("adapter", adapter_type="pfeiffer", adapter_size=12),
    "lora": DeltaConfig("lora", lora_r=10, lora_alpha=16),
    "prefix": DeltaConfig("prefix", prefix_length=6, prefix_mlp=24),
}


def tiny_config(**over: int) -> T5Config:
    kw = dict(
        vocab_size=64, d_model=D, d_ff=64, num_layers=L_ENC, num_decoder_layers=L_DEC, num_heads=HEADS,
        d_kv=D_KV, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    kw.update(over)
    return T5Config(**kw)


def backbone(seed: int = 0, **over: int) -> T5ForConditionalGeneration:
    """Frozen eval-mode backbone, as load_backbone returns it."""
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(tiny_config(**over)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def with_delta(cfg: DeltaConfig, init_seed: int = 1) -> T5ForConditionalGeneration:
    model = backbone()
    torch.manual_seed(init_seed)
    attach_delta(model, cfg)
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return torch.randint(2, 64, (3, 7), generator=g), torch.randint(2, 64, (3, 5), generator=g)


def logits(model: T5ForConditionalGeneration) -> torch.Tensor:
    ids, labels = batch()
    with torch.no_grad():
        return model(input_ids=ids, labels=labels).logits


def generate(model: T5ForConditionalGeneration, **kw: object) -> torch.Tensor:
    ids, _ = batch()
    return model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, eos_token_id=None, **kw)


def sgd_step(model: T5ForConditionalGeneration, lr: float = 0.5) -> None:
    ids, labels = batch()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    model(input_ids=ids, labels=labels).loss.backward()
    opt.step()
    opt.zero_grad()


def expected_count(name: str) -> int:
    """Trainable parameter counts worked out by hand from the module shapes."""
    cfg = CONFIGS[name]
    if name in ("houlsby", "pfeiffer"):
        per = 2 * D * cfg.adapter_size + cfg.adapter_size + D  # down W+b, up W+b
        # Houlsby: after self-attention and after the FFN; Pfeiffer: after the FFN only.
        n = 2 * (L_ENC + L_DEC) if name == "houlsby" else L_ENC + L_DEC
        return n * per
    if name == "lora":
        # q and v in encoder self-attention, decoder self-attention and decoder cross-attention.
        n_matrices = 2 * L_ENC + 2 * 2 * L_DEC
        return n_matrices * 2 * cfg.lora_r * D  # A: r x d, B: d x r (inner dim heads*d_kv == d here)
    out = lambda layers: layers * 2 * HEADS * D_KV  # noqa: E731 - keys and values of every layer
    mlp = lambda layers: cfg.prefix_mlp * D + cfg.prefix_mlp + cfg.prefix_mlp * out(layers) + out(layers)  # noqa: E731
    # encoder self-attention, decoder self-attention, decoder cross-attention prefixes
    return sum(cfg.prefix_length * D + mlp(n) for n in (L_ENC, L_DEC, L_DEC))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_only_delta_trainable_with_expected_count(name: str) -> None:
    model = backbone()
    names = attach_delta(model, CONFIGS[name])
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert names == trainable
    assert all(f".{DELTA_NAME}." in n for n in names)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected_count(name)
    assert not model.training  # attach_delta keeps eval mode (train_adapter would switch to train)
    state = delta_state_dict(model)
    assert sorted(state) == names
    if CONFIGS[name].method == "adapter":
        downs = [t for n, t in state.items() if n.endswith("adapter_down.0.weight")]
        assert downs and all(t.shape == (CONFIGS[name].adapter_size, D) for t in downs)


@pytest.mark.parametrize("size", [1, 5, 7, 11, 31, 33, 48])
def test_adapter_size_is_exact_bottleneck_width(size: int) -> None:
    model = backbone()
    attach_delta(model, DeltaConfig("adapter", adapter_type="pfeiffer", adapter_size=size))
    downs = [t for n, t in delta_state_dict(model).items() if n.endswith("adapter_down.0.weight")]
    assert {tuple(t.shape) for t in downs} == {(size, D)}


def test_reduction_factor_exact_for_all_widths() -> None:
    # d_model / size alone fails e.g. for 5 // (5 / 3) == 2.0; the half-unit margin must always hit.
    for d in range(1, 1025, 7):
        for size in range(1, 2 * d + 1):
            assert int(d // reduction_factor(d, size)) == size


@pytest.mark.parametrize("name", ["houlsby", "pfeiffer", "lora"])
def test_adapter_and_lora_start_neutral(name: str) -> None:
    # Two computation paths (the delta's layers add an exact zero through other kernels), so they agree to float32
    # rounding, bitwise only on some CPUs. assert_close's float32 defaults (rtol 1.3e-6, atol 1e-5) allow a few
    # ulps; a delta that is not neutral (LoRA with AdapterHub's "bert" init of B, say) moves them by ~0.1.
    torch.testing.assert_close(logits(with_delta(CONFIGS[name])), logits(backbone()))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_load_roundtrip_is_bitwise(name: str, tmp_path: Path) -> None:
    cfg = CONFIGS[name]
    trained = with_delta(cfg, init_seed=1)
    sgd_step(trained)
    state = delta_state_dict(trained)
    fp = backbone_fingerprint(trained)
    ckpt = save_delta_checkpoint(
        tmp_path / "ckpt", state, cfg, "tiny", fp,
        task="rte", metric="acc", score=0.5, step=7, extra={"w": [1.0]},
    )
    assert sorted(p.name for p in ckpt.iterdir()) == ["delta.safetensors", "delta_config.json"]

    tensors, meta = load_delta_checkpoint(ckpt)
    assert meta["method"] == cfg.method and meta["sizes"] == cfg.sizes() and meta["step"] == 7
    assert meta["backbone"] == "tiny" and meta["backbone_fingerprint"] == fp and meta["extra"] == {"w": [1.0]}
    assert DeltaConfig.from_checkpoint_meta(meta) == DeltaConfig(cfg.method, **cfg.sizes())
    check_compatible(meta, cfg, fp, str(ckpt))

    fresh = with_delta(cfg, init_seed=99)  # different initial delta weights
    load_delta_state(fresh, tensors, str(ckpt))
    reloaded = delta_state_dict(fresh)
    assert sorted(reloaded) == sorted(state)
    assert all(torch.equal(reloaded[k], state[k]) for k in state)
    assert torch.equal(logits(fresh), logits(trained))
    assert torch.equal(generate(fresh), generate(trained))


def test_prefix_learns_and_generates_with_cache() -> None:
    model = with_delta(CONFIGS["prefix"])
    before = logits(model)
    sgd_step(model)
    assert not torch.equal(logits(model), before)
    assert generate(model).shape == (3, 6)
    # The prefix must also be applied consistently to the decoder's key/value cache. Cached and uncached decoding
    # are two computation paths, so their step scores agree to float32 rounding (assert_close's defaults), and a
    # prefix missing from the cache would move them by far more; greedy tokens follow the scores.
    cached = model.generate(input_ids=batch()[0], max_new_tokens=5, do_sample=False, eos_token_id=None,
                            output_scores=True, return_dict_in_generate=True)
    uncached = model.generate(input_ids=batch()[0], max_new_tokens=5, do_sample=False, eos_token_id=None,
                              output_scores=True, return_dict_in_generate=True, use_cache=False)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(uncached.scores))


def _saved(tmp_path: Path, cfg: DeltaConfig) -> tuple[Path, dict]:
    model = with_delta(cfg)
    fp = backbone_fingerprint(model)
    path = save_delta_checkpoint(tmp_path / "src", delta_state_dict(model), cfg, "tiny", fp)
    return path, load_delta_checkpoint(path)[1]


def test_refuses_other_method_sizes_or_backbone(tmp_path: Path) -> None:
    path, meta = _saved(tmp_path, DeltaConfig("lora", lora_r=8))
    fp = backbone_fingerprint(backbone())
    p = re.escape(str(path))
    made = rf"checkpoint {p} was made with method=lora lora_r=8 lora_alpha=16; this run uses"
    with pytest.raises(UserInputError, match=rf"{made} method=adapter adapter_type=houlsby adapter_size=12$"):
        check_compatible(meta, DeltaConfig("adapter"), fp, str(path))
    with pytest.raises(UserInputError, match=rf"{made} method=lora lora_r=10 lora_alpha=16$"):
        check_compatible(meta, DeltaConfig("lora", lora_r=10), fp, str(path))
    other_fp = backbone_fingerprint(backbone(num_layers=3))
    with pytest.raises(UserInputError, match=rf"{p}.*num_layers=2.*num_layers=3"):
        check_compatible(meta, DeltaConfig("lora", lora_r=8), other_fp, str(path))
    # Same for adapter type, which is part of the adapter's sizes.
    path2, meta2 = _saved(tmp_path / "b", DeltaConfig("adapter", adapter_type="pfeiffer"))
    with pytest.raises(UserInputError, match="adapter_type=pfeiffer.*adapter_type=houlsby"):
        check_compatible(meta2, DeltaConfig("adapter"), fp, str(path2))


def test_load_state_refuses_missing_unexpected_or_misshaped(tmp_path: Path) -> None:
    model = with_delta(CONFIGS["lora"])
    state = delta_state_dict(model)
    first = sorted(state)[0]
    with pytest.raises(UserInputError, match=rf"ck\.safetensors: delta weights do not fit.*missing.*{first}"):
        load_delta_state(model, {k: v for k, v in state.items() if k != first}, "ck.safetensors")
    with pytest.raises(UserInputError, match="unexpected keys.*bogus"):
        load_delta_state(model, {**state, "bogus": torch.zeros(1)}, "ck.safetensors")
    with pytest.raises(UserInputError, match="wrong shape"):
        load_delta_state(model, {**state, first: torch.zeros(3, 3)}, "ck.safetensors")
    # A LoRA checkpoint into an adapter model: every key differs.
    with pytest.raises(UserInputError, match="missing keys"):
        load_delta_state(with_delta(CONFIGS["houlsby"]), state, "ck.safetensors")


def test_corrupt_or_incomplete_checkpoints(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path, CONFIGS["lora"])
    weights, config = path / "delta.safetensors", path / "delta_config.json"
    raw_json = config.read_text()

    with pytest.raises(UserInputError, match="not found"):
        load_delta_checkpoint(tmp_path / "nope")
    config.write_text("{not json")
    with pytest.raises(UserInputError, match=rf"{re.escape(str(config))}: not a readable JSON file"):
        load_delta_checkpoint(path)
    config.write_text('{"method": "lora"}')
    with pytest.raises(UserInputError, match=rf"{re.escape(str(config))}: missing keys.*format_version"):
        load_delta_checkpoint(path)
    config.unlink()
    with pytest.raises(UserInputError, match=rf"{re.escape(str(config))}: missing"):
        load_delta_checkpoint(path)
    config.write_text(raw_json)

    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    expected = re.escape(f"{weights}: not a valid safetensors file (truncated or corrupt?)")
    with pytest.raises(UserInputError, match=expected):
        load_delta_checkpoint(path)
    weights.unlink()
    with pytest.raises(UserInputError, match=rf"{re.escape(str(weights))}: missing"):
        load_delta_checkpoint(path)


def test_atomic_save_replaces_existing_checkpoint(tmp_path: Path) -> None:
    cfg = CONFIGS["houlsby"]
    model = with_delta(cfg)
    fp = backbone_fingerprint(model)
    target = tmp_path / "best"
    save_delta_checkpoint(target, delta_state_dict(model), cfg, "tiny", fp, step=1)
    sgd_step(model)
    new_state = delta_state_dict(model)
    save_delta_checkpoint(target, new_state, cfg, "tiny", fp, step=2)
    assert [p.name for p in tmp_path.iterdir()] == ["best"]  # no temp or old folders left beside it
    tensors, meta = load_delta_checkpoint(target)
    assert meta["step"] == 2 and all(torch.equal(tensors[k], new_state[k]) for k in new_state)

    # A folder that is not a checkpoint is never replaced.
    other = tmp_path / "results"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(UserInputError, match="not a delta checkpoint"):
        save_delta_checkpoint(other, new_state, cfg, "tiny", fp)
    assert (other / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "results"]


@pytest.mark.parametrize(
    ("name", "blocks", "layers"),
    [
        ("houlsby", {"encoder", "decoder"}, {"encoder.0", "encoder.1", "decoder.0", "decoder.1"}),
        ("pfeiffer", {"encoder", "decoder"}, {"encoder.0", "encoder.1", "decoder.0", "decoder.1"}),
        ("lora", {"encoder", "decoder"}, {"encoder.0", "encoder.1", "decoder.0", "decoder.1"}),
        ("prefix", {"encoder", "decoder"}, {"encoder.prefix", "decoder.self_prefix", "decoder.cross_prefix"}),
    ],
)
def test_param_groups_on_real_names(name: str, blocks: set[str], layers: set[str]) -> None:
    names = attach_delta(backbone(), CONFIGS[name])
    assert {param_group(n, "model") for n in names} == {"model"}
    assert {param_group(n, "block") for n in names} == blocks
    assert {param_group(n, "layer") for n in names} == layers
    for n in names:  # a layer group always sits inside its block group
        assert param_group(n, "layer").split(".")[0] == param_group(n, "block")
    if name == "lora":  # cross-attention LoRA belongs to its decoder layer
        cross = [n for n in names if "EncDecAttention" in n and ".block.1." in n]
        assert cross and {param_group(n, "layer") for n in cross} == {"decoder.1"}
    with pytest.raises(ValueError, match="granularity"):
        param_group(names[0], "head")
    with pytest.raises(ValueError, match="not inside"):
        param_group("shared.weight", "layer")


def test_config_validation_and_dicts() -> None:
    for bad in (
        DeltaConfig("bitfit"),
        DeltaConfig("adapter", adapter_type="compacter"),
        DeltaConfig("lora", lora_r=0),
        DeltaConfig("prefix", prefix_mlp=-3),
    ):
        with pytest.raises(UserInputError):
            bad.validate()
    cfg = DeltaConfig("prefix", prefix_length=7)
    assert DeltaConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.sizes() == {"prefix_length": 7, "prefix_mlp": 24}
    with pytest.raises(UserInputError, match="unknown keys"):
        DeltaConfig.from_dict({"method": "lora", "rank": 4})


# ---------------------------------------------------------------------------------------------- backbone


def _save_tiny_backbone(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, 64)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = dict(pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    backbone().save_pretrained(folder)
    fast.save_pretrained(folder)


def test_load_backbone_local_folder_and_errors(tmp_path: Path) -> None:
    folder = tmp_path / "tiny-t5"
    _save_tiny_backbone(folder)
    model, tok = load_backbone(folder)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert torch.equal(logits(model), logits(backbone()))
    assert tok("w3 w4").input_ids[:2] == [3, 4]
    assert backbone_name(folder) == "tiny-t5" and backbone_name(f"{folder}/") == "tiny-t5"
    assert backbone_name("google/t5-v1_1-base") == "t5-v1_1-base"

    with pytest.raises(UserInputError, match="folder not found"):
        load_backbone(tmp_path / "missing")
    with pytest.raises(UserInputError, match="folder not found"):
        load_backbone("./no/such/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="config.json"):
        load_backbone(tmp_path / "empty")
    # A separate tokenizer folder holding only tokenizer.json resolves through the model's config.
    (tmp_path / "tok").mkdir()
    (folder / "tokenizer.json").rename(tmp_path / "tok" / "tokenizer.json")
    with pytest.raises(UserInputError, match=r"--model .*tiny-t5: no tokenizer files"):
        load_backbone(folder)
    _, tok2 = load_backbone(folder, tokenizer_path=tmp_path / "tok")
    assert tok2("w3 w4").input_ids[:2] == [3, 4]
    with pytest.raises(UserInputError, match="--tokenizer_path .*: folder not found"):
        load_backbone(folder, tokenizer_path=tmp_path / "no-tok")


@pytest.mark.cli
def test_uncached_hub_id_offline_is_one_line_error(tmp_path: Path) -> None:
    # HF reads HF_HUB_OFFLINE at import time, so check it in a fresh interpreter with an empty cache.
    code = (
        "from utils.errors import UserInputError\n"
        "from models.backbone import load_backbone\n"
        "try:\n    load_backbone('nobody-here/not-a-model')\n"
        "except UserInputError as e:\n    print(e)\n    raise SystemExit(2)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1 and "nobody-here/not-a-model" in lines[0] and "offline" in lines[0]
