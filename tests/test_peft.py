"""PEFT interoperability: LoRA adapters trained with PEFT itself load here with PEFT's logits, modules of this
project load in PEFT with ours, a round trip is bit-identical, a poisoned pickle runs nothing, and every setting
this project cannot express is refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import peft  # a requirement: a broken install fails here rather than skipping
import pytest
import torch

from models.backbone import backbone_name, load_backbone
from models.delta import (
    DeltaConfig,
    attach_delta,
    backbone_fingerprint,
    delta_state_dict,
    load_delta_state,
    save_delta_checkpoint,
)
from models.formats import load_delta_checkpoint
from models.formats.peft import read_peft_folder
from models.formats.peft_export import export_peft
from tests.conftest import DEFAULT_MODEL_DIR
from utils.errors import UserInputError, run_cli

LORA = DeltaConfig("lora", lora_r=4, lora_alpha=8)
TEXTS = ["review: the film was a delight", "topic: the match ended in a draw", "is it true? the sky is green"]
TOLERANCE = 1e-5


def batch(tokenizer) -> dict[str, torch.Tensor]:
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    labels = tokenizer(["positive", "sports", "no"], return_tensors="pt", padding=True).input_ids
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels}


def our_logits(tensors: dict[str, torch.Tensor], cfg: DeltaConfig) -> torch.Tensor:
    model, tokenizer = load_backbone(DEFAULT_MODEL_DIR)
    attach_delta(model, cfg)
    load_delta_state(model, tensors, "test")
    model.eval()
    with torch.no_grad():
        return model(**batch(tokenizer)).logits


def peft_logits(folder: Path) -> torch.Tensor:
    base, tokenizer = load_backbone(DEFAULT_MODEL_DIR)
    model = peft.PeftModel.from_pretrained(base, str(folder))
    model.eval()
    with torch.no_grad():
        return model(**batch(tokenizer)).logits


def train_with_peft(out: Path, *, rslora: bool = False, safetensors: bool = True) -> Path:
    """A PEFT LoRA of the embedded default, trained a few steps by PEFT itself (so lora_B is not zero)."""
    base, tokenizer = load_backbone(DEFAULT_MODEL_DIR)
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], lora_dropout=0.0, use_rslora=rslora,
                             task_type="SEQ_2_SEQ_LM")
    model = peft.get_peft_model(base, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for _ in range(4):
        optimizer.zero_grad()
        model(**batch(tokenizer)).loss.backward()
        optimizer.step()
    model.save_pretrained(str(out), safe_serialization=safetensors)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peft")
    return {"safetensors": train_with_peft(root / "safetensors"),
            "bin": train_with_peft(root / "bin", safetensors=False),
            "rslora": train_with_peft(root / "rslora", rslora=True)}


@pytest.mark.parametrize("variant", ["safetensors", "bin", "rslora"])
def test_a_peft_adapter_gives_peft_s_logits_here(trained, variant) -> None:
    folder = trained[variant]
    assert (folder / ("adapter_model.bin" if variant == "bin" else "adapter_model.safetensors")).is_file()
    tensors, meta = load_delta_checkpoint(folder)  # the format is told by the config's peft_type
    assert meta["method"] == "lora" and meta["sizes"] == {"lora_r": 4, "lora_alpha": 8}
    assert meta["extra"]["source_format"] == "peft" and meta["extra"]["use_rslora"] == (variant == "rslora")
    mine, theirs = our_logits(tensors, DeltaConfig.from_checkpoint_meta(meta)), peft_logits(folder)
    assert (mine - theirs).abs().max() <= TOLERANCE
    assert (theirs - peft_logits_without_adapter()).abs().max() > 1e-3  # the adapter does change the logits


def peft_logits_without_adapter() -> torch.Tensor:
    model, tokenizer = load_backbone(DEFAULT_MODEL_DIR)
    model.eval()
    with torch.no_grad():
        return model(**batch(tokenizer)).logits


def our_checkpoint(path: Path, seed: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    """A LoRA checkpoint of this project with random, non-zero factors."""
    model, _ = load_backbone(DEFAULT_MODEL_DIR)
    attach_delta(model, LORA)
    g = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in delta_state_dict(model).items()}
    save_delta_checkpoint(path, tensors, LORA, backbone_name(DEFAULT_MODEL_DIR), backbone_fingerprint(model))
    return path, tensors


def test_a_module_of_this_project_exported_loads_in_peft_with_our_logits(tmp_path) -> None:
    from scripts import export_peft as script

    ckpt, tensors = our_checkpoint(tmp_path / "ours")
    assert run_cli(script.main, [str(ckpt), str(tmp_path / "peft")]) == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert (our_logits(tensors, LORA) - peft_logits(tmp_path / "peft")).abs().max() <= TOLERANCE


def test_a_fused_module_exported_loads_in_peft_with_our_logits(tmp_path) -> None:
    from unit_model.merging import fuse

    _, one = our_checkpoint(tmp_path / "one", seed=1)
    _, two = our_checkpoint(tmp_path / "two", seed=2)
    fused, _ = fuse([one, two], [0.7, 0.3], lora_scaling=LORA.spec.scaling(LORA.sizes()))
    model, _ = load_backbone(DEFAULT_MODEL_DIR)
    save_delta_checkpoint(tmp_path / "fused", fused, LORA, "default", backbone_fingerprint(model))
    export_peft(tmp_path / "fused", tmp_path / "peft")
    assert (our_logits(fused, LORA) - peft_logits(tmp_path / "peft")).abs().max() <= TOLERANCE


def test_ours_to_peft_to_ours_is_bit_identical(tmp_path) -> None:
    ckpt, tensors = our_checkpoint(tmp_path / "ours")
    export_peft(ckpt, tmp_path / "peft")
    back, meta = read_peft_folder(tmp_path / "peft")
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert DeltaConfig.from_checkpoint_meta(meta).sizes() == LORA.sizes()


def test_a_prefix_module_is_refused_with_the_reason(tmp_path) -> None:
    model, _ = load_backbone(DEFAULT_MODEL_DIR)
    cfg = DeltaConfig("prefix", prefix_length=2, prefix_mlp=8)
    attach_delta(model, cfg)
    save_delta_checkpoint(tmp_path / "prefix", delta_state_dict(model), cfg, "default", backbone_fingerprint(model))
    with pytest.raises(UserInputError, match="decoder's self-attention and is wrong under generate"):
        export_peft(tmp_path / "prefix", tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


class Sentinel:
    """Unpickling this would create a file: the restricted loader must refuse before that happens."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_poisoned_adapter_model_bin_runs_nothing(trained, tmp_path) -> None:
    folder = tmp_path / "poisoned"
    shutil.copytree(trained["bin"], folder)
    sentinel = tmp_path / "sentinel"
    torch.save({"base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": Sentinel(sentinel)},
               folder / "adapter_model.bin")
    with pytest.raises(UserInputError, match="refused: unpickling it would import and call"):
        load_delta_checkpoint(folder)
    assert not sentinel.exists()
    torch.load(folder / "adapter_model.bin", weights_only=False)  # the poison is live: an unrestricted load runs it
    assert sentinel.exists()


