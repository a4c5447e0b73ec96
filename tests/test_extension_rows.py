"""The README's "to add X, touch Y" rows, proved on a copy of the project.

For each row a dummy X is written the way its row says: its own new file(s) and its registration in the one place
the row names. The copy is then compared with the project: nothing else changed. Each dummy then runs through the
entry point a user would call (the fusion script, the similarity script, tune.py), in a process of its own so
that every table derived from a registry (flags, help, checks) is derived with the dummy in it.

- a similarity metric: a function under ``@register`` in get_similarity/metrics.py; the similarity script scores
  it, the fusion script weights by it, and the study's fusion names know it (with its inputs);
- a weighting: its planner module and one ``WeightingSpec`` line (and the thin script it chose to have);
- a merge operator with a new setting: its module (the operator and its ``MergeSetting``) and one ``MERGES``
  entry; the fusion scripts' flag, help and check, the fused module's metadata and the study's flags follow;
- a delta method: its module, one ``REGISTRY`` entry and its (empty) sizes in models/sizes.py; tune.py trains it;
- a checkpoint format: its reader module and one ``FORMATS`` line; the fusion script reads sources in it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from tests.conftest import REPO

pytestmark = pytest.mark.slow

LEFT_OUT = {".git", ".venv", "runs", "outputs", "__pycache__", ".pytest_cache", ".ruff_cache", "default-causal",
            "default-causal-sources", "results"}


def copy_project(dest: Path) -> Path:
    shutil.copytree(REPO, dest, ignore=lambda folder, names: [n for n in names if n in LEFT_OUT])
    return dest


def add_file(root: Path, name: str, text: str) -> None:
    (root / name).write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")


def register(root: Path, name: str, anchor: str, entry: str, import_line: str = "", before: bool = False) -> None:
    """The one registration a row names, in file ``name``: ``entry`` next to the unique ``anchor`` (the registry's
    line), and the import of the dummy's module among the file's imports."""
    path = root / name
    text = path.read_text(encoding="utf-8")
    assert text.count(anchor) == 1, (name, anchor)
    text = text.replace(anchor, entry + anchor if before else anchor + entry)
    if import_line:
        head = "from __future__ import annotations\n\n"
        text = text.replace(head, head + import_line + "\n", 1)
    path.write_text(text, encoding="utf-8")


def changed_files(copy: Path) -> tuple[set[str], set[str]]:
    """(files of the copy that differ from the project's, files only the copy has), as relative paths."""
    changed, added = set(), set()
    for path in copy.rglob("*"):
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        rel = path.relative_to(copy)
        original = REPO / rel
        if not original.is_file():
            added.add(str(rel))
        elif original.read_bytes() != path.read_bytes():
            changed.add(str(rel))
    return changed, added


DRIVER = """
import contextlib, io, json, runpy, sys
from unit_model.fusion_names import parse_fusion

listing, record = sys.argv[1:3]
commands, ran = json.load(open(listing)), {}
for name, argv in commands.items():
    out, err = io.StringIO(), io.StringIO()
    sys.argv = argv
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(argv[0], run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    ran[name] = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
f = parse_fusion("Confidence+power")
ran["parse"] = {"code": 0, "stdout": f"{f.inputs} {f.weighting.original_temperature} {f.operator.name}", "stderr": ""}
json.dump(ran, open(record, "w"))
"""


def run_all(copy: Path, commands: dict[str, list[str]], record: Path) -> dict[str, dict]:
    """Each command line (a script and its flags) run as that script's ``__main__`` in one process of the copy (one
    import of torch for all); what each exited with and printed."""
    (record.parent / "commands.json").write_text(json.dumps(commands), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", DRIVER, str(record.parent / "commands.json"), str(record)], cwd=copy,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(record.read_text(encoding="utf-8"))


METRIC = '''

@register("Confidence", direction="higher")
def token_confidence(logits: torch.Tensor, labels: torch.Tensor,
                     reference_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest probability of each answer token's distribution, whatever the token."""
    logp, _, mask = _prepare(logits, labels)
    return logp.exp().amax(-1).masked_fill(~mask, 0.0), mask
'''

WEIGHTING = '''
"""Alphabet: all the weight on the first source in alphabetical order (a dummy with no scores)."""

from __future__ import annotations

from unit_model.config import FusionConfig
from unit_model.sources import ModuleCache, leave_one_out
from unit_model.weightings.base import Plan, Weighting, groups_of, source_modules


def plan_alphabet(config: FusionConfig, tasks: list[str], cache: ModuleCache) -> Weighting:
    plans = []
    for t in config.target_list:
        sources = leave_one_out(t, tasks)
        plans.append(Plan(t, sources, source_modules(cache, config.source_ckpt_path, t, sources), {}))
    cache.check(config.delta)
    groups = sorted(groups_of(plans[0].modules[0].shapes, config.granularity))
    for plan in plans:
        first = min(plan.sources)
        plan.weights = {s: {g: float(s == first) for g in groups} for s in plan.sources}
    return Weighting(plans)
'''

WEIGHTING_SCRIPT = '''
"""All the weight on the first source in alphabetical order."""

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unit_model import config  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.params import block_params  # noqa: E402

# ---- parameters (each one can be overridden on the command line as --name value) -------------------
delta = "lora"
tasks = "ALL_TASKS"
targets = None  # None: every task of `tasks`
source_ckpt_path = "runs/sources/lora"
save_ckpt_path = "runs/fused/lora/alphabet"
lora_combine = config.DEFAULT_LORA_COMBINE
overwrite = False
# -----------------------------------------------------------------------------------------------------
PARAMS = {**block_params(globals()), **config.MERGE_PARAMS}


def main(argv: list[str] | None = None) -> int:
    args = config.parse_params(PARAMS, argv, __doc__)
    from unit_model.fusion import run_fusion

    return run_fusion("alphabet", args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
'''

MERGE = '''
"""``power``: each task vector entry raised to a signed power (--exponent), then the weighted sum."""

from __future__ import annotations

from unit_model.merges.base import MergeOperator, MergeSetting, weighted_sum
from utils.ranges import POSITIVE

EXPONENT = MergeSetting("exponent", 1.0, "power: each entry becomes sign(x)|x|^exponent before the sum", POSITIVE)


def power(vectors, weights, settings, key):
    return weighted_sum([v.sign() * v.abs() ** settings.exponent for v in vectors], weights)


POWER = MergeOperator("power", power, "signed power of every entry, then the weighted sum", settings=(EXPONENT,))
'''

METHOD = '''
"""(IA)³ on the feed-forward activations only: a dummy delta method."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models.methods.ia3 import IA3


class IA3FFN(IA3):
    name = "ia3_ffn"
    summary = "(IA)³ on the FFN's intermediate activations only"

    def library_config(self, sizes: Mapping[str, Any], d_model: int) -> Any:
        from adapters import IA3Config

        return IA3Config(selfattn_lora=False, intermediate_lora=True, output_lora=False)
'''

FORMAT = '''
"""A folder holding ``delta.npz`` (the tensors) and ``meta.json`` (this project's meta): a dummy format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def is_npz_folder(path: Path) -> bool:
    return (path / "delta.npz").is_file() and (path / "meta.json").is_file()


def read_npz_folder(path: Path):
    with np.load(path / "delta.npz") as arrays:
        tensors = {name: torch.from_numpy(arrays[name].copy()) for name in arrays.files}
    return tensors, json.loads((path / "meta.json").read_text(encoding="utf-8"))
'''


def add_dummies(copy: Path) -> None:
    with open(copy / "get_similarity/metrics.py", "a", encoding="utf-8") as f:
        f.write(METRIC)
    add_file(copy, "unit_model/weightings/alphabet.py", WEIGHTING)
    add_file(copy, "unit_model/unit_model_alphabet.py", WEIGHTING_SCRIPT)
    register(copy, "unit_model/weightings/__init__.py",
             "WEIGHTINGS: dict[str, WeightingSpec] = {w.name: w for w in (\n",
             '    WeightingSpec("alphabet", plan_alphabet),\n',
             "from unit_model.weightings.alphabet import plan_alphabet")
    add_file(copy, "unit_model/merges/power.py", MERGE)
    register(copy, "unit_model/merges/__init__.py", "MAGNITUDE_PRUNE)}", "POWER, ",
             "from unit_model.merges.power import POWER", before=True)
    add_file(copy, "models/methods/ia3_ffn.py", METHOD)
    register(copy, "models/methods/__init__.py", "IA3())}", "IA3FFN(), ", "from models.methods.ia3_ffn import IA3FFN",
             before=True)
    register(copy, "models/sizes.py", '"ia3": {},  # (IA)³ has no sizes: one vector per rescaled activation\n',
             '        "ia3_ffn": {},\n')
    register(copy, "models/sizes.py", '        "ia3": {},\n    },\n}', '        "ia3_ffn": {},\n', before=True)
    add_file(copy, "models/formats/npz_folder.py", FORMAT)
    register(copy, "models/formats/__init__.py", "FORMATS: list[CheckpointFormat] = [\n",
             '    CheckpointFormat("npz", is_npz_folder, read_npz_folder, _inspect_by_reading(read_npz_folder)),\n',
             "from models.formats.npz_folder import is_npz_folder, read_npz_folder")


def tsv(path: Path) -> list[dict[str, str]]:
    header, *rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]
    return [dict(zip(header, row)) for row in rows]


def test_each_row_of_the_to_add_table_is_one_file_and_one_registration(tmp_path: Path) -> None:
    copy = copy_project(tmp_path / "project")
    add_dummies(copy)
    changed, added = changed_files(copy)
    # each row touches its own file and the one place its row names, nothing else
    assert changed == {"get_similarity/metrics.py", "unit_model/weightings/__init__.py",
                       "unit_model/merges/__init__.py", "models/methods/__init__.py", "models/sizes.py",
                       "models/formats/__init__.py"}
    assert added == {"unit_model/weightings/alphabet.py", "unit_model/unit_model_alphabet.py",
                     "unit_model/merges/power.py", "models/methods/ia3_ffn.py", "models/formats/npz_folder.py"}

    library, out = REPO / "models/default-sources/lora", tmp_path / "out"
    pool = sorted(p.name for p in library.iterdir() if p.is_dir())[:6]
    common = ["--delta", "lora", "--tasks", *pool, "--targets", pool[0], pool[1]]
    converted = out / "npz"  # the sources in the dummy checkpoint format
    for task in pool:
        (converted / task).mkdir(parents=True)
        tensors = load_file(str(library / task / "delta.safetensors"))
        np.savez(converted / task / "delta.npz", **{k: v.numpy() for k, v in tensors.items()})
        shutil.copyfile(library / task / "delta_config.json", converted / task / "meta.json")
    average = ["unit_model/unit_model_average.py", *common, "--source_ckpt_path", str(library), "--save_ckpt_path"]
    commands = {
        # a similarity metric: scored by the similarity script, weighted by the fusion script
        "score": ["get_similarity/score.py", "--delta", "lora", "--metric", "Confidence", "Loss", "--tasks", pool[0],
                  pool[1], "--source_tasks", *pool, "--source_ckpt_path", str(library), "--output_dir",
                  str(out / "sim"), "--max_examples", "8"],
        "others": ["unit_model/unit_model_others.py", *common, "--source_ckpt_path", str(library), "--result_tsv",
                   str(out / "sim/result.tsv"), "--metric", "Confidence", "--save_ckpt_path", str(out / "conf")],
        # a weighting, through its own script
        "alphabet": ["unit_model/unit_model_alphabet.py", *common, "--source_ckpt_path", str(library),
                     "--save_ckpt_path", str(out / "alphabet")],
        # a merge operator with a new setting: its flag, help and check in the fusion scripts and the study
        "average help": ["unit_model/unit_model_average.py", "--help"],
        "study help": ["study.py", "--help"],
        "refused": [*average, str(out / "bad"), "--merge", "power", "--exponent", "-1"],
        # magnitude_prune keeping every entry is the plain weighted sum, on power's per-tensor path
        "sum": [*average, str(out / "sum"), "--merge", "magnitude_prune", "--density", "1"],
        "power1": [*average, str(out / "power1"), "--merge", "power", "--exponent", "1"],
        "power2": [*average, str(out / "power2"), "--merge", "power", "--exponent", "2"],
        # a delta method, trained by tune.py
        "tune": ["tune.py", "--do_train", "--do_predict", "--tune_method", "ia3_ffn", "--tasks", pool[0],
                 "--task_dir", str(REPO / "data/synthetic"), "--train_iters", "4", "--valid_interval", "4",
                 "--learning_rate_list", "0.03", "--output_dir", str(out / "ia3_ffn")],
        # a checkpoint format, read by a fusion script
        "npz": ["unit_model/unit_model_average.py", *common, "--source_ckpt_path", str(converted),
                "--save_ckpt_path", str(out / "from_npz"), "--merge", "magnitude_prune", "--density", "1"],
    }
    ran = run_all(copy, commands, tmp_path / "ran.json")
    codes = {name: r["code"] for name, r in ran.items()}
    assert codes == {**dict.fromkeys(commands, 0), "refused": 2, "parse": 0}, {n: ran[n]["stderr"][-500:] for n in ran}

    rows = [r for r in tsv(out / "sim/result.tsv") if r["metric"] == "Confidence"]
    assert len(rows) == 2 * 5 and all(0 < float(r["score"]) <= 1 for r in rows)
    for target in (pool[0], pool[1]):
        scored = {r["source"]: float(r["score"]) for r in rows if r["target"] == target}
        weights = {r["source"]: float(r["weight"]) for r in tsv(out / "conf/weights.tsv") if r["target"] == target}
        assert sorted(scored, key=scored.get) == sorted(weights, key=weights.get)  # higher is more similar
    assert ran["parse"]["stdout"].split() == ["('similarity',)", "0.1", "power"]  # the study's fusion names know it

    heavy = {r["target"]: r["source"] for r in tsv(out / "alphabet/weights.tsv") if float(r["weight"]) == 1.0}
    assert heavy == {pool[0]: pool[1], pool[1]: pool[0]}

    assert "--exponent" in ran["average help"]["stdout"] and "--exponent" in ran["study help"]["stdout"]
    assert ran["refused"]["stderr"].strip().splitlines()[-1].startswith("error: --exponent: expected a positive")

    def fused(name: str) -> dict:
        return load_file(str(out / name / f"without_{pool[0]}" / "delta.safetensors"))

    meta = json.loads((out / "power2" / f"without_{pool[0]}" / "delta_config.json").read_text())
    assert meta["extra"]["merge"] == "power" and meta["extra"]["merge_settings"]["exponent"] == 2.0
    assert all(fused("sum")[k].equal(v) for k, v in fused("power1").items())  # power 1 is the weighted sum
    assert any(not fused("sum")[k].equal(v) for k, v in fused("power2").items())

    checkpoint = next((out / "ia3_ffn" / pool[0]).glob("*/checkpoint"))
    names = load_file(str(checkpoint / "delta.safetensors"))  # only the FFN activations are rescaled
    assert names and all(".DenseReluDense." in n and n.endswith(".lora_B") for n in names), list(names)
    assert json.loads((checkpoint / "delta_config.json").read_text())["method"] == "ia3_ffn"

    assert all(fused("sum")[k].equal(v) for k, v in fused("from_npz").items())  # the same sources, read from npz
