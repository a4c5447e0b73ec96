"""The committed source libraries of the embedded defaults (models/default-sources/lora for T5,
models/default-causal-sources/lora for the causal default), which `make demo` reads: built as the study's source
stage trains its modules, for their backbone, and rebuilt the same by their script."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import study
from models.delta import DeltaConfig
from models.formats import load_delta_checkpoint
from models.sizes import METHOD_SIZES
from models.source_library import read_settings, train_modules
from pipeline.checks import check_library
from pipeline.settings import resolve_plan, sizes_of
from task_list import resolve_tasks
from tests.conftest import REPO

LIBRARY = REPO / "models" / "default-sources" / "lora"
LIBRARIES = {"models/default": LIBRARY, "models/default-causal": REPO / "models" / "default-causal-sources" / "lora"}


@pytest.mark.parametrize("model", list(LIBRARIES))
def test_the_library_was_built_with_the_study_source_stage_settings(model):
    settings = read_settings(LIBRARIES[model])
    p = study.parse_args([])
    assert settings.tasks == resolve_tasks(["ALL_TASKS"])
    assert (settings.k, settings.data_seed, settings.train_iters, settings.learning_rate, settings.bsz,
            settings.valid_interval, settings.early_stop, settings.seed, settings.max_input_length,
            settings.max_output_length) == (p.source_k, p.source_data_seed, p.source_iters, p.source_lr, p.source_bsz,
                                            p.source_valid_interval, p.source_early_stop, p.seed, p.max_input_length,
                                            p.max_output_length)
    made = DeltaConfig("lora", **settings.sizes)  # written before lora_targets existed: it is at q,v
    assert settings.method == "lora" and made == DeltaConfig("lora", **METHOD_SIZES["default"]["lora"])
    assert made == DeltaConfig("lora", **sizes_of(p, "lora"))
    assert settings.model == model and settings.task_dir == "data/synthetic"


@pytest.mark.parametrize("model", list(LIBRARIES))
def test_the_demo_study_accepts_the_library_and_every_module_is_of_this_backbone(model):
    from models.backbone import load_backbone
    from models.delta import backbone_fingerprint

    library = LIBRARIES[model]
    p = study.parse_args(["--source_library", str(library), "--model", model, "--targets",
                          "sent_review topic_places nli_entail"])
    check_library(resolve_plan(p))  # method, sizes, every task
    net, _ = load_backbone(str(REPO / model), None, "cpu")
    fingerprint = backbone_fingerprint(net)
    for task in read_settings(library).tasks:
        tensors, meta = load_delta_checkpoint(library / task)
        recorded = meta["backbone_fingerprint"]  # the committed modules predate its "family" entry
        assert meta["task"] == task and fingerprint.items() >= recorded.items()
        assert set(fingerprint) - set(recorded) <= {"family"}
        assert all(torch.isfinite(t).all() for t in tensors.values())


@pytest.mark.slow
def test_a_module_rebuilt_alone_equals_the_committed_one(tmp_path):
    """One module, trained again from the manifest's settings (one module at a time, as the script builds them):
    the same module. Both run on one thread; another CPU's kernels (AVX2 against AVX-512) round otherwise, and 200
    Adam steps carry that into differences of a few percent in the smallest tensors, so tensors are compared by
    their norm and scores within a few examples."""
    settings = dataclasses.replace(read_settings(LIBRARY), tasks=["topic_places"])
    made = train_modules(settings, ["topic_places"], tmp_path)["topic_places"]
    rebuilt, _ = load_delta_checkpoint(made["checkpoint"])
    committed, meta = load_delta_checkpoint(LIBRARY / "topic_places")
    assert rebuilt.keys() == committed.keys()
    for name in committed:
        relative = float(torch.linalg.norm(rebuilt[name] - committed[name]) / torch.linalg.norm(committed[name]))
        assert relative < 1e-2, (name, relative)
    scores = json.loads((LIBRARY / "manifest.json").read_text())["scores"]["topic_places"]
    for split in ("dev", "test"):
        assert abs(float(made[split]) - float(scores[split])) <= 0.05
