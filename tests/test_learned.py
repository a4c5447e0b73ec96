"""Learned fusion weights (unit_model_learned.py): a planted mixture is recovered, only the train split is read,
a seed gives the same weights, and bad settings are one-line errors."""

from __future__ import annotations

import csv
from pathlib import Path

import nevergrad  # noqa: F401  (a requirement: a broken install fails here rather than skipping)
import pytest
import torch

from models.backbone import backbone_name, load_backbone
from models.delta import DeltaConfig, attach_delta, backbone_fingerprint, delta_state_dict, save_delta_checkpoint
from unit_model import unit_model_learned
from unit_model.merging import fuse
from utils.errors import UserInputError, run_cli

LORA = DeltaConfig("lora", lora_r=4, lora_alpha=8)
SOURCES = ["s_one", "s_two", "s_three", "s_four"]
TARGET = "planted"
INPUTS = [f"word{i} word{(7 * i) % 13} word{(3 * i) % 11}" for i in range(16)]


def read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.fixture(scope="module")
def planted(tiny_backbone_dir: Path, tmp_path_factory) -> dict:
    """Four random LoRA sources; the target's train outputs are what 0.6·s_one + 0.4·s_two generates."""
    from dataloader.crossfit import Example
    from models.examples import encode_examples, generate

    root = tmp_path_factory.mktemp("planted")
    model, tokenizer = load_backbone(tiny_backbone_dir)
    torch.manual_seed(0)
    attach_delta(model, LORA)
    g = torch.Generator().manual_seed(1)
    modules = {s: {k: torch.randn(v.shape, generator=g) * 0.8 for k, v in delta_state_dict(model).items()}
               for s in SOURCES}
    for s, tensors in modules.items():
        save_delta_checkpoint(root / "sources" / s, tensors, LORA, backbone_name(tiny_backbone_dir),
                              backbone_fingerprint(model), task=s)
    mixed, _ = fuse([modules["s_one"], modules["s_two"]], [0.6, 0.4], lora_scaling=2.0)
    from models.delta import load_delta_state

    load_delta_state(model, mixed, "planted")
    encoded = encode_examples(tokenizer, [Example(x, ["x"]) for x in INPUTS], 64, 8)
    outputs = generate(model, tokenizer, encoded, 16, 6)
    data = root / "data"
    data.mkdir()
    (data / "task_metrics.tsv").write_text("task\tmetric\n" + "".join(f"{t}\tEM\n" for t in (TARGET, *SOURCES)))
    for task in (TARGET, *SOURCES):
        (data / task).mkdir(parents=True)
        for split in ("train", "dev", "test"):
            lines = "".join(f"{x}\t{y or 'none'}\n" for x, y in zip(INPUTS, outputs))
            (data / task / f"{task}_16_100_{split}.tsv").write_text(lines, encoding="utf-8")
    return {"root": root, "data": data}


def learned_argv(w: dict, backbone: Path, out: str, *extra: str) -> list[str]:
    return ["--tasks", TARGET, *SOURCES, "--targets", TARGET, "--source_ckpt_path", str(w["root"] / "sources"),
            "--save_ckpt_path", str(w["root"] / out), "--model", str(backbone), "--task_dir", str(w["data"]),
            "--device", "cpu", *extra]


def test_a_planted_mixture_is_recovered() -> None:
    """The target's module is 0.6·θ_one + 0.4·θ_two and its loss the distance of the merged module to it: from
    zeros, LoraHub's budget of 40 evaluations puts at least 0.8 of the weights' mass on those two sources."""
    from unit_model.learned import SearchSettings, learn_weights
    from unit_model.weightings.base import Plan

    g = torch.Generator().manual_seed(0)
    theta = {s: torch.randn(64, generator=g, dtype=torch.float64) for s in SOURCES}
    planted = 0.6 * theta["s_one"] + 0.4 * theta["s_two"]
    plan = Plan(TARGET, SOURCES, [], {s: {"model": 0.0} for s in SOURCES})

    def merged(plan: Plan, weights: dict[str, dict[str, float]]) -> dict[str, torch.Tensor]:
        return {"x": sum(weights[s]["model"] * theta[s] for s in plan.sources)}

    def distance(target: str, tensors: dict[str, torch.Tensor]) -> float:
        return float((tensors["x"] - planted).square().mean())

    learn_weights([plan], SearchSettings(), merged, distance)
    w = {s: plan.weights[s]["model"] for s in SOURCES}
    mass = (abs(w["s_one"]) + abs(w["s_two"])) / sum(abs(v) for v in w.values())
    assert mass >= 0.8, w
    assert len(plan.search) == 40 and plan.search[-1][2] < plan.search[0][1]  # the best objective went down
    assert all(abs(v) <= 1.5 for v in w.values())  # LoraHub's bounds


