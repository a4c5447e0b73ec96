"""The bad-input matrix, continued: the six classes of input that could give a wrong number or lose a run.

Each case runs one entry point on input with one thing wrong and asserts what ``tests/test_bad_input.py`` asserts:
exit code 2, exactly one line ``error: ...`` holding the listed fragments (the flag or the file), no traceback,
nothing on stdout, and every file under the case's folder and the shared inputs left exactly as it was.

1. run identity (a claimed run, a run folder of unknown settings);
2. provenance (a study's settings file that cannot be trusted);
3. non-finite and mistyped modules (NaN, Inf or integer tensors, in every reader);
4. the model, its tokenizer and the data (another architecture, another model's tokenizer, CR line breaks, a
   header row);
5. outputs against inputs (an output that is, or lies inside, something the run reads; an empty path);
6. flag values (ranges, devices, hostile JSON), and below, every declared range of every configuration.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import study
import tune
from get_similarity import dev_all, importance, score, tune_all
from pipeline.settings import RANGES as STUDY_RANGES
from scripts import convert_legacy_ckpt, export_peft
from tests.conftest import DEFAULT_MODEL_DIR
from tests.test_bad_input import (
    Case,
    World,
    assert_one_line_refusal,
    average_argv,
    copy_data,
    copy_sources,
    devall_argv,
    fusion_argv,
    importance_argv,
    run_case,
    score_argv,
    snapshot,
    split_file,
    study_argv,
    tune_argv,
    tuneall_argv,
    world,  # noqa: F401  (the shared inputs, a fixture)
    write,
)
from unit_model import unit_model_average, unit_model_cos, unit_model_learned, unit_model_others
from utils.ranges import Pattern, Range, ranges_of

HELD: list[int] = []  # claim files held open by a case while its command runs


# --------------------------------------------------------------------------------------------------
# Inputs with one thing wrong


def poisoned(folder: Path, value: float | None = float("nan"), dtype: torch.dtype | None = None) -> str:
    """Put ``value`` into the first entry of a checkpoint's first tensor (or store that tensor as ``dtype``);
    returns the tensor's name."""
    weights = folder / "delta.safetensors"
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    if dtype is not None:
        tensors[name] = tensors[name].to(dtype)
    else:
        tensors[name].view(-1)[0] = value
    save_file(tensors, str(weights))
    return name


def bad_sources(w: World, tmp: Path, task: str = "alpha", **kind) -> tuple[Path, str]:
    """A copy of the sources with ``task``'s module poisoned: (folder, the tensor's name)."""
    src = copy_sources(w, tmp)
    return src, poisoned(src / task, **kind)


def bad_reference(w: World, tmp: Path) -> tuple[Path, str]:
    shutil.copytree(w.random, tmp / "random")
    return tmp / "random", poisoned(tmp / "random" / "beta")


def other_architecture(w: World, tmp: Path) -> Path:
    """A model folder of another architecture (its config.json says gpt2)."""
    folder = tmp / "gpt2_model"
    write(folder / "config.json", json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 32}))
    return folder


def nested_json(depth: int = 100_000) -> str:
    return "[" * depth + "]" * depth


def held_claim(folder: Path) -> None:
    """Another process's claim on a run folder, held open while the case runs (flock is per open file)."""
    path = folder.with_name(f".{folder.name}.claim")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX)
    HELD.append(fd)


def tune_folder(argv: list[str], task: str = "alpha", lr: float | None = 1e-3, bsz: int | None = 4) -> Path:
    from models.tuning import run_folder

    return run_folder(tune.config_from_args(tune.build_parser().parse_args(argv)), task, lr, bsz)


def exported(w: World, tmp: Path) -> Path:
    """A PEFT adapter folder of source alpha, its weights poisoned."""
    from models.formats.peft_export import export_peft as export

    out = export(w.src / "alpha", tmp / "peft_alpha", base_model=str(w.backbone))
    weights = out / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors[sorted(tensors)[0]].view(-1)[0] = float("inf")
    save_file(tensors, str(weights))
    return out


