"""Documented commands stay true: every command in the README and docs/ names scripts and flags that exist and
paths that exist or that an earlier command makes; the step-by-step workflow runs as written; the README stays
short."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
REPO_FOLDERS = ("scripts", "models", "data", "unit_model", "get_similarity", "dataloader", "bench", "utils",
                "tests", "docs")
# where a command writes: a path named after one of these was made by that command
OUTPUT_FLAGS = ("--output_dir", "--output", "--save_ckpt_path", "--export_peft", "--local-dir", "OUTPUT_DIR",
                "OUTPUT")


def code_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def inline_commands(text: str) -> list[str]:
    spans = re.findall(r"`([^`\n]+)`", text)
    return [s for s in spans if re.match(r"([A-Z_]+=\S+ )*(\.venv/bin/python|python|bash|make) ", s + " ")]


def commands_of(text: str) -> list[tuple[int, str]]:
    """Each command of a page with the number of its code block, in order: code blocks' lines (continuations
    joined, comments dropped), then the inline ones (block -1: a command in running text, run from the root)."""
    out = []
    for number, block in enumerate(code_blocks(text)):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
            for part in re.split(r"\s*(?:&&|;|\|)\s*", line):
                part = re.sub(r"^(for \w+ in .*|do|done|then|fi|else)$", "", part.strip())
                if part:
                    out.append((number, part))
    return out + [(-1, c) for c in inline_commands(text)]


def words_of(command: str) -> list[str]:
    try:
        return shlex.split(command)
    except ValueError:
        return command.split()


@cache
def python_flags(script: str) -> frozenset[str]:
    """The flags a Python entry point's --help lists (its main called in this process)."""
    path = REPO / script
    spec = importlib.util.spec_from_file_location(f"doc_entry_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), pytest.raises(SystemExit):
        module.main(["--help"])
    return frozenset(re.findall(r"--[A-Za-z][\w-]*", buffer.getvalue()))


def bash_chain(script: Path) -> list[Path]:
    """A bash script and the scripts it sources or execs, transitively."""
    seen, todo = [], [script]
    while todo:
        path = todo.pop()
        if path in seen or not path.is_file():
            continue
        seen.append(path)
        text = path.read_text(encoding="utf-8")
        for name in re.findall(r"(?:source|bash)\s+\"?(?:\$\(dirname \"\$0\"\)/)?([\w./]+\.sh)", text):
            todo += [path.parent / name, REPO / name]
    return seen


def bash_entry(script: Path) -> str | None:
    """The Python entry point a bash wrapper's extra flags reach."""
    text = " ".join(p.read_text(encoding="utf-8") for p in bash_chain(script))
    for pattern, entry in ((r"get_similarity\.score", "get_similarity/score.py"),
                           (r"get_similarity\.tune_all", "get_similarity/tune_all.py"),
                           (r"get_similarity\.dev_all", "get_similarity/dev_all.py"),
                           (r"\bstudy\.py", "study.py"), (r"\btune\.py", "tune.py")):
        if re.search(pattern, text):
            return entry
    return None


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(encoding="utf-8"), flags=re.M))


def default_outputs() -> set[str]:
    """runs/X folders the code writes by default (a documented path under one of them is made by its script)."""
    found = set()
    code = [p for p in REPO.glob("*/*.py") if p.parts[-2] != "tests"]
    for path in [*REPO.glob("*.py"), *code, *REPO.glob("scripts/**/*.sh"), REPO / "Makefile"]:
        found |= set(re.findall(r"runs/[\w.-]+", path.read_text(encoding="utf-8")))
    return found


def placeholder(path: str) -> bool:
    """A path written with a placeholder (``bench/NAME.py``, ``OUT_DIR``), not a real one."""
    return any(re.fullmatch(r"[A-Z][A-Z_]{2,}(\.\w+)?", part) for part in path.split("/"))


