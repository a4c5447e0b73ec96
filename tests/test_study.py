"""study.py end to end on a tiny random backbone: every output, resume after deletion, interruption."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import bootstrap, wilcoxon

import study
from pipeline.layout import fusion_file_name
from tests.conftest import REPO, only_run, small_study_argv
from utils.errors import run_cli

pytestmark = pytest.mark.slow

POOL = "sent_review sent_tweet topic_news topic_places"
TARGETS = "sent_review topic_news"
SUMMARY_ROWS = ["mean", "gain_over_random", "rank", "gain_ci_low", "gain_ci_high", "wins_ties_losses", "wilcoxon_p"]
# One fusion per path through the study (each reads other inputs): uniform, categories, the random-init
# reference, tune-all, dev-all, a similarity metric with a reference, a metric with a merge operator, learned
# weights from a metric's start, and the original's weight rule. The other metrics take KL's path.
FUSIONS = "average manual cos Euclidean Performance KL Loss+dare_ties learned:Loss GraNd@original"
DELTAS = ("lora",)  # two delta methods in one study: test_categories_..._unrequested_stages_skipped
SEEDS, BUDGETS = (13, 100), (2, 3)  # two few-shot splits of every target, two target budgets


def small_study(out: Path, model: Path, deltas: str = "lora", fusions: str = FUSIONS) -> list[str]:
    return ["--output", str(out), "--model", str(model), "--tasks", POOL, "--targets", TARGETS, "--deltas", deltas,
            "--fusions", fusions, "--source_iters", "2", "--source_valid_interval", "1", "--target_budgets",
            " ".join(map(str, BUDGETS)), "--target_data_seeds", " ".join(map(str, SEEDS)),
            "--target_valid_interval", "1", "--target_warmup", "1", "--max_examples", "4", "--lora_r", "2",
            "--adapter_size", "4", "--prefix_length", "2", "--prefix_mlp", "8", "--source_k", "16",
            "--transferability", "true", "--learned_budget", "3"]


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.fixture(scope="module")
def finished(tiny_backbone_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "run"
    assert run_cli(study.main, small_study(out, tiny_backbone_dir, " ".join(DELTAS))) == 0
    return out


def arm_scores(root: Path, delta: str, seed: int, budget: str, arm: str) -> dict[str, float]:
    """Test score per target of one arm (random or a fusion method) on one split at one budget."""
    folder = root / delta / f"seed_{seed}" / budget
    folder = folder / "random" if arm == "random" else folder / "transfer" / fusion_file_name(arm)
    return {r["task"]: float(r["test"]) for r in rows(folder / "result.tsv")}


def check_summary_cells(root: Path, methods: list[str]) -> dict[str, int]:
    """Every figure of summary.tsv recomputed from the (target, seed) cells of the arms' result rows (means with
    numpy, CI and p-value with scipy); returns how many cells took each branch."""
    results = root / "results"
    summary = rows(results / "summary.tsv")
    md = (results / "summary.md").read_text()
    targets = TARGETS.split()
    checked = dict.fromkeys(("ci", "unknown ci", "constant", "p", "no p"), 0)  # which branches the cells took
    for delta in DELTAS:
        for n in BUDGETS:
            budget = f"iters_{n}"
            mine = {r["target"]: r for r in summary if r["delta"] == delta and r["budget"] == budget}
            assert set(mine) == {*targets, *SUMMARY_ROWS}
            random = {s: arm_scores(root, delta, s, budget, "random") for s in SEEDS}
            for m in methods:
                fused = {s: arm_scores(root, delta, s, budget, m) for s in SEEDS}
                for t in targets:  # a target's row is its mean over the data seeds
                    assert float(mine[t][m]) == pytest.approx(np.mean([fused[s][t] for s in SEEDS]), abs=1e-4)
                # every paired figure, recomputed with scipy from the (target, seed) cells of the result rows
                diffs = np.array([fused[s][t] - random[s][t] for t in targets for s in SEEDS])
                mean = np.mean([fused[s][t] for t in targets for s in SEEDS])
                assert float(mine["mean"][m]) == pytest.approx(mean, abs=1e-4)
                assert float(mine["gain_over_random"][m]) == pytest.approx(diffs.mean(), abs=2e-4)
                wins, losses = int((diffs > 1e-9).sum()), int((diffs < -1e-9).sum())
                assert mine["wins_ties_losses"][m] == f"{wins}/{len(diffs) - wins - losses}/{losses}"
                if np.ptp(diffs) > 1e-9:
                    ci = bootstrap((diffs,), np.mean, n_resamples=10_000, method="BCa",
                                   random_state=np.random.default_rng(0)).confidence_interval
                    if np.isfinite(ci.low):
                        assert float(mine["gain_ci_low"][m]) == pytest.approx(ci.low, abs=2e-4)
                        assert float(mine["gain_ci_high"][m]) == pytest.approx(ci.high, abs=2e-4)
                        checked["ci"] += 1
                    else:  # BCa undefined on these cells: unknown, never a number
                        assert mine["gain_ci_low"][m] == mine["gain_ci_high"][m] == "-"
                        checked["unknown ci"] += 1
                else:  # every cell gained the same: the interval is that gain
                    assert float(mine["gain_ci_low"][m]) == pytest.approx(diffs.mean(), abs=2e-4)
                    checked["constant"] += 1
                if wins + losses:
                    assert float(mine["wilcoxon_p"][m]) == pytest.approx(wilcoxon(diffs).pvalue, abs=1e-4)
                    checked["p"] += 1
                else:
                    assert mine["wilcoxon_p"][m] == "-"
                    checked["no p"] += 1
            columns = ["random", *methods]
            for a in columns:  # a better mean never has a worse rank; equal means share a rank
                for b in columns:
                    if float(mine["mean"][a]) > float(mine["mean"][b]):
                        assert int(mine["rank"][a]) < int(mine["rank"][b])
                    elif mine["mean"][a] == mine["mean"][b]:
                        assert mine["rank"][a] == mine["rank"][b]
            assert f"### {delta}, iters {n}: test score by initialisation (mean ± std over data seeds)" in md
            t = targets[0]
            values = [random[s][t] for s in SEEDS]
            assert f"| {t} | {np.mean(values):.3f} ± {np.std(values, ddof=1):.3f} |" in md
    return checked


def test_every_output_exists_and_agrees_with_its_parts(finished):
    check_outputs(finished)


# On the causal family, one fusion per kind of input: uniform, a metric with a reference, a merge operator,
# tune-all's modules and learned weights (the paths the seq2seq study above takes, less the ones that differ only
# in how they weigh the same inputs).
CAUSAL_FUSIONS = "average KL Loss+dare_ties Euclidean learned:Loss"


def test_the_study_on_the_causal_family_writes_every_output_and_agrees_with_its_parts(tiny_causal_dir, tmp_path):
    """The same small study on a tiny Llama-architecture backbone."""
    out = tmp_path / "causal"
    # answers of at most 4 tokens: a random model never stops early, and causal generation recomputes every step
    argv = [*small_study(out, tiny_causal_dir, fusions=CAUSAL_FUSIONS), "--max_output_length", "4"]
    assert run_cli(study.main, argv) == 0
    check_outputs(out, CAUSAL_FUSIONS)
    assert (out / "results" / "index.html").is_file()


def check_outputs(finished: Path, fusions: str = FUSIONS) -> None:
    results = finished / "results"
    for name in ("summary.tsv", "summary.md", "scores.tsv", "transferability.tsv", "transfer_pairs.tsv",
                 "gain_by_method.png", *(f"learning_curves_{d}_iters_{n}.png" for d in DELTAS
                                         for n in BUDGETS)):
        assert (results / name).is_file(), name
    methods = fusions.split()
    assert sorted(p.name for p in (results / "heatmaps").iterdir()) == sorted(
        f"{d}_seed_{s}_{fusion_file_name(m)}.png" for d in DELTAS for s in SEEDS for m in methods)
    assert "learned_from_Loss" in {fusion_file_name(m) for m in methods}  # no ':' in a file name
    check_summary_cells(finished, methods)  # on these tiny runs every arm may score alike: see the planted test
    targets = TARGETS.split()
    # scores.tsv holds every cell the summary is computed from
    cells = rows(results / "scores.tsv")
    assert len(cells) == len(DELTAS) * len(BUDGETS) * len(SEEDS) * len(targets) * (1 + len(methods))
    transfer = rows(results / "transferability.tsv")
    weighted = [m for m in methods if m.split("+")[0].split("@")[0] not in ("average", "manual")]
    assert {(r["delta"], r["method"]) for r in transfer} == {(d, m) for d in DELTAS for m in weighted}
    assert {r["data_seed"] for r in transfer} == {*map(str, SEEDS), "-"}
    pairs = rows(results / "transfer_pairs.tsv")
    assert len(pairs) == len(DELTAS) * len(SEEDS) * len(targets) * (len(POOL.split()) - 1)
    for r in pairs:
        assert r["source"] != r["target"]


def test_summary_ci_and_p_value_on_planted_scores(finished, tiny_backbone_dir, tmp_path, capsys):
    """The tiny runs above may leave every arm at the same score (no spread: no CI to compare). Here the arms'
    test scores are replaced by planted ones that differ from cell to cell, the report is rebuilt by resuming the
    study (every step is done), and its CIs and p-values are compared with scipy's as numbers."""
    copy = tmp_path / "study"
    shutil.copytree(finished, copy)
    rng = np.random.default_rng(5)
    for table in sorted(copy.glob("lora/seed_*/iters_*/**/result.tsv")):
        lines = table.read_text().splitlines()
        header = lines[0].split("\t")
        column = header.index("test")
        rewritten = [lines[0]]
        for line in lines[1:]:
            cells = line.split("\t")
            cells[column] = f"{rng.uniform(0.2, 0.9):.4f}"
            rewritten.append("\t".join(cells))
        table.write_text("\n".join(rewritten) + "\n")
    assert run_cli(study.main, small_study(copy, tiny_backbone_dir, " ".join(DELTAS))) == 0
    assert "to run" in capsys.readouterr().out
    checked = check_summary_cells(copy, FUSIONS.split())
    assert checked["ci"] > 0 and checked["p"] > 0, checked