def predict_argv(w: World, tmp: Path, checkpoint: Path) -> list[str]:
    argv = tune_argv(w, tmp, "--test_checkpoint", str(checkpoint))
    argv.remove("--do_train")
    return argv


# --------------------------------------------------------------------------------------------------
# Class 3: non-finite and mistyped modules


def _tune_train_nan(w, t):
    src, name = bad_sources(w, t)
    return tune_argv(w, t, "--train_checkpoint", str(src / "alpha")), [str(src / "alpha"), name, "NaN or infinite"]


def _tune_test_inf(w, t):
    src, name = bad_sources(w, t, value=float("inf"))
    return predict_argv(w, t, src / "alpha"), [str(src / "alpha"), name, "NaN or infinite"]


def _tune_train_int(w, t):
    src, name = bad_sources(w, t, value=None, dtype=torch.int32)
    return tune_argv(w, t, "--train_checkpoint", str(src / "alpha")), [name, "int32", "floating point"]


def _score_source_nan(w, t):
    src, name = bad_sources(w, t, task="beta")
    return score_argv(w, t, src=src), [str(src / "beta"), name, "NaN"]


def _score_reference_nan(w, t):
    ref, name = bad_reference(w, t)
    argv = score_argv(w, t, "--random_tuned_ckpt_path", str(ref))
    return [a if a != "Loss" else "KL" for a in argv], [str(ref / "beta"), "NaN"]


def _tuneall_source_nan(w, t):
    src, name = bad_sources(w, t, task="beta")
    argv = tuneall_argv(w, t)
    return [a if a != str(w.src) else str(src) for a in argv], [str(src / "beta"), "NaN"]


def _devall_source_inf(w, t):
    src, _ = bad_sources(w, t, task="beta", value=float("-inf"))
    argv = devall_argv(w, t)
    return [a if a != str(w.src) else str(src) for a in argv], [str(src / "beta"), "NaN or infinite"]


def _importance_nan(w, t):
    src, _ = bad_sources(w, t)
    return importance_argv(w, t, checkpoint=src / "alpha"), [str(src / "alpha"), "NaN"]


def _average_source_nan(w, t):
    src, _ = bad_sources(w, t, task="gamma")
    return average_argv(w, t, src=src), [str(src / "gamma"), "NaN"]


def _others_source_inf(w, t):
    src, _ = bad_sources(w, t, task="beta", value=float("inf"))
    return fusion_argv(w, t, src=src), [str(src / "beta"), "NaN or infinite"]


def _average_source_int(w, t):
    src, name = bad_sources(w, t, task="beta", value=None, dtype=torch.int64)
    return average_argv(w, t, src=src), [str(src / "beta"), name, "floating point"]


def _cos_reference_nan(w, t):
    ref, _ = bad_reference(w, t)
    return average_argv(w, t, "--random_tuned_ckpt_path", str(ref)), [str(ref / "beta"), "NaN"]


def _learned_source_nan(w, t):
    src, _ = bad_sources(w, t, task="beta")
    return [*average_argv(w, t, src=src), "--model", str(w.backbone), "--task_dir", str(w.data), "--targets",
            "alpha", "--budget", "2"], [str(src / "beta"), "NaN"]


def _export_nan(w, t):
    src, _ = bad_sources(w, t)
    return [str(src / "alpha"), str(t / "peft")], [str(src / "alpha"), "NaN"]


def _convert_peft_inf(w, t):
    peft = exported(w, t)
    return [str(peft), str(t / "converted"), "--model", str(w.backbone)], [str(peft), "NaN or infinite"]


def _study_library_nan(w, t):
    src, _ = bad_sources(w, t, task="beta")
    return [*study_argv(w, t), "--source_library", str(src)], ["--source_library", "beta", "NaN"]


# --------------------------------------------------------------------------------------------------
# Class 5: outputs against inputs


def _swap(argv: list[str], flag: str, value: str) -> list[str]:
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