def problems_of(page: Path) -> list[str]:
    problems, made, cwd, block = [], set(default_outputs()), REPO, None
    for number, command in commands_of(page.read_text(encoding="utf-8")):
        if number != block:  # each code block starts at the repository root
            cwd, block = REPO, number
        words = words_of(command)
        if words[:1] == ["cd"] and len(words) == 2:
            cwd = (cwd / words[1]).resolve()
            continue
        if not cwd.is_relative_to(REPO) or not cwd.exists():
            continue  # in another project's folder (CrossFit's build): its scripts are not ours to check
        if words[:1] == ["env"]:
            words = [w for w in words[1:] if not w.startswith("$")]
        while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
            name, _, value = words.pop(0).partition("=")
            if name in OUTPUT_FLAGS:
                made.add(value)
        if not words:
            continue
        if words[0] == "make":
            problems += [f"{command}: no make target {t}" for t in words[1:] if t not in makefile_targets()]
            continue
        entry, flags_from = None, None
        if words[0] == "bash" and len(words) > 1:
            entry = words[1]
            if "{" not in entry and not placeholder(entry):
                if not (cwd / entry).is_file():
                    problems.append(f"{command}: no script {entry}")
                    continue
                flags_from = bash_entry(cwd / entry)
        elif words[0].endswith("python") and len(words) > 1:
            args = words[1:]
            if args[0] == "-m":
                entry = args[1].replace(".", "/") + ".py"
            else:
                entry = args[0]
            if "{" not in entry and not placeholder(entry):
                if not (cwd / entry).is_file():
                    problems.append(f"{command}: no script {entry}")
                    continue
                flags_from = str((cwd / entry).resolve().relative_to(REPO))
        if flags_from and flags_from.endswith(".py") and (REPO / flags_from).is_file():
            known = python_flags(flags_from)
            for word in words[2:]:
                flag = word.split("=")[0]
                if flag.startswith("--") and flag not in known and flag != "--debug":
                    problems.append(f"{command}: {flags_from} has no flag {flag}")
        for i, word in enumerate(words):
            if i and words[i - 1] in OUTPUT_FLAGS:
                made.add(word)
            if words[0] == "mkdir":
                made.add(word)
            if "$" in word or "{" in word or "*" in word or placeholder(word):
                continue
            path = word.split("=", 1)[-1]
            top = path.split("/")[0]
            if top in REPO_FOLDERS and "/" in path and not (cwd / path).exists() \
                    and not any(path.startswith(m) for m in made):
                problems.append(f"{command}: no path {path}")
            if top == "runs" and "/" in path and not any(path.startswith(m) or m.startswith(path) for m in made):
                problems.append(f"{command}: {path} is made by no earlier command")
    return problems


@pytest.mark.parametrize("page", DOCS, ids=[str(p.relative_to(REPO)) for p in DOCS])
def test_documented_commands_name_real_scripts_flags_and_paths(page):
    assert problems_of(page) == []


def test_the_checker_catches_a_wrong_flag_a_missing_script_and_a_path_from_nowhere(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```bash\n.venv/bin/python tune.py --no_such_flag 1\nbash scripts/nope.sh\n"
                    ".venv/bin/python tune.py --train_checkpoint runs/nowhere/x\n"
                    "OUTPUT_DIR=runs/made bash scripts/lora.sh\n"
                    ".venv/bin/python tune.py --train_checkpoint runs/made/a\n"
                    "```\nAnd `make no-such-target`.\n")
    problems = problems_of(page)
    assert any("no flag --no_such_flag" in p for p in problems)
    assert any("no script scripts/nope.sh" in p for p in problems)
    assert any("runs/nowhere/x is made by no earlier command" in p for p in problems)
    assert any("no make target no-such-target" in p for p in problems)
    assert not any("runs/made/a" in p for p in problems)


def test_readme_fits_on_a_few_screens():
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) <= 250


def workflow_block() -> str:
    blocks = code_blocks((REPO / "docs" / "workflow.md").read_text(encoding="utf-8"))
    return blocks[0]


TINY_SCALE = ('export SOURCES="sent_review sent_tweet topic_news topic_places" TARGETS="sent_review topic_news" '
              'SOURCE_ITERS=3 TARGET_ITERS=3')


@pytest.mark.slow
def test_the_workflow_runs_as_written(tmp_path):
    """The documented block in a copy of the repository, every line as written but the scale line."""
    block = workflow_block()
    scale = block.splitlines()[0]
    assert scale.startswith("export SOURCES=") and "# the scale" in scale
    copy = tmp_path / "repo"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "__pycache__", "outputs"))
    (copy / ".venv").symlink_to(REPO / ".venv")
    script = copy / "workflow.sh"
    script.write_text("set -euo pipefail\n" + block.replace(scale, TINY_SCALE), encoding="utf-8")
    env = {**os.environ, "PROGRESS": "0", "OMP_NUM_THREADS": "1", "GROUP_SIZE": "1",
           # the large split is only the source stage's data: a few examples of it are enough here
           "EXTRA_ARGS": "--max_output_length 8", "MAX_EXAMPLES": "4", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(script)], cwd=copy, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = copy / "runs"
    for target in ("sent_review", "topic_news"):
        assert (runs / "fused" / "lora" / "others" / f"without_{target}" / "delta.safetensors").is_file()
        assert list((runs / "transfer" / "lora" / target).glob("lr_0.003_bsz_8_k_16_data_100_seed_42_*/checkpoint"))
        assert list((runs / "random" / "lora" / target).glob("lr_0.003_bsz_8_k_16_data_100_seed_42_*/checkpoint"))
    similarity = (runs / "similarity" / "lora" / "result.tsv").read_text().splitlines()[1:]
    assert {line.split("\t")[0] for line in similarity} == {"sent_review", "topic_news"}  # the baseline's targets
    assert {line.split("\t")[2] for line in similarity} == {"Loss", "KL"}
    assert "runs/random/lora" in done.stdout and "runs/transfer/lora" in done.stdout  # the summary table
    # a rerun resumes: nothing is trained or scored again, and the outputs stay as they were
    before = {p: p.stat().st_mtime_ns for p in runs.rglob("*.safetensors")}
    again = subprocess.run(["bash", str(script)], cwd=copy, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*.safetensors")} == before