def edited(trained: dict[str, Path], tmp_path: Path, **changes) -> Path:
    folder = tmp_path / "edited"
    shutil.copytree(trained["safetensors"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("changes, message", [
    ({"target_modules": ["q", "k", "v", "o"]}, "a LoRA of 'o', which AdapterHub's LoRA does not reach"),
    ({"target_modules": ["q", "wi_0"]}, "a LoRA of 'wi_0', which AdapterHub's LoRA does not reach"),
    ({"target_modules": "q|v"}, "target_modules='q|v'"),
    ({"use_dora": True}, "use_dora=True (DoRA"),
    ({"rank_pattern": {"encoder.block.0.layer.0.SelfAttention.q": 8}}, "rank_pattern="),
    ({"peft_type": "PREFIX_TUNING"}, "peft_type 'PREFIX_TUNING'"),
])
def test_what_this_project_cannot_express_is_refused_in_one_line(trained, tmp_path, changes, message) -> None:
    folder = edited(trained, tmp_path, **changes)
    with pytest.raises(UserInputError, match="adapter_config.json") as e:
        load_delta_checkpoint(folder)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_weights_of_a_projection_the_config_does_not_target_are_named(trained, tmp_path) -> None:
    folder = edited(trained, tmp_path, target_modules=["q", "k"])  # the weights are of q and v
    with pytest.raises(UserInputError, match=r"adapter_model.safetensors: tensor .*\.v\.lora_A\.weight' is not the "
                                             r"lora_A or lora_B weight of a projection its config targets \(k, q\)"):
        load_delta_checkpoint(folder)


def test_a_missing_weights_file_and_a_config_that_is_not_json_are_named(trained, tmp_path) -> None:
    folder = edited(trained, tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(UserInputError, match="PEFT adapter without weights"):
        load_delta_checkpoint(folder)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(UserInputError, match="adapter_config.json"):
        load_delta_checkpoint(folder)


def test_a_peft_adapter_of_another_base_model_is_refused_unless_allowed(trained, tmp_path) -> None:
    """tune.py --train_checkpoint with an adapter of google/flan-t5-large on the embedded default."""
    import tune

    folder = edited(trained, tmp_path, base_model_name_or_path="google/flan-t5-large")
    argv = ["--tasks", "sent_review", "--model", str(DEFAULT_MODEL_DIR), "--output_dir", str(tmp_path / "out"),
            "--tune_method", "lora", "--lora_r", "4", "--lora_alpha", "8", "--train_checkpoint", str(folder),
            "--do_train", "--train_iters", "1", "--valid_interval", "1", "--device", "cpu"]
    with pytest.raises(UserInputError, match="'google/flan-t5-large'.*--allow_other_backbone"):
        tune.main(argv)
    assert not (tmp_path / "out").exists()
    assert run_cli(tune.main, [*argv, "--allow_other_backbone"]) == 0  # on purpose: accepted
    log = next((tmp_path / "out" / "sent_review").glob("lr_*/log.txt")).read_text()
    assert "initialisation from" in log


def test_a_folder_of_peft_adapters_with_sources_tsv_is_a_source_pool(tmp_path) -> None:
    """A module library (PEFT folders named peft-{task}, mapped by sources.tsv) runs through score.py and
    unit_model_others.py, and the fused module goes out as a PEFT adapter with the same logits."""
    from get_similarity import score
    from unit_model import unit_model_others

    library = tmp_path / "library"
    for seed, task in enumerate(("sent_tweet", "topic_news"), start=1):
        ckpt, _ = our_checkpoint(tmp_path / "ours" / task, seed=seed)
        export_peft(ckpt, library / f"peft-{task}", base_model=str(DEFAULT_MODEL_DIR))
    (library / "sources.tsv").write_text("task\tfolder\nsent_tweet\tpeft-sent_tweet\ntopic_news\tpeft-topic_news\n")
    common = ["--model", str(DEFAULT_MODEL_DIR), "--device", "cpu"]
    assert run_cli(score.main, ["--delta", "lora", "--metric", "Loss", "--tasks", "sent_review", "--source_tasks",
                                "sent_tweet", "topic_news", "--source_ckpt_path", str(library), "--max_examples", "4",
                                "--output_dir", str(tmp_path / "similarity"), *common]) == 0
    rows = (tmp_path / "similarity" / "result.tsv").read_text().splitlines()
    assert {line.split("\t")[1] for line in rows[1:]} == {"sent_tweet", "topic_news"}
    assert run_cli(unit_model_others.main, [
        "--delta", "lora", "--tasks", "sent_review", "sent_tweet", "topic_news", "--targets", "sent_review",
        "--metric", "Loss", "--result_tsv", str(tmp_path / "similarity" / "result.tsv"), "--source_ckpt_path",
        str(library), "--save_ckpt_path", str(tmp_path / "fused"), "--export_peft", str(tmp_path / "peft_fused"),
        *common]) == 0
    fused, meta = load_delta_checkpoint(tmp_path / "fused" / "without_sent_review")
    assert sorted(meta["extra"]["sources"]) == ["sent_tweet", "topic_news"]
    exported = tmp_path / "peft_fused" / "without_sent_review"
    assert (our_logits(fused, LORA) - peft_logits(exported)).abs().max() <= TOLERANCE


def test_a_sources_tsv_without_the_task_is_named(tmp_path) -> None:
    from models.run_folders import source_path

    (tmp_path / "sources.tsv").write_text("task\tfolder\nsent_tweet\tpeft-sent_tweet\n")
    assert source_path(tmp_path, "sent_tweet") == tmp_path / "peft-sent_tweet"
    with pytest.raises(UserInputError, match=r"sources.tsv: no row for task 'topic_news'"):
        source_path(tmp_path, "topic_news")
    assert source_path(tmp_path / "elsewhere", "topic_news") == tmp_path / "elsewhere" / "topic_news"


def test_tune_py_export_peft_writes_the_trained_module_and_refuses_other_methods(tmp_path) -> None:
    import tune

    argv = ["--tasks", "sent_review", "--model", str(DEFAULT_MODEL_DIR), "--output_dir", str(tmp_path / "out"),
            "--tune_method", "lora", "--lora_r", "4", "--lora_alpha", "8", "--do_train", "--train_iters", "2",
            "--valid_interval", "1", "--learning_rate_list", "0.01", "--device", "cpu",
            "--export_peft", str(tmp_path / "peft")]
    assert run_cli(tune.main, argv) == 0
    run = next((tmp_path / "out" / "sent_review").glob("lr_*"))
    tensors, _ = load_delta_checkpoint(run / "checkpoint")
    exported = tmp_path / "peft" / "sent_review" / run.name
    assert (our_logits(tensors, LORA) - peft_logits(exported)).abs().max() <= TOLERANCE
    adapter = [*argv[:argv.index("--tune_method")], "--tune_method", "adapter", "--do_train", "--export_peft",
               str(tmp_path / "peft2")]
    with pytest.raises(UserInputError, match="--export_peft: adapter modules cannot be written as PEFT adapters"):
        tune.main(adapter)


def test_the_converter_turns_a_peft_folder_into_a_checkpoint_of_this_project(trained, tmp_path) -> None:
    from scripts import convert_legacy_ckpt

    out = tmp_path / "converted"
    assert run_cli(convert_legacy_ckpt.main, [str(trained["rslora"]), str(out), "--model", str(DEFAULT_MODEL_DIR),
                                              "--task", "sent_review"]) == 0
    tensors, meta = load_delta_checkpoint(out)
    expected, _ = read_peft_folder(trained["rslora"])
    assert tensors.keys() == expected.keys() and all(torch.equal(tensors[k], expected[k]) for k in tensors)
    assert meta["extra"]["source_format"] == "peft" and "weights" in meta["backbone_fingerprint"]
    assert (our_logits(tensors, LORA) - peft_logits(trained["rslora"])).abs().max() <= TOLERANCE


# The projections people target, as far as AdapterHub's LoRA reaches them (models/backbones/: lora_modules).
REACHABLE = {"seq2seq": ["q", "k", "v", "wi_1", "wo"], "causal": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]}


def family_logits(model, tokenizer, family: str) -> torch.Tensor:
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    kwargs = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}
    if family == "seq2seq":
        kwargs["labels"] = tokenizer(["positive", "sports", "no"], return_tensors="pt", padding=True).input_ids
    model.eval()
    with torch.no_grad():
        return model(**kwargs).logits


@pytest.mark.parametrize("family", ["seq2seq", "causal"])
def test_a_peft_lora_of_every_reachable_projection_round_trips_with_peft_s_logits(family, request, tmp_path) -> None:
    """Import: a PEFT LoRA on q, k, v and both feed-forward projections gives PEFT's logits here. Export: the same
    module written back loads in PEFT with this project's logits. Both families, within 1e-5."""
    folder = request.getfixturevalue("tiny_backbone_dir" if family == "seq2seq" else "tiny_causal_dir")
    base, tokenizer = load_backbone(folder)
    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=REACHABLE[family], lora_dropout=0.0,
                             init_lora_weights=False,  # random B: the adapter acts from the start
                             task_type="SEQ_2_SEQ_LM" if family == "seq2seq" else "CAUSAL_LM")
    peft_model = peft.get_peft_model(base, config)
    peft_model.save_pretrained(str(tmp_path / "theirs"))
    theirs = family_logits(peft_model, tokenizer, family)

    tensors, meta = load_delta_checkpoint(tmp_path / "theirs")
    assert meta["sizes"] == {"lora_r": 2, "lora_alpha": 4, "lora_targets": "q,k,v,intermediate,output"}
    model, _ = load_backbone(folder)
    cfg = DeltaConfig.from_checkpoint_meta(meta)
    attach_delta(model, cfg)
    load_delta_state(model, tensors, "test")
    mine = family_logits(model, tokenizer, family)
    assert (mine - theirs).abs().max() <= TOLERANCE
    bare, _ = load_backbone(folder)
    assert (mine - family_logits(bare, tokenizer, family)).abs().max() > 1e-3

    save_delta_checkpoint(tmp_path / "ours", tensors, cfg, backbone_name(folder), backbone_fingerprint(model))
    export_peft(tmp_path / "ours", tmp_path / "exported")
    written = json.loads((tmp_path / "exported" / "adapter_config.json").read_text())
    assert written["target_modules"] == sorted(REACHABLE[family])
    assert written["task_type"] == ("SEQ_2_SEQ_LM" if family == "seq2seq" else "CAUSAL_LM")
    again = peft.PeftModel.from_pretrained(load_backbone(folder)[0], str(tmp_path / "exported"))
    assert (family_logits(again, tokenizer, family) - mine).abs().max() <= TOLERANCE


@pytest.mark.parametrize("target", ["o_proj", "gate_proj"])
def test_a_llama_lora_of_a_projection_adapterhub_does_not_reach_is_refused(target, tiny_causal_dir, tmp_path):
    base, _ = load_backbone(tiny_causal_dir)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", target], task_type="CAUSAL_LM")
    peft.get_peft_model(base, config).save_pretrained(str(tmp_path / "peft"))
    with pytest.raises(UserInputError, match=rf"adapter_config.json: target_modules=.*a LoRA of '{target}', which "
                                             "AdapterHub's LoRA does not reach"):
        load_delta_checkpoint(tmp_path / "peft")