def _tune_export_is_output(w, t):
    return tune_argv(w, t, "--tune_method", "lora", "--export_peft", str(t / "out")), ["--export_peft", "--output_dir"]


def _devall_output_is_split(w, t):
    data = copy_data(w, t)
    split = split_file(data, "alpha", "train")
    argv = _swap(_swap(devall_argv(w, t), "--task_dir", str(data)), "--output", str(split))
    return argv, ["--output", "--task_dir", "lies inside"]


def _fusion_save_is_sim(w, t):
    shutil.copy(w.sim, t / "sim.tsv")
    return fusion_argv(w, t, "--save_ckpt_path", str(t / "sim.tsv"), sim=t / "sim.tsv"), ["--save_ckpt_path",
                                                                                         "--result_tsv"]


def _export_into_checkpoint(w, t):
    src = copy_sources(w, t)
    return [str(src / "alpha"), str(src / "alpha" / "peft")], ["OUT_DIR", "lies inside CHECKPOINT"]


def _convert_into_source(w, t):
    src = copy_sources(w, t)
    return [str(src / "alpha"), str(src / "alpha")], ["OUTPUT", "is SOURCE"]


# --------------------------------------------------------------------------------------------------
# Classes 1, 2, 4 and 6 that need files


def _tune_claimed(w, t):
    argv = tune_argv(w, t)
    folder = tune_folder(argv)
    held_claim(folder)
    return argv, [str(folder), "another process is making this very run"]


def _tune_resume_without_settings(w, t):
    argv = tune_argv(w, t, "--resume")
    folder = tune_folder(argv)
    write(folder / "result.json", json.dumps({"dev": 0.5}))
    return argv, [str(folder), "without recorded settings"]


def _tune_nested_checkpoint_json(w, t):
    src = copy_sources(w, t)
    (src / "alpha" / "delta_config.json").write_text(nested_json())
    return tune_argv(w, t, "--train_checkpoint", str(src / "alpha")), [str(src / "alpha" / "delta_config.json"),
                                                                        "nested too deeply"]


def _fusion_nested_settings(w, t):
    write(t / "out" / "fusion_settings.json", nested_json())
    return average_argv(w, t, "--resume", "true"), ["fusion_settings.json", "nested too deeply"]


def _study_nested_params(w, t):
    write(t / "out" / "params.json", nested_json())
    return study_argv(w, t), ["params.json", "nested too deeply"]


def _study_params_before_lora_targets(w, t):
    """A study folder made before lora_targets existed holds LoRA on q and v: another set is refused by name."""
    params = {k: v for k, v in vars(study.parse_args(study_argv(w, t))).items() if k != "lora_targets"}
    write(t / "out" / "params.json", json.dumps(params))
    return [*study_argv(w, t), "--lora_targets", "v,k,q"], ["params.json", "lora_targets='q,v'",
                                                            "lora_targets='q,k,v'"]


def _study_params_not_object(w, t):
    write(t / "out" / "params.json", "[1, 2, 3]")
    return study_argv(w, t), ["params.json", "expected a JSON object"]


SIM_ROW = "target\tsource\tmetric\tgroup\tscore\ngamma\talpha\tLoss\tmodel\t1.5\n"


def _score_table_of_other_settings(w, t):
    write(t / "out" / "result.tsv", SIM_ROW)
    from get_similarity.scoring import SCORE_SETTINGS

    settings = {name: None for name in SCORE_SETTINGS}
    write(t / "out" / "score_settings.json", json.dumps({**settings, "delta": "lora", "max_examples": 99}))
    return score_argv(w, t), [str(t / "out" / "result.tsv"), "scored with", "another --output_dir"]


def _score_resume_without_settings(w, t):
    write(t / "out" / "result.tsv", SIM_ROW)
    return score_argv(w, t, "--resume"), [str(t / "out" / "result.tsv"), "without recorded settings"]