def test_the_script_writes_weights_and_the_search_curve(planted, tiny_backbone_dir) -> None:
    assert run_cli(unit_model_learned.main, learned_argv(planted, tiny_backbone_dir, "learned", "--budget", "10")) == 0
    weights = read(planted["root"] / "learned" / "weights.tsv")
    assert {r["source"] for r in weights} == set(SOURCES) and all(r["score"] == "-" for r in weights)
    search = read(planted["root"] / "learned" / "search.tsv")
    assert [int(r["evaluation"]) for r in search] == list(range(1, 11))
    assert float(search[-1]["best"]) == min(float(r["objective"]) for r in search)
    assert (planted["root"] / "learned" / "search.png").is_file()


def test_the_search_reads_only_the_train_split_and_is_deterministic(planted, tiny_backbone_dir) -> None:
    argv = ["--budget", "12", "--learned_start", "uniform"]
    assert run_cli(unit_model_learned.main, learned_argv(planted, tiny_backbone_dir, "first", *argv)) == 0
    first = read(planted["root"] / "first" / "weights.tsv")
    for split in ("dev", "test"):  # poison the held-out splits: nothing may change
        path = planted["data"] / TARGET / f"{TARGET}_16_100_{split}.tsv"
        path.write_bytes(b"\xff not a tsv line\n")
    assert run_cli(unit_model_learned.main, learned_argv(planted, tiny_backbone_dir, "second", *argv)) == 0
    assert read(planted["root"] / "second" / "weights.tsv") == first
    assert read(planted["root"] / "second" / "search.tsv") == read(planted["root"] / "first" / "search.tsv")


@pytest.mark.parametrize("flag, value, message", [("--budget", "-3", "--budget: expected a positive integer"),
                                                  ("--l1", "-1", "--l1: expected zero or a positive finite number"),
                                                  ("--top_k", "2", "--top_k and --tem auto apply"),
                                                  ("--search_lr", "0", "--search_lr: expected a positive")])
def test_bad_settings_are_refused_before_anything_is_written(planted, tiny_backbone_dir, flag, value, message):
    with pytest.raises(UserInputError, match=message):
        unit_model_learned.main(learned_argv(planted, tiny_backbone_dir, "bad", flag, value))
    assert not (planted["root"] / "bad").exists()


def test_the_differentiable_merge_is_the_linear_merge() -> None:
    """origin + lam·Σ w (θ - origin) per tensor, as fuse computes it (IA³: origin 1, weights not summing to 1)."""
    from models.methods import get_method
    from unit_model.merges import merge_settings_from
    from unit_model.merging import linear_merge_graph

    g = torch.Generator().manual_seed(0)
    names = ["encoder.ia3_a", "decoder.ia3_b"]
    sources = [{n: torch.randn(3, 5, generator=g, dtype=torch.float64) for n in names} for _ in range(3)]
    weights = [0.7, -0.2, 0.9]
    ia3 = get_method("ia3")
    expected, _ = fuse(sources, weights, method=ia3, merge="task_arithmetic",
                       settings=merge_settings_from({"lam": 0.5}))
    got = linear_merge_graph(sources, torch.tensor(weights)[:, None], dict.fromkeys(names, 0), method=ia3, lam=0.5)
    for n in names:
        by_hand = 1 + 0.5 * sum(w * (s[n] - 1) for w, s in zip(weights, sources))
        torch.testing.assert_close(got[n], by_hand)
        torch.testing.assert_close(got[n], expected[n])


def test_the_differentiable_lora_merge_is_the_exact_delta_w(planted) -> None:
    """A LoRA pair becomes the stacked factors: B·A·scaling = scaling·lam·Σ w_s B_s A_s, untruncated."""
    from safetensors.torch import load_file

    from models.methods import get_method
    from unit_model.merging import linear_merge_graph

    lora = get_method("lora")
    sources = [load_file(planted["root"] / "sources" / s / "delta.safetensors") for s in SOURCES]
    pairs = lora.factor_pairs(sources[0])
    assert pairs
    weights = torch.tensor([[0.5], [-1.0], [0.25], [1.5]], dtype=torch.float64)
    got = linear_merge_graph(sources, weights, dict.fromkeys(sources[0], 0), method=lora, lam=2.0)
    for ka, kb in pairs.values():
        assert got[ka].shape[0] == got[kb].shape[1] == 4 * sources[0][ka].shape[0]  # rank N·r
        exact = sum(float(w) * 2.0 * s[kb].double() @ s[ka].double() for w, s in zip(weights[:, 0], sources))
        torch.testing.assert_close(got[kb].double() @ got[ka].double(), exact, rtol=1e-5, atol=1e-5)


