"""The delta-method registry (models/methods/): what each method declares, checked on a tiny random T5, and
(IA)³, the method added through it."""

from __future__ import annotations

import pytest
import torch

from models.delta import DeltaConfig, attach_delta, delta_state_dict, load_delta_state, param_group
from models.methods import METHODS, REGISTRY, get_method, method_of
from tests.test_delta import backbone, generate, logits, sgd_step, with_delta
from unit_model.merges import MergeOperator
from unit_model.merges.linear import linear
from unit_model.merging import fuse
from utils.errors import UserInputError

CONFIGS = {
    "adapter": DeltaConfig("adapter", adapter_size=4),
    "lora": DeltaConfig("lora", lora_r=3, lora_alpha=6),
    "prefix": DeltaConfig("prefix", prefix_length=3, prefix_mlp=8),
    "ia3": DeltaConfig("ia3"),
}


def test_every_registered_method_is_covered_here() -> None:
    assert sorted(CONFIGS) == sorted(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_sizes_read_back_from_the_tensors_and_the_method_told_by_the_names(method: str) -> None:
    cfg = CONFIGS[method]
    tensors = delta_state_dict(with_delta(cfg))
    spec = get_method(method)
    assert method_of(tensors, "test") is spec
    in_shapes = {f.name for f in spec.size_fields if f.in_shapes}
    assert spec.sizes_from_shapes({k: tuple(v.shape) for k, v in tensors.items()}, "test") == {
        k: cfg.values[k] for k in in_shapes}


@pytest.mark.parametrize("method", ["adapter", "lora", "ia3"])
def test_neutral_state_computes_the_backbone(method: str) -> None:
    model = with_delta(CONFIGS[method])
    sgd_step(model)  # move away from the library's initialisation first
    trained = delta_state_dict(model)
    assert not torch.allclose(logits(model), logits(backbone()))
    load_delta_state(model, REGISTRY[method].neutral_state(trained), "neutral")
    torch.testing.assert_close(logits(model), logits(backbone()), rtol=0, atol=1e-6)


def test_prefix_has_no_neutral_state() -> None:
    assert REGISTRY["prefix"].neutral_state(delta_state_dict(with_delta(CONFIGS["prefix"]))) is None


def test_ia3_is_rescaling_vectors_of_keys_values_and_ffn_starting_at_one() -> None:
    model = with_delta(CONFIGS["ia3"])
    tensors = delta_state_dict(model)
    assert tensors and all(k.endswith(".loras.delta.lora_B") and v.shape[1] == 1 for k, v in tensors.items())
    assert all(torch.equal(v, torch.ones_like(v)) for v in tensors.values())
    places = {k.split(".loras.")[0].rsplit(".", 1)[1] for k in tensors}
    assert places == {"k", "v", "wi"}  # keys and values of every attention, the FFN's intermediate activations
    assert any("EncDecAttention" in k for k in tensors)  # cross-attention is rescaled too
    assert torch.equal(generate(model), generate(backbone()))  # neutral at start, under generate() too
    assert {param_group(k, "layer") for k in tensors} == {"encoder.0", "encoder.1", "decoder.0", "decoder.1"}


def test_lora_and_ia3_share_storage_but_are_told_apart() -> None:
    lora = delta_state_dict(with_delta(CONFIGS["lora"]))
    ia3 = delta_state_dict(with_delta(CONFIGS["ia3"]))
    assert method_of(lora, "x").name == "lora" and method_of(ia3, "x").name == "ia3"
    with pytest.raises(UserInputError, match="several delta methods"):
        method_of({**lora, **{k.replace("loras", "adapters"): v for k, v in ia3.items()}}, "mixed")
    with pytest.raises(UserInputError, match="not a parameter"):
        method_of({"shared.weight": torch.zeros(1)}, "stranger")


def test_lora_task_vector_is_b_a_alpha_over_r() -> None:
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0], [-1.0]])  # r = 1, in 2, out 2
    key = "encoder.block.0.layer.0.SelfAttention.q.loras.delta."
    tv = REGISTRY["lora"].task_vector({key + "lora_A": a, key + "lora_B": b}, {"lora_r": 1, "lora_alpha": 4})
    assert list(tv) == [key]
    assert torch.equal(tv[key], torch.tensor([[12.0, 24.0], [-4.0, -8.0]], dtype=torch.float64))
    plain = {"x.adapters.delta.adapter_up.weight": torch.ones(2)}
    assert REGISTRY["adapter"].task_vector(plain, {}) == plain  # the others: the parameters themselves


@pytest.mark.parametrize("method", METHODS)
def test_a_merge_that_gathers_every_source_equals_the_streamed_linear_merge(method: str) -> None:
    sources = []
    for seed in range(3):
        model = with_delta(CONFIGS[method], init_seed=seed)
        sgd_step(model)
        sources.append(delta_state_dict(model))
    weights = [0.5, 0.3, 0.2]
    gathering = MergeOperator("gathered", linear, "the weighted sum, one tensor at a time")
    scaling = REGISTRY[method].scaling(CONFIGS[method].sizes())
    streamed, info1 = fuse(sources, weights, lora_scaling=scaling, method=REGISTRY[method])
    if method == "prefix":  # a prefix has no task vector: only the weighted sum merges it
        with pytest.raises(UserInputError, match="--merge gathered: prefix modules have no task vector"):
            fuse(sources, weights, lora_scaling=scaling, merge=gathering)
        return
    gathered, info2 = fuse(sources, weights, lora_scaling=scaling, merge=gathering)
    assert streamed.keys() == gathered.keys()
    pairs = REGISTRY[method].factor_pairs(streamed)
    paired = {k for pair in pairs.values() for k in pair}
    for k in streamed.keys() - paired:
        torch.testing.assert_close(gathered[k], streamed[k], rtol=1e-6, atol=1e-7)
    for ka, kb in pairs.values():  # the streamed sum takes the QR route, the gathered one the dense SVD: the
        # factors may differ by a rotation, the best rank-r update they make may not
        torch.testing.assert_close(gathered[kb] @ gathered[ka], streamed[kb] @ streamed[ka], rtol=1e-5, atol=1e-6)
    assert info1.keys() == info2.keys() == ({"lora_truncation_error", "lora_truncation_error_max"}
                                            if method == "lora" else set())
    if method == "ia3":  # no factors: the merge is the parameter average itself
        for k in streamed:
            torch.testing.assert_close(streamed[k], sum(w * s[k] for w, s in zip(weights, sources)))


def test_ia3_config_round_trips_and_refuses_sizes_of_its_own() -> None:
    cfg = DeltaConfig.from_dict({"method": "ia3"})
    assert cfg.sizes() == {} and cfg.describe() == "method=ia3"
    model = backbone()
    attach_delta(model, cfg)
    with pytest.raises(UserInputError, match="unknown keys"):
        DeltaConfig("ia3", ia3_rank=2).validate()