def _split_case(entry_argv, content: bytes, words: tuple[str, ...], split: str = "train", lineno: int = 1):
    def build(w, t):
        data = copy_data(w, t)
        path = split_file(data, "alpha", split)
        path.write_bytes(content)
        return _swap(entry_argv(w, t), "--task_dir", str(data)), [f"{path}:{lineno}", *words]
    return build


CR_FILE = b"the cat sat\tyes\rthe dog ran\tno\ra red fox\tyes\r"
HEADER_FILE = b"input\toutput\nthe cat sat\tyes\nthe dog ran\tno\n"


def _model_other_arch(make_argv, flag: str = "--model"):
    def build(w, t):
        folder = other_architecture(w, t)
        return _swap(make_argv(w, t), flag, str(folder)), ["--model", "gpt2", "supported: t5"]
    return build


def _tokenizer_of(make_argv):
    return lambda w, t: ([*make_argv(w, t), "--tokenizer_path", str(DEFAULT_MODEL_DIR)],
                         ["--tokenizer_path", "do not belong together"])


CASES: dict[str, Case] = {
    # ---- 1. run identity
    "identity/tune-run-claimed-by-another-process": Case(tune.main, _tune_claimed),
    "identity/tune-resume-into-a-folder-of-unknown-settings": Case(tune.main, _tune_resume_without_settings),
    # ---- 2. provenance
    "provenance/study-params-json-nested": Case(study.main, _study_nested_params),
    "provenance/study-params-before-lora-targets": Case(study.main, _study_params_before_lora_targets),
    "provenance/study-params-json-not-an-object": Case(study.main, _study_params_not_object),
    "provenance/fusion-settings-nested": Case(unit_model_average.main, _fusion_nested_settings),
    "provenance/score-table-of-other-settings": Case(score.main, _score_table_of_other_settings),
    "provenance/score-resume-into-a-table-without-settings": Case(score.main, _score_resume_without_settings),
    # ---- 3. modules
    "modules/tune-train-checkpoint-nan": Case(tune.main, _tune_train_nan),
    "modules/tune-test-checkpoint-inf": Case(tune.main, _tune_test_inf),
    "modules/tune-train-checkpoint-int32": Case(tune.main, _tune_train_int),
    "modules/tune-checkpoint-json-nested": Case(tune.main, _tune_nested_checkpoint_json),
    "modules/score-source-nan": Case(score.main, _score_source_nan),
    "modules/score-kl-reference-nan": Case(score.main, _score_reference_nan),
    "modules/tuneall-source-nan": Case(tune_all.main, _tuneall_source_nan),
    "modules/devall-source-minus-inf": Case(dev_all.main, _devall_source_inf),
    "modules/importance-checkpoint-nan": Case(importance.main, _importance_nan),
    "modules/average-source-nan": Case(unit_model_average.main, _average_source_nan),
    "modules/average-source-int64": Case(unit_model_average.main, _average_source_int),
    "modules/others-source-inf": Case(unit_model_others.main, _others_source_inf),
    "modules/cos-reference-nan": Case(unit_model_cos.main, _cos_reference_nan),
    "modules/learned-source-nan": Case(unit_model_learned.main, _learned_source_nan),
    "modules/export-peft-nan": Case(export_peft.main, _export_nan),
    "modules/convert-peft-inf": Case(convert_legacy_ckpt.main, _convert_peft_inf),
    "modules/study-library-nan": Case(study.main, _study_library_nan),
    # ---- 4. model, tokenizer, data
    "model/tune-other-architecture": Case(tune.main, _model_other_arch(tune_argv)),
    "model/score-other-architecture": Case(score.main, _model_other_arch(score_argv)),
    "model/tuneall-other-architecture": Case(tune_all.main, _model_other_arch(tuneall_argv)),
    "model/devall-other-architecture": Case(dev_all.main, _model_other_arch(devall_argv)),
    "model/importance-other-architecture": Case(importance.main, _model_other_arch(importance_argv)),
    "model/study-other-architecture": Case(study.main, _model_other_arch(study_argv)),
    "model/tune-tokenizer-of-another-model": Case(tune.main, _tokenizer_of(tune_argv)),
    "model/score-tokenizer-of-another-model": Case(score.main, _tokenizer_of(score_argv)),
    "model/tuneall-tokenizer-of-another-model": Case(tune_all.main, _tokenizer_of(tuneall_argv)),
    "data/tune-cr-line-breaks": Case(tune.main, _split_case(tune_argv, CR_FILE, ("carriage return",))),
    "data/tune-header-row": Case(tune.main, _split_case(tune_argv, HEADER_FILE, ("header row",))),
    "data/score-header-row": Case(score.main, _split_case(score_argv, HEADER_FILE, ("header row",), split="dev")),
    "data/devall-cr-line-breaks": Case(dev_all.main, _split_case(devall_argv, CR_FILE, ("carriage return",),
                                                                 split="dev")),
    "data/study-header-row": Case(study.main, _split_case(study_argv, HEADER_FILE, ("header row",))),
    # ---- 5. outputs against inputs
    "outputs/tune-output-is-task-dir": Case(tune.main, lambda w, t: (
        _swap(tune_argv(w, t), "--output_dir", str(w.data)), ["--output_dir", "is --task_dir"])),
    "outputs/tune-output-inside-a-task-folder": Case(tune.main, lambda w, t: (
        _swap(tune_argv(w, t), "--output_dir", str(w.data / "alpha" / "runs")), ["--output_dir", "lies inside"])),
    "outputs/tune-output-is-train-checkpoint": Case(tune.main, lambda w, t: (
        _swap(tune_argv(w, t, "--train_checkpoint", str(w.src / "alpha")), "--output_dir", str(w.src / "alpha")),
        ["--output_dir", "is --train_checkpoint"])),
    "outputs/tune-output-inside-the-model": Case(tune.main, lambda w, t: (
        _swap(tune_argv(w, t), "--output_dir", str(w.backbone / "runs")), ["--output_dir", "--model"])),
    "outputs/tune-output-empty": Case(tune.main, lambda w, t: (
        _swap(tune_argv(w, t), "--output_dir", ""), ["--output_dir", "empty"])),
    "outputs/tune-export-peft-is-output-dir": Case(tune.main, _tune_export_is_output),
    "outputs/score-output-is-source-folder": Case(score.main, lambda w, t: (
        _swap(score_argv(w, t), "--output_dir", str(w.src)), ["--output_dir", "is --source_ckpt_path"])),
    "outputs/score-output-empty": Case(score.main, lambda w, t: (
        _swap(score_argv(w, t), "--output_dir", " "), ["--output_dir", "empty"])),
    "outputs/tuneall-output-is-source-folder": Case(tune_all.main, lambda w, t: (
        _swap(tuneall_argv(w, t), "--output_dir", str(w.src)), ["--output_dir", "is --source_ckpt_path"])),
    "outputs/tuneall-output-empty": Case(tune_all.main, lambda w, t: (
        _swap(tuneall_argv(w, t), "--output_dir", ""), ["--output_dir", "empty"])),
    "outputs/devall-output-is-a-split-file": Case(dev_all.main, _devall_output_is_split),
    "outputs/devall-output-empty": Case(dev_all.main, lambda w, t: (
        _swap(devall_argv(w, t), "--output", ""), ["--output", "empty"])),
    "outputs/importance-output-is-the-checkpoint": Case(importance.main, lambda w, t: (
        _swap(importance_argv(w, t), "--output_dir", str(w.src / "alpha")), ["--output_dir", "is --checkpoint"])),
    "outputs/average-save-is-source-folder": Case(unit_model_average.main, lambda w, t: (
        _swap(average_argv(w, t), "--save_ckpt_path", str(w.src)), ["--save_ckpt_path", "is --source_ckpt_path"])),
    "outputs/average-save-inside-a-source": Case(unit_model_average.main, lambda w, t: (
        _swap(average_argv(w, t), "--save_ckpt_path", str(w.src / "beta" / "fused")),
        ["--save_ckpt_path", "lies inside --source_ckpt_path"])),
    "outputs/average-save-empty": Case(unit_model_average.main, lambda w, t: (
        _swap(average_argv(w, t), "--save_ckpt_path", ""), ["--save_ckpt_path", "required"])),
    "outputs/others-save-is-result-tsv": Case(unit_model_others.main, _fusion_save_is_sim),
    "outputs/study-output-is-task-dir": Case(study.main, lambda w, t: (
        _swap(study_argv(w, t), "--output", str(w.data)), ["--output", "is --task_dir"])),
    "outputs/export-into-the-checkpoint": Case(export_peft.main, _export_into_checkpoint),
    "outputs/convert-onto-its-source": Case(convert_legacy_ckpt.main, _convert_into_source),
    # ---- 6. flag values
    "flags/tune-weight-decay-negative": Case(tune.main, lambda w, t: (
        tune_argv(w, t, "--weight_decay", "-0.1"), ["--weight_decay", "-0.1"])),
    "flags/tune-max-grad-norm-inf": Case(tune.main, lambda w, t: (
        tune_argv(w, t, "--max_grad_norm", "inf"), ["--max_grad_norm", "inf"])),
    "flags/tune-device-unknown": Case(tune.main, lambda w, t: (
        tune_argv(w, t, "--device", "gpu0"), ["--device", "gpu0"])),
    "flags/tuneall-weight-decay-negative": Case(tune_all.main, lambda w, t: (
        tuneall_argv(w, t, "--weight_decay", "-1"), ["--weight_decay"])),
    "flags/tuneall-max-grad-norm-nan": Case(tune_all.main, lambda w, t: (
        tuneall_argv(w, t, "--max_grad_norm", "nan"), ["--max_grad_norm", "nan"])),
    "flags/score-device-unknown": Case(score.main, lambda w, t: (
        _swap(score_argv(w, t), "--device", "tpu"), ["--device", "tpu"])),
    "flags/devall-device-unknown": Case(dev_all.main, lambda w, t: (
        _swap(devall_argv(w, t), "--device", "cuda:x"), ["--device", "cuda:x"])),
    "flags/study-device-unknown": Case(study.main, lambda w, t: (
        [*study_argv(w, t), "--device", "gpu"], ["--device", "gpu"])),
    "flags/study-lam-nan": Case(study.main, lambda w, t: ([*study_argv(w, t), "--lam", "nan"], ["--lam", "nan"])),
    "flags/learned-bound-inf": Case(unit_model_learned.main, lambda w, t: (
        average_argv(w, t, "--bound", "inf"), ["--bound", "inf"])),
}