def test_the_data_seeds_are_different_splits_with_their_own_runs(finished):
    """Each seed's arm is tuned on its own split: its run folder and result row name that split."""
    for s in SEEDS:
        run_root = finished / "lora" / f"seed_{s}" / "iters_2" / "random"
        assert [r["data_seed"] for r in rows(run_root / "result.tsv")] == [str(s)] * len(TARGETS.split())
        assert (only_run(run_root / "sent_review", f"lr_0.003_bsz_8_k_16_data_{s}_seed_*") / "checkpoint").is_dir()
    a, b = (rows(finished / "lora" / f"seed_{s}" / "similarity" / "result.tsv") for s in SEEDS)
    assert [r["score"] for r in a] != [r["score"] for r in b]  # scored on different few-shot examples


def test_index_html_is_one_page_whose_images_all_decode(finished):
    """results/index.html holds the summary tables and every figure inline; each image is a PNG that decodes."""
    import base64
    import io
    from html.parser import HTMLParser

    from PIL import Image

    class Page(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.images, self.tables, self.captions, self.in_caption = [], 0, [], False

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "img":
                self.images.append(attrs["src"])
            self.tables += tag == "table"
            self.in_caption = tag == "figcaption"

        def handle_data(self, data):
            if self.in_caption:
                self.captions.append(data)
                self.in_caption = False

    results = finished / "results"
    page = Page()
    page.feed((results / "index.html").read_text(encoding="utf-8"))
    figures = ["gain_by_method.png", "estimators.png", *(p.name for p in results.glob("learning_curves_*.png")),
               *(p.name for p in (results / "heatmaps").iterdir())]
    assert (results / "estimators.png").is_file()
    assert len(page.images) == len(figures) == 2 + len(DELTAS) * (len(BUDGETS) + len(SEEDS) * len(FUSIONS.split()))
    for src in page.images:
        assert src.startswith("data:image/png;base64,")  # nothing outside the page
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
        image.load()
        assert image.size[0] > 100 and image.size[1] > 100
    # a table per (delta, budget), plus transferability's, the estimators', the fusions against their members and,
    # when a target is a label-word trap, the label-word table; the captions name every heatmap
    traps = "Label words or skill?" in (results / "summary.md").read_text(encoding="utf-8")
    assert page.tables == len(DELTAS) * len(BUDGETS) + 3 + traps
    assert "lora seed 13 KL" in page.captions


def test_resume_reruns_only_the_deleted_step(finished, tiny_backbone_dir, capsys):
    summary_before = (finished / "results" / "summary.tsv").read_text()
    markers = {p.name: p.stat().st_mtime_ns for p in (finished / ".steps").iterdir()}
    shutil.rmtree(finished / "lora" / "seed_13" / "fused" / "KL")
    capsys.readouterr()
    assert run_cli(study.main, small_study(finished, tiny_backbone_dir, " ".join(DELTAS))) == 0
    printed = capsys.readouterr().out
    n = len(FUSIONS.split())
    assert f"lora/seed_13/fusion: {n - 1}/{n} done, 1 to run" in printed
    assert f"lora/seed_100/fusion: {n}/{n} done, 0 to run" in printed
    assert "lora/sources: 4/4 done, 0 to run" in printed
    after = {p.name: p.stat().st_mtime_ns for p in (finished / ".steps").iterdir()}
    changed = sorted(n for n in after if after[n] != markers[n])
    assert changed == ["lora__seed_13__fusion.KL.json"]
    assert (finished / "results" / "summary.tsv").read_text() == summary_before


def test_kill_mid_stage_leaves_nothing_taken_for_finished(tiny_backbone_dir, reference_study, tmp_path):
    """SIGKILL during the sources stage; the rerun completes and matches an uninterrupted run."""
    out = tmp_path / "killed"
    cheap = small_study_argv(out, tiny_backbone_dir)
    cmd = [sys.executable, str(REPO / "study.py"), *cheap]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "lora" / "sources").glob("*/lr_*")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # no temporary run folder was promoted: every run folder left behind is complete
    for run in (out / "lora" / "sources").glob("*/lr_*"):
        assert (run / "checkpoint" / "delta.safetensors").is_file() and (run / "result.json").is_file()
    assert run_cli(study.main, cheap) == 0
    summary = Path("results") / "summary.tsv"
    assert (out / summary).read_text() == (reference_study / summary).read_text()


