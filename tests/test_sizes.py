"""One table of method sizes (models/sizes.py): tune.py, DeltaConfig, study.py and the bash sweeps all read it."""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest

import study
import tune
from models.delta import METHODS, DeltaConfig
from models.sizes import METHOD_SIZES, shell_defaults, sizes
from tests.conftest import REPO


def test_table_covers_every_method_in_both_profiles() -> None:
    for profile in ("paper", "default"):
        assert sorted(METHOD_SIZES[profile]) == sorted(METHODS)
        for method in METHODS:
            assert sorted(sizes(profile, method)) == sorted(f.name for f in DeltaConfig(method).spec.size_fields)


def test_tune_and_delta_config_default_to_the_paper_sizes() -> None:
    args = tune.build_parser().parse_args([])
    for method in METHODS:
        paper = sizes("paper", method)
        assert {name: getattr(args, name) for name in paper} == paper
        assert DeltaConfig(method) == DeltaConfig(method, **paper)
    # the paper's setting, as the README gives it (LoRA on q and v)
    assert sizes("paper", "lora") == {"lora_r": 10, "lora_alpha": 16, "lora_targets": "q,v"}
    assert sizes("paper", "prefix") == {"prefix_length": 120, "prefix_mlp": 24}


def test_study_defaults_to_the_embedded_default_sizes() -> None:
    for method in METHODS:
        for name, value in sizes("default", method).items():
            if name != "adapter_type":  # the study always builds Houlsby adapters
                assert study.PARAMS[name] == value, name


def test_shell_defaults_keep_what_the_environment_sets() -> None:
    assert shell_defaults("default", "lora") == ': "${LORA_R:=8}"; : "${LORA_ALPHA:=16}"; : "${LORA_TARGETS:=q,v}"'


def dry_run_flags(script: str, **env: str) -> dict[str, str]:
    proc = subprocess.run(["bash", str(REPO / "scripts" / script)], env={**os.environ, "DRY_RUN": "1", **env},
                          capture_output=True, text=True, timeout=60, check=True)
    words = shlex.split(proc.stdout)  # the dry run prints the command quoted (printf %q)
    return {w[2:]: words[i + 1] for i, w in enumerate(words[:-1]) if w.startswith("--")}


@pytest.mark.parametrize("method", METHODS)
def test_bash_sweeps_read_the_table(method: str) -> None:
    flags = dry_run_flags(f"{method}.sh")
    assert {k: flags[k] for k in sizes("default", method)} == {k: str(v) for k, v in sizes("default", method).items()}
    paper = dry_run_flags(f"{method}.sh", PAPER="1")
    assert {k: paper[k] for k in sizes("paper", method)} == {k: str(v) for k, v in sizes("paper", method).items()}
    if not sizes("default", method):
        return  # (IA)³ has no sizes to override
    first = next(iter(sizes("default", method)))
    override = "pfeiffer" if first == "adapter_type" else "3"
    assert dry_run_flags(f"{method}.sh", **{first.upper(): override})[first] == override  # the environment wins