@pytest.fixture(autouse=True)
def _release_claims():
    yield
    while HELD:
        os.close(HELD.pop())


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, world: World, tmp_path: Path, capsys) -> None:  # noqa: F811
    case = CASES[name]
    argv, fragments = case.build(world, tmp_path)
    before = snapshot(world.root, tmp_path)
    code, out, err = run_case(case, argv, capsys)
    assert snapshot(world.root, tmp_path) == before, "the command changed or left files behind"
    assert_one_line_refusal(code, out, err, fragments)


def test_the_classes_cover_every_entry_point() -> None:
    classes = {name.split("/")[0] for name in CASES}
    assert classes == {"identity", "provenance", "modules", "model", "data", "outputs", "flags"}
    entries = {c.entry.__module__ for c in CASES.values()}
    for needed in ("tune", "get_similarity.score", "get_similarity.tune_all", "get_similarity.dev_all",
                   "get_similarity.importance", "unit_model.unit_model_average", "unit_model.unit_model_others",
                   "unit_model.unit_model_cos", "unit_model.unit_model_learned", "scripts.export_peft",
                   "scripts.convert_legacy_ckpt", "study"):
        assert needed in entries, needed
    assert len(CASES) >= 60


# --------------------------------------------------------------------------------------------------
# Class 6, every declared range: each field of each configuration, with values out of its range