def test_end_to_end_on_the_embedded_default(tmp_path):
    """Sources -> similarity -> fused checkpoint -> tune.py --train_checkpoint, on models/default."""
    from models.formats import load_delta_checkpoint
    from tests.conftest import DEFAULT_MODEL_DIR

    out = tmp_path / "default"
    argv = ["--output", str(out), "--model", str(DEFAULT_MODEL_DIR), "--tasks", POOL, "--targets", "sent_review",
            "--deltas", "lora", "--fusions", "manual Loss", "--source_iters", "10", "--source_valid_interval", "10",
            "--target_budgets", "4", "--target_data_seeds", "100", "--target_valid_interval", "2", "--max_examples",
            "8", "--source_k", "64", "--source_data_seed", "100"]
    assert run_cli(study.main, argv) == 0
    split = out / "lora" / "seed_100"
    fused, meta = load_delta_checkpoint(split / "fused" / "Loss" / "without_sent_review")
    assert meta["task"] == "sent_review" and "sent_review" not in meta["extra"]["sources"]
    run = only_run(split / "iters_4" / "transfer" / "Loss" / "sent_review")
    curve = rows(run / "curve.tsv")
    log = (run / "log.txt").read_text()
    assert "initialisation from" in log and "fused" in log and curve[0]["step"] == "0"
    summary = rows(out / "results" / "summary.tsv")
    assert [r["target"] for r in summary] == ["sent_review", *SUMMARY_ROWS]


