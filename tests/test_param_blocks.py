"""Parameter blocks: the original code's way of working (`cd unit_model && python unit_model_average.py` after
editing the block) reads and writes what it would from the repository root; a block value of a form no flag
takes is refused; every flag's help shows its default."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO
from utils.errors import UserInputError
from utils.params import BadBlockValue, block_params, from_repo_root, parse_params

LIBRARY = "models/default-sources/lora"


def test_block_paths_resolve_against_the_repository_root_and_flags_against_the_cwd():
    params = block_params({"save_ckpt_path": "runs/x", "model": "models/default", "tasks": "a b", "k": 16,
                           "export_peft": "", "source_library": "/abs/lib"})
    args = parse_params(params, ["--tasks", "c"], None)
    assert args.save_ckpt_path == str(REPO / "runs" / "x")
    assert args.model == str(REPO / "models" / "default")  # it exists there
    assert args.export_peft == "" and args.source_library == "/abs/lib"  # empty and absolute stay
    args = parse_params(params, ["--save_ckpt_path", "runs/y", "--model", "google/t5-base"], None)
    assert args.save_ckpt_path == "runs/y" and args.model == "google/t5-base"  # command line: as given
    assert from_repo_root("model", "google/t5-base-lm-adapt") == "google/t5-base-lm-adapt"  # a hub id
    assert from_repo_root("tasks", "runs/x") == "runs/x"  # not a path parameter


def test_a_flag_given_as_a_prefix_or_with_equals_is_taken_as_given():
    params = block_params({"save_ckpt_path": "runs/x", "source_ckpt_path": "runs/s", "tem": 1.0})
    args = parse_params(params, ["--save_ckpt=runs/y", "--tem", "2"], None)
    assert args.save_ckpt_path == "runs/y" and args.tem == 2.0  # given: as typed
    assert args.source_ckpt_path == str(REPO / "runs" / "s")  # not given: the block's, from the repository root


def test_a_list_in_a_block_is_refused_in_one_line():
    params = block_params({"targets": ["sent_review", "topic_news"], "SOME_CONSTANT": ("a", "b"), "k": 1})
    assert isinstance(params["targets"], BadBlockValue) and "SOME_CONSTANT" not in params
    with pytest.raises(UserInputError, match=r'targets = "sent_review topic_news"'):
        parse_params(params, [], None)


def test_help_shows_each_default_once():
    from utils.params import build_parser

    text = build_parser({"tem": 1.0, "tasks": "ALL_TASKS", "note": None},
                        None, {"tem": "softmax temperature", "tasks": "the pool (default: every task)"}).format_help()
    assert "softmax temperature (default: 1.0)" in " ".join(text.split())
    assert text.count("(default: every task)") == 1 and "(default: ALL_TASKS)" not in text


def edited_copy(script: str, replacements: dict[str, str]) -> Path:
    """A copy of a fusion script beside it, with its parameter block edited as a user would edit it."""
    source = REPO / "unit_model" / script
    text = source.read_text(encoding="utf-8")
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new)
    copy = source.with_name(f"unit_model_edited_{uuid.uuid4().hex[:8]}.py")
    copy.write_text(text, encoding="utf-8")
    return copy


@pytest.mark.cli
def test_cd_unit_model_and_run_the_edited_block(tmp_path):
    name = f"test-{uuid.uuid4().hex[:8]}"
    copy = edited_copy("unit_model_average.py", {
        'tasks = "ALL_TASKS"': 'tasks = "sent_review topic_news sent_tweet"',
        'targets = None': 'targets = "sent_review"',
        'source_ckpt_path = "runs/sources/lora"': f'source_ckpt_path = "{LIBRARY}"',
        'save_ckpt_path = "runs/fused/lora/average"': f'save_ckpt_path = "runs/{name}/average"'})
    out = REPO / "runs" / name
    try:
        done = subprocess.run([sys.executable, copy.name], cwd=REPO / "unit_model", capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        assert (out / "average" / "without_sent_review" / "delta.safetensors").is_file()
        rows = (out / "average" / "weights.tsv").read_text().splitlines()[1:]
        assert sorted(r.split("\t")[1] for r in rows) == ["sent_tweet", "topic_news"]
        assert not (REPO / "unit_model" / "runs").exists()  # nothing written inside the code tree
    finally:
        copy.unlink()
        shutil.rmtree(out, ignore_errors=True)


@pytest.mark.cli
def test_a_python_list_in_an_edited_block_is_refused(tmp_path):
    copy = edited_copy("unit_model_average.py", {'targets = None': 'targets = ["sent_review", "topic_news"]',
                                                 'save_ckpt_path = "runs/fused/lora/average"':
                                                 f'save_ckpt_path = "{tmp_path}/out"'})
    try:
        done = subprocess.run([sys.executable, copy.name], cwd=REPO / "unit_model", capture_output=True, text=True,
                              timeout=300)
    finally:
        copy.unlink()
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        'error: parameter block: targets = [\'sent_review\', \'topic_news\'] is a list; write it as one string of '
        'words, e.g. targets = "sent_review topic_news"']
    assert not (tmp_path / "out").exists()


def test_block_comments_become_the_flags_help(tmp_path):
    from utils.params import block_comments

    script = tmp_path / "s.py"
    script.write_text('x = 1\n# ---- parameters (...) ----\nalpha = 1  # the first one\n# explains beta\n'
                      '# over two lines\nbeta = "b"\ngamma = 3\n# -----\ndelta = 4  # after the block\n',
                      encoding="utf-8")
    assert block_comments(script) == {"alpha": "the first one", "beta": "explains beta over two lines"}
    params = block_params({"__file__": str(script), "alpha": 1, "beta": "b", "gamma": 3})
    from utils.params import build_parser

    text = " ".join(build_parser({k: v for k, v in params.items() if not k.startswith("_")}, None,
                                 params["__help__"]).format_help().split())
    assert "the first one (default: 1)" in text and "explains beta over two lines (default: b)" in text
    assert "gamma (default: 3)" in text  # no comment: the name in words


def test_every_flag_of_every_entry_point_has_help():
    import argparse
    import importlib.util

    scripts = ["tune.py", "study.py", "sweep.py", "get_similarity/score.py", "get_similarity/tune_all.py",
               "get_similarity/dev_all.py", "get_similarity/importance.py", "scripts/export_peft.py",
               "scripts/convert_legacy_ckpt.py", "scripts/summarize_runs.py", "scripts/build_default_sources.py",
               *(f"unit_model/unit_model_{n}.py" for n in ("average", "cos", "Euclidean", "Performance", "others",
                                                            "learned"))]
    captured = {}

    def grab(self, args=None, namespace=None):
        captured["parser"] = self
        raise SystemExit(0)

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = grab
    try:
        for script in scripts:
            spec = importlib.util.spec_from_file_location(f"help_{script.replace('/', '_')[:-3]}", REPO / script)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            captured.clear()
            with pytest.raises(SystemExit):
                module.main([])
            bare = [a.option_strings[0] for a in captured["parser"]._actions
                    if a.option_strings and a.dest != "help" and not (a.help or "").strip()]
            assert bare == [], script
    finally:
        argparse.ArgumentParser.parse_args = original


HELP_SCRIPTS = ["tune.py", "study.py", "sweep.py", "get_similarity/score.py", "get_similarity/tune_all.py",
                "get_similarity/dev_all.py", "get_similarity/importance.py", "scripts/export_peft.py",
                "scripts/convert_legacy_ckpt.py", "scripts/summarize_runs.py", "scripts/build_default_sources.py",
                *(f"unit_model/unit_model_{n}.py" for n in ("average", "cos", "Euclidean", "Performance", "others",
                                                             "learned"))]


@pytest.mark.cli
def test_help_and_a_refused_flag_answer_before_torch_loads():
    """Which modules are loaded when --help has printed, or a bad flag was refused (bench/cli_startup.py times it)."""
    probe = ("import runpy, sys\nsys.argv = [sys.argv[1], *sys.argv[2:]]\ntry:\n"
             "    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit as e:\n"
             "    code = e.code\n"
             "heavy = [m for m in ('torch', 'transformers', 'adapters', 'sklearn') if m in sys.modules]\n"
             "print('EXIT', code, 'HEAVY', ' '.join(heavy) or '-', file=sys.stderr)\n")
    for script in HELP_SCRIPTS:
        for flags, code in ((["--help"], 0), (["--no_such_flag"], 2)):
            done = subprocess.run([sys.executable, "-c", probe, script, *flags], cwd=REPO, capture_output=True,
                                  text=True, timeout=120)
            assert done.stderr.strip().splitlines()[-1] == f"EXIT {code} HEAVY -", (script, flags, done.stderr[-500:])