def bad_values(rule: Range | Pattern) -> list[str]:
    """Values the rule refuses, as a command line would give them."""
    if isinstance(rule, Pattern):
        return ["gpu0"]
    values = [] if rule.integer else ["nan", "inf"]
    if rule.low is not None:
        values.append(str(type(rule.low)(rule.low if rule.low_open else rule.low - 1)))
    if rule.high is not None:
        values.append(str(rule.high if rule.high_open else rule.high + 1.5))
    if rule.integer:
        values.append("1.5")
    assert all(not rule.accepts(_parsed(v, rule)) for v in values), (rule, values)
    return values


def _parsed(text: str, rule: Range) -> float | int:
    value = float(text)
    return int(value) if rule.integer and value.is_integer() else value


def walk() -> list[tuple[str, Callable, Callable, str, str]]:
    """(entry name, main, argv builder, flag, bad value) for every ranged field an entry point takes as a flag."""
    from get_similarity.settings import IMPORTANCE_RANGES, SimilarityConfig
    from models.pair_settings import DevAllConfig, TuneAllConfig
    from models.settings import TuneConfig
    from unit_model.config import FusionConfig
    from unit_model.merges import MERGE_SETTINGS

    # the merge operators' settings declare their own ranges, beside the operators
    merge_ranges = {name: s.rule for name, s in MERGE_SETTINGS.items() if s.rule is not None}

    def flags_of(main) -> set[str]:
        module = __import__(main.__module__, fromlist=["_"])
        if hasattr(module, "PARAMS"):
            return {name for name in module.PARAMS if not name.startswith("_")}
        return {a.dest for a in module.build_parser()._actions}

    entries = [("tune", tune.main, tune_argv, ranges_of(TuneConfig)),
               ("score", score.main, score_argv, ranges_of(SimilarityConfig)),
               ("tune_all", tune_all.main, tuneall_argv, ranges_of(TuneAllConfig)),
               ("dev_all", dev_all.main, devall_argv, ranges_of(DevAllConfig)),
               ("importance", importance.main, importance_argv, IMPORTANCE_RANGES),
               ("average", unit_model_average.main, average_argv, {**ranges_of(FusionConfig), **merge_ranges}),
               ("learned", unit_model_learned.main, average_argv, {**ranges_of(FusionConfig), **merge_ranges}),
               ("study", study.main, study_argv, {**STUDY_RANGES, **merge_ranges})]
    cases = []
    for name, main, make_argv, rules in entries:
        taken = flags_of(main)
        for field_name, rule in rules.items():
            if field_name in taken:
                cases += [(name, main, make_argv, field_name, value) for value in bad_values(rule)]
    return cases