def crossfit_copy(root: Path, names: dict[str, str]) -> Path:
    """Suite tasks copied under new names (no built-in category knows them), CrossFit layout."""
    from dataloader.synthetic import SUITE_DIR

    for old, new in names.items():
        (root / new).mkdir(parents=True)
        for f in (SUITE_DIR / old).glob(f"{old}_16_*"):
            (root / new / f.name.replace(old, new, 1)).write_bytes(f.read_bytes())
    return root


CROSSFIT_NAMES = {"sent_review": "cf_a", "sent_tweet": "cf_b", "topic_news": "cf_c"}


def test_manual_without_categories_is_refused_before_anything_is_written(tiny_backbone_dir, tmp_path, capsys):
    data = crossfit_copy(tmp_path / "data", CROSSFIT_NAMES)
    out = tmp_path / "study"
    argv = ["--output", str(out), "--model", str(tiny_backbone_dir), "--task_dir", str(data), "--tasks",
            "cf_a cf_b cf_c", "--targets", "cf_a", "--fusions", "average manual", "--source_k", "16"]
    assert run_cli(study.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --fusions manual:") and "'cf_a' has no manual category" in err
    assert "task_categories.tsv" in err and err.count("\n") == 1
    assert not out.exists()


def test_categories_from_the_task_folder_and_unrequested_stages_skipped(tiny_backbone_dir, tmp_path, capsys):
    """A task_categories.tsv gives 'manual' its categories; without Euclidean, Performance, a similarity metric
    or transferability, the tune-all, dev-all, similarity and pairs stages run nothing and leave no files."""
    data = crossfit_copy(tmp_path / "data", CROSSFIT_NAMES)
    (data / "task_categories.tsv").write_text("task\tcategory\ncf_a\tsentiment\ncf_b\tsentiment\ncf_c\ttopic\n")
    out = tmp_path / "study"
    argv = ["--output", str(out), "--model", str(tiny_backbone_dir), "--task_dir", str(data), "--tasks",
            "cf_a cf_b cf_c", "--targets", "cf_a", "--fusions", "average manual", "--source_k", "16",
            "--source_iters", "2", "--source_valid_interval", "1", "--target_budgets", "2",
            "--target_data_seeds", "100", "--target_valid_interval", "1", "--lora_r", "2", "--device", "cpu",
            "--deltas", "lora adapter", "--adapter_size", "4"]
    assert run_cli(study.main, argv) == 0
    printed = capsys.readouterr().out
    for name in ("tuneall", "devall", "similarity", "pairs"):
        assert f"lora/seed_100/{name}: skipped" in printed and f"adapter/seed_100/{name}: skipped" in printed
    lora = out / "lora"
    assert sorted(p.name for p in lora.iterdir()) == ["seed_100", "sources"]
    assert sorted(p.name for p in (lora / "seed_100").iterdir()) == ["fused", "iters_2"]
    assert sorted(p.name for p in (lora / "seed_100" / "iters_2").iterdir()) == ["random", "transfer"]
    assert not [m for m in (out / ".steps").iterdir() if any(k in m.name for k in ("tuneall", "devall", "pairs"))]
    weights = rows(lora / "seed_100" / "fused" / "manual" / "weights.tsv")
    assert {r["source"] for r in weights} == {"cf_b"}  # cf_a's own category, from the file
    # a resumed study may add a budget: only its stages run, the finished ones are kept
    before = (lora / "seed_100" / "iters_2" / "random" / "result.tsv").read_bytes()
    budgets = argv.index("--target_budgets") + 1
    assert run_cli(study.main, [*argv[:budgets], "2 3", *argv[budgets + 1:]]) == 0
    printed = capsys.readouterr().out
    assert "lora/seed_100/iters_2/transfer: 2/2 done, 0 to run" in printed
    assert "lora/seed_100/iters_3/transfer: 0/2 done, 2 to run" in printed
    assert (lora / "seed_100" / "iters_2" / "random" / "result.tsv").read_bytes() == before
    summary = rows(out / "results" / "summary.tsv")
    # two delta methods in one study: each has its rows per budget, its heatmaps and its learning curves
    assert {(r["delta"], r["budget"]) for r in summary} == {(d, b) for d in ("lora", "adapter")
                                                              for b in ("iters_2", "iters_3")}
    for d in ("lora", "adapter"):
        mine = {r["target"]: r for r in summary if r["delta"] == d and r["budget"] == "iters_2"}
        random = {r["task"]: float(r["test"]) for r in rows(out / d / "seed_100" / "iters_2" / "random" / "result.tsv")}
        assert float(mine["cf_a"]["random"]) == pytest.approx(random["cf_a"], abs=1e-4)
    results = out / "results"
    assert sorted(p.name for p in (results / "heatmaps").iterdir()) == sorted(
        f"{d}_seed_100_{m}.png" for d in ("lora", "adapter") for m in ("average", "manual"))
    assert {p.name for p in results.glob("learning_curves_*.png")} == {
        f"learning_curves_{d}_iters_{n}.png" for d in ("lora", "adapter") for n in (2, 3)}


def test_a_library_of_peft_adapters_is_the_source_pool(tiny_backbone_dir, tmp_path, capsys):
    """source_library: ready PEFT modules (named peft-{task}, mapped by sources.tsv) replace stage 1; the pool's
    large splits are not read, and every later stage takes its sources from the library."""
    from models.backbone import load_backbone
    from models.delta import DeltaConfig, attach_delta, backbone_fingerprint, delta_state_dict, save_delta_checkpoint
    from models.formats.peft_export import export_peft

    alpha = study.PARAMS["lora_alpha"]
    cfg = DeltaConfig("lora", lora_r=2, lora_alpha=alpha)
    model, _ = load_backbone(tiny_backbone_dir)
    attach_delta(model, cfg)
    library = tmp_path / "library"
    lines = ["task\tfolder"]
    for seed, task in enumerate(("sent_tweet", "topic_news")):
        g = torch.Generator().manual_seed(seed)
        tensors = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in delta_state_dict(model).items()}
        save_delta_checkpoint(tmp_path / "ours" / task, tensors, cfg, "tiny", backbone_fingerprint(model))
        export_peft(tmp_path / "ours" / task, library / f"peft-{task}", base_model=str(tiny_backbone_dir))
        lines.append(f"{task}\tpeft-{task}")
    (library / "sources.tsv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "study"
    argv = ["--output", str(out), "--model", str(tiny_backbone_dir), "--tasks", "sent_review sent_tweet topic_news",
            "--targets", "sent_review", "--source_library", str(library), "--fusions", "average Loss",
            "--lora_r", "2", "--target_budgets", "2", "--target_data_seeds", "100", "--target_valid_interval", "1",
            "--max_examples", "4", "--device", "cpu"]
    assert run_cli(study.main, argv) == 0
    assert "lora/sources: skipped (source modules from" in capsys.readouterr().out
    assert not (out / "lora" / "sources").exists()
    weights = rows(out / "lora" / "seed_100" / "fused" / "Loss" / "weights.tsv")
    assert {r["source"] for r in weights} == {"sent_tweet", "topic_news"}
    assert {r["target"] for r in rows(out / "results" / "summary.tsv")} >= {"sent_review", "mean"}
    # a library whose modules have other sizes than the study's is refused before anything is written
    assert run_cli(study.main, [*argv[:1], str(tmp_path / "other"), *argv[2:], "--lora_r", "4"]) == 2
    assert "--source_library: task sent_tweet's module is method=lora lora_r=2" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