def on_target(w: dict, backbone: Path):
    import dataclasses

    from unit_model.config import FusionConfig
    from unit_model.on_target import OnTarget

    config = FusionConfig(delta="lora", tasks=[TARGET, *SOURCES], targets=[TARGET], source_ckpt_path="-",
                          save_ckpt_path="-", model=str(backbone), task_dir=str(w["data"]), k=16, data_seed=100,
                          device="cpu")
    meta = {"method": "lora", "sizes": {"lora_r": 4, "lora_alpha": 8}}
    return OnTarget(dataclasses.replace(config, target_list=[TARGET]), meta, "train")


def test_the_gradient_objective_is_the_searched_one_and_its_gradient_is_right(planted, tiny_backbone_dir) -> None:
    """Where the merged ΔW has rank r (a source and a multiple of it), the differentiable loss equals the loss
    of the fused module that is written, and autograd's derivative matches a central difference."""
    from safetensors.torch import load_file

    from models.methods import get_method
    from unit_model.merging import linear_merge_graph

    lora = get_method("lora")
    one = load_file(planted["root"] / "sources" / "s_one" / "delta.safetensors")
    pairs = lora.factor_pairs(one)
    tripled = {k: v * 3 if k in {kb for _, kb in pairs.values()} else v for k, v in one.items()}
    sources = [one, tripled]
    train = on_target(planted, tiny_backbone_dir)
    group_of = dict.fromkeys(one, 0)

    def loss_at(values: list[float], grad: bool = False) -> torch.Tensor:
        x = torch.tensor([[v] for v in values], dtype=torch.float64, requires_grad=grad)
        return x, train.differentiable_loss(TARGET, linear_merge_graph(sources, x, group_of, method=lora))

    fused, info = fuse(sources, [0.2, 0.1], lora_scaling=2.0)
    assert info["lora_truncation_error"] < 1e-6
    _, value = loss_at([0.2, 0.1])
    assert float(value) == pytest.approx(train.loss(TARGET, fused), rel=1e-5)
    x, value = loss_at([0.2, 0.1], grad=True)
    value.backward()
    h = 1e-4  # the random sources are large: the loss curves fast in the weights
    for i in range(2):
        up, down = [0.2, 0.1], [0.2, 0.1]
        up[i] += h
        down[i] -= h
        central = (float(loss_at(up)[1]) - float(loss_at(down)[1])) / (2 * h)
        assert float(x.grad[i, 0]) == pytest.approx(central, rel=1e-2)


def test_the_gradient_optimizer_lowers_the_train_objective_and_writes_its_curve(planted, tiny_backbone_dir) -> None:
    argv = ["--optimizer", "gradient", "--budget", "15", "--search_lr", "0.1"]
    assert run_cli(unit_model_learned.main, learned_argv(planted, tiny_backbone_dir, "gradient", *argv)) == 0
    out = planted["root"] / "gradient"
    search = read(out / "search.tsv")
    assert [int(r["evaluation"]) for r in search] == list(range(1, 16))
    objectives = [float(r["objective"]) for r in search]
    assert float(search[-1]["best"]) == min(objectives) < objectives[0]  # descent from zeros went down
    weights = {r["source"]: float(r["weight"]) for r in read(out / "weights.tsv")}
    assert weights != dict.fromkeys(SOURCES, 0.0) and all(abs(v) <= 1.5 for v in weights.values())
    import json

    meta = json.loads((out / "without_planted" / "delta_config.json").read_text())
    assert meta["extra"]["search"]["optimizer"] == "gradient" and meta["extra"]["search"]["lr"] == 0.1


def test_the_gradient_optimizer_refuses_an_operator_without_a_gradient(planted, tiny_backbone_dir) -> None:
    with pytest.raises(UserInputError, match="--optimizer gradient: --merge ties has no gradient"):
        unit_model_learned.main(learned_argv(planted, tiny_backbone_dir, "bad", "--optimizer", "gradient",
                                             "--merge", "ties"))
    assert not (planted["root"] / "bad").exists()