WALK = walk()


@pytest.mark.parametrize("entry, main, make_argv, name, value", WALK,
                         ids=[f"{e}--{n}={v}" for e, _, _, n, v in WALK])
def test_every_declared_range_is_checked_before_anything_is_written(entry, main, make_argv, name, value, world,  # noqa: F811
                                                                    tmp_path, capsys):
    argv = make_argv(world, tmp_path)
    flag = f"--{name}"
    argv = _swap(argv, flag, value) if flag in argv else [*argv, flag, value]
    before = snapshot(world.root, tmp_path)
    code, out, err = run_case(Case(main, lambda w, t: (argv, [])), argv, capsys)
    assert snapshot(world.root, tmp_path) == before
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert flag in lines[0], lines[0]


def test_the_walk_covers_every_configuration() -> None:
    walked = {(e, n) for e, _, _, n, _ in WALK}
    for entry, flag in (("tune", "weight_decay"), ("tune", "max_grad_norm"), ("tune", "device"),
                        ("tune", "learning_rate_list"), ("score", "max_examples"), ("tune_all", "learning_rate"),
                        ("dev_all", "predict_batch_size"), ("importance", "batch_size"), ("average", "density"),
                        ("average", "tem"), ("learned", "budget"), ("learned", "l1"), ("study", "target_lr"),
                        ("study", "prefix_iters_scale")):
        assert (entry, flag) in walked, (entry, flag)
    assert len(WALK) >= 100
