"""Scale-out (utils/jobs.py, sweep.py, study.py's jobs): parallel and Slurm-array runs write the sequential files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import submitit
import torch

import study
import sweep
import tune
from get_similarity import dev_all, tune_all
from models import dev_all as dev_all_lib
from models.formats import load_delta_checkpoint
from pipeline.launch import order_result_tsv
from tests.conftest import DEFAULT_MODEL_DIR, REPO, STUDY_POOL, STUDY_TARGETS, SUITE_DIR, runs_in, small_study_argv
from tests.test_tuneall_devall import DEV, LORA, TASKS, TRAIN, make_sources
from utils.errors import UserInputError, run_cli
from utils.jobs import Job, LaunchOptions, parse_minutes, run_jobs

# 2 tasks x 2 learning rates on the embedded default and the bundled suite; --save_last keeps the trained
# module (a best-dev pick after 4 steps would often be the untouched initialisation).
SWEEP = ["--do_train", "--do_predict", "--quiet", "--tune_method", "lora", "--lora_r", "2", "--model",
         str(DEFAULT_MODEL_DIR), "--task_dir", str(SUITE_DIR), "--tasks", "sent_review", "topic_news", "--k", "16",
         "--learning_rate_list", "1e-3", "3e-2", "--bsz_list", "4", "--train_iters", "4", "--warmup_steps", "1",
         "--valid_interval", "2", "--log_interval", "2", "--max_output_length", "6", "--predict_batch_size", "100",
         "--save_last"]
SWEEP_TASKS = ("sent_review", "topic_news")


@pytest.fixture()
def task_dir(tmp_path: Path) -> Path:
    """Three tiny tasks (test_tuneall_devall's) for tune-all and dev-all on the tiny backbone."""
    for task in TASKS:
        (tmp_path / "data" / task).mkdir(parents=True)
        for split, text in {"train": TRAIN, "dev": DEV}.items():
            (tmp_path / "data" / task / f"{task}_16_100_{split}.tsv").write_text(text, encoding="utf-8")
    return tmp_path / "data"


def local_executor(folder: Path, options: LaunchOptions) -> submitit.AutoExecutor:
    return submitit.AutoExecutor(folder=folder, cluster="local")


def python_job(name: str, code: str) -> Job:
    return Job(name, [sys.executable, "-c", code])


def same_tensors(a: Path, b: Path, roots: tuple[Path, Path] | None = None) -> None:
    """Bit-identical tensors and the same metadata (up to the two runs' own output folders in ``roots``)."""
    ta, ma = load_delta_checkpoint(a)
    tb, mb = load_delta_checkpoint(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[n], tb[n]) for n in ta), (a, b)
    if roots:
        ma, mb = (json.loads(json.dumps(m).replace(str(r), "ROOT")) for m, r in zip((ma, mb), roots))
    assert ma == mb


def same_sweep(out: Path, reference: Path) -> None:
    """Same result.tsv bytes, bit-identical checkpoints, same curves and predictions, one log per job."""
    assert (out / "result.tsv").read_bytes() == (reference / "result.tsv").read_bytes()
    runs = [(task, run.name) for task in SWEEP_TASKS for run in runs_in(reference / task)]
    assert [(task, run.name) for task in SWEEP_TASKS for run in runs_in(out / task)] == runs and len(runs) == 4
    for task, run in runs:
        same_tensors(out / task / run / "checkpoint", reference / task / run / "checkpoint")
        for name in ("curve.tsv", "test_predictions.tsv", "result.json"):
            assert (out / task / run / name).read_bytes() == (reference / task / run / name).read_bytes()
        assert "$ " in (out / "logs" / task / f"{run}.log").read_text().splitlines()[0]


@pytest.fixture(scope="module")
def sequential(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sequential") / "sweep"
    # one run at a time, as the jobs run them: on the embedded default dropout is on, and a module trained in a
    # group gets other dropout masks (models/group.py)
    assert run_cli(tune.main, [*SWEEP, "--output_dir", str(out), "--group_size", "1"]) == 0
    rows = (out / "result.tsv").read_text().splitlines()
    assert len(rows) == 5 and rows[1].startswith("sent_review\t16\t100\t0.001\t4\t")
    # The trained modules differ between learning rates: the comparison below is not of untouched inits.
    first, second = runs_in(out / "sent_review")  # lr 0.001 and 0.03, in name order
    a, _ = load_delta_checkpoint(first / "checkpoint")
    b, _ = load_delta_checkpoint(second / "checkpoint")
    assert any(not torch.equal(a[n], b[n]) for n in a)
    return out


@pytest.mark.slow
def test_jobs_2_sweep_equals_the_sequential_run(sequential, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert run_cli(sweep.main, ["--jobs", "2", "tune", *SWEEP, "--output_dir", str(out)]) == 0
    assert "jobs: 4 of 4 succeeded" in capsys.readouterr().out
    same_sweep(out, sequential)


@pytest.mark.slow
def test_submitit_local_array_equals_the_sequential_run(sequential, tmp_path, capsys):
    out = tmp_path / "sweep"
    code = run_cli(sweep.main, ["--slurm", "--slurm_cluster", "local", "--slurm_time", "10", "tune", *SWEEP,
                                "--output_dir", str(out)])
    assert code == 0
    assert "jobs: 4 of 4 succeeded" in capsys.readouterr().out
    same_sweep(out, sequential)
    assert list((out / "logs" / "slurm").glob("*_0_log.out"))  # submitit's own files beside the job logs


def test_failing_job_is_reported_with_its_log_and_the_others_finish(tmp_path, capsys):
    jobs = [python_job("fails", "import sys; print('error: no such file x.tsv', file=sys.stderr); sys.exit(3)"),
            python_job("slow/ok", "import time; time.sleep(0.5); print('done')"),
            python_job("ok", "print('done')")]
    report = run_jobs(jobs, LaunchOptions(jobs=2), tmp_path / "logs")
    assert [r.returncode for r in report.results] == [3, 0, 0]
    assert [r.job.name for r in report.failed] == ["fails"]
    assert (tmp_path / "logs" / "slow" / "ok.log").read_text().endswith("done\n")
    summary = capsys.readouterr().out
    assert "jobs: 2 of 3 succeeded" in summary
    assert (f"FAILED fails: exit code 3 (error: no such file x.tsv); log {tmp_path / 'logs' / 'fails.log'}"
            in summary)


def test_jobs_1_runs_in_order_and_a_program_that_cannot_start_fails(tmp_path, capsys):
    order = tmp_path / "order.txt"
    jobs = [python_job(str(i), f"open({str(order)!r}, 'a').write('{i}')") for i in range(5)]
    jobs.append(Job("missing", [str(tmp_path / "no-such-program")]))
    report = run_jobs(jobs, LaunchOptions(jobs=1), tmp_path / "logs")
    assert order.read_text() == "01234"
    assert [r.job.name for r in report.failed] == ["missing"] and report.failed[0].returncode is None
    assert "could not start" in capsys.readouterr().out


def test_submitit_local_array_reports_a_failing_task(tmp_path, capsys):
    jobs = [python_job("ok", "print('fine')"), python_job("bad", "raise SystemExit(5)")]
    options = LaunchOptions(slurm=True, slurm_time="5", poll_s=0.2).validate()
    report = run_jobs(jobs, options, tmp_path / "logs", executor_factory=local_executor)
    assert [r.returncode for r in report.results] == [0, 5]
    assert (tmp_path / "logs" / "ok.log").read_text().endswith("fine\n")
    assert "FAILED bad: exit code 5" in capsys.readouterr().out


def test_no_wait_prints_the_array_id_and_returns(tmp_path, capsys):
    log = tmp_path / "logs" / "late.log"
    options = LaunchOptions(slurm=True, slurm_time="5", wait=False).validate()
    report = run_jobs([python_job("late", "import time; time.sleep(1); print('finished')")], options,
                      tmp_path / "logs", executor_factory=local_executor)
    assert report.submitted and not report.failed
    assert f"as array {report.submitted}" in capsys.readouterr().out
    deadline = time.time() + 60  # the job runs on after the call returned
    while not (log.is_file() and log.read_text().endswith("finished\n")) and time.time() < deadline:
        time.sleep(0.2)
    assert log.read_text().endswith("finished\n")


def test_tune_plan_has_one_job_per_task_lr_bsz(tmp_path):
    plan = sweep.plan_tune([*SWEEP, "--bsz_list", "4", "8", "--output_dir", str(tmp_path / "out")])
    assert [j.name.split("_k_")[0] for j in plan.jobs] == [f"{t}/lr_{lr}_bsz_{b}" for t in SWEEP_TASKS
                                                          for lr in ("0.001", "0.03") for b in (4, 8)]
    assert len({j.name for j in plan.jobs}) == 8
    parsed = [tune.build_parser().parse_args(j.argv[2:]) for j in plan.jobs]
    assert all(j.argv[:2] == [sys.executable, str(REPO / "tune.py")] for j in plan.jobs)
    assert [(a.tasks, a.learning_rate_list, a.bsz_list) for a in parsed][:2] == [
        (["sent_review"], [1e-3], [4]), (["sent_review"], [1e-3], [8])]
    assert plan.log_dir == tmp_path / "out" / "logs"


@pytest.mark.parametrize(("argv", "message"), [
    (["--jobs", "0", "tune"], "--jobs: expected a positive integer"),
    (["--jobs", "2", "--slurm", "tune"], "--jobs with --slurm"),
    (["--no_wait", "tune"], "--no_wait: only with --slurm"),
    (["--slurm", "--slurm_time", "1:30", "tune"], "--slurm_time: expected minutes"),
    (["--jobs", "2", "tune", "--do_train", "--tasks", "no_such_task"], "no_such_task"),
    (["--jobs", "2", "tuneall", "--tasks", "sent_review", "sent_tweet", "--source_ckpt_path", "/nonexistent",
      "--output_dir", "x"], "--source_ckpt_path /nonexistent: folder does not exist"),
])
def test_bad_input_exits_2_before_any_job_starts(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_cli(sweep.main, argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_existing_run_folder_is_refused_up_front(tmp_path, capsys):
    out = tmp_path / "out"
    run = sweep.plan_tune([*SWEEP, "--output_dir", str(out)]).jobs[1].name  # sent_review at lr 0.03
    (out / run).mkdir(parents=True)
    assert run_cli(sweep.main, ["--jobs", "2", "tune", *SWEEP, "--output_dir", str(out)]) == 2
    assert f"{Path(run).name}: run folder exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.rglob("*")) == sorted([Path(run).name, "sent_review"])


@pytest.mark.cli
def test_cli_exit_code_is_1_when_jobs_fail(tiny_backbone_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--do_train", "--quiet", "--model", str(tiny_backbone_dir), "--tasks", "sent_review",
            "--train_iters", "1", "--train_checkpoint", str(tmp_path / "missing"), "--output_dir", str(out)]
    assert run_cli(sweep.main, ["--jobs", "2", "tune", *argv]) == 1
    summary = capsys.readouterr().out
    (log,) = (out / "logs" / "sent_review").glob("lr_*.log")
    assert "jobs: 0 of 1 succeeded" in summary
    assert (f"FAILED sent_review/{log.stem}: exit code 2 (error: {tmp_path / 'missing'}: "
            "checkpoint not found" in summary and summary.rstrip().endswith(f"log {log}"))
    assert "checkpoint not found" in log.read_text()
    assert not (out / "result.tsv").exists()


def test_order_result_tsv_puts_the_sweep_rows_last_in_sweep_order(tmp_path):
    header = "task\tk\tdata_seed\tlr\tbsz\tseed\tmethod\trun\tdev\ttest\tbest_step\n"
    b, old, a3, a1 = ("b\t16\t100\t0.001\t8\t42\tlora\tr1\t0.5\t0.5\t2\n",
                      "old\t16\t100\t0.001\t8\t42\tlora\tr1\t1.0\t1.0\t4\n",
                      "a\t16\t100\t0.003\t8\t42\tlora\tr3\t0.1\t0.2\t0\n",
                      "a\t16\t100\t0.001\t8\t42\tlora\tr1\t0.3\t0.3\t2\n")
    (tmp_path / "result.tsv").write_text(header + b + old + a3 + a1)  # as parallel jobs may leave it
    order_result_tsv(tmp_path, [("a", "r1"), ("a", "r3"), ("b", "r1")])
    assert (tmp_path / "result.tsv").read_text() == header + old + a1 + a3 + b


@pytest.mark.parametrize("dropped", [("run",), ("run", "seed", "method")])
def test_an_older_result_tsv_is_rewritten_with_unknown_columns(tmp_path, dropped):
    """A result.tsv from before the run column (or also the seed and method columns) reads; its rows say "-" for
    them, and keep their old identity (task, k, data_seed, lr, bsz)."""
    from models.run_folders import RESULT_COLUMNS

    columns = [c for c in RESULT_COLUMNS if c not in dropped]
    values = {"k": "16", "data_seed": "100", "lr": "0.001", "bsz": "8", "seed": "42", "method": "lora", "dev": "0.5",
              "test": "0.5", "best_step": "2"}
    rows = ["\t".join([task, *(values[c] for c in columns[1:])]) + "\n" for task in ("b", "a")]
    (tmp_path / "result.tsv").write_text("\t".join(columns) + "\n" + "".join(rows))
    order_result_tsv(tmp_path, [("a", "16", "100", "0.001", "8")])
    full = {**values, **{c: "-" for c in dropped}}
    assert (tmp_path / "result.tsv").read_text() == "\t".join(RESULT_COLUMNS) + "\n" + "".join(
        "\t".join([task, *(full[c] for c in RESULT_COLUMNS[1:])]) + "\n" for task in ("b", "a"))


@pytest.mark.parametrize("text, minutes", [("90", 90), ("1:30:00", 90), ("0:00:30", 1), ("2-00:00:00", 2880),
                                           ("1-12", 2160), ("1-0:30", 1470)])
def test_slurm_time_formats(text, minutes):
    assert parse_minutes(text) == minutes


def test_dev_all_merge_replaces_in_place_and_keep_pairs_orders(tmp_path):
    table = tmp_path / "dev_all.tsv"
    dev_all_lib.merge_rows(table, [["b", "a", "0.5", "-"]])
    dev_all_lib.merge_rows(table, [["a", "b", "0.25", "0.75"], ["a", "c", "0.0", "-"]])
    dev_all_lib.merge_rows(table, [["b", "a", "0.5", "1.0"]])  # replaced where it stands
    assert dev_all_lib.read_rows(table) == [["b", "a", "0.5", "1.0"], ["a", "b", "0.25", "0.75"],
                                            ["a", "c", "0.0", "-"]]
    dev_all_lib.keep_pairs(table, [("a", "b"), ("b", "a")])
    assert table.read_text() == "target\tsource\tdev_zero_shot\tdev_after\na\tb\t0.25\t0.75\nb\ta\t0.5\t1.0\n"
    with pytest.raises(UserInputError, match="no row for target 'a' and source 'c'"):
        dev_all_lib.keep_pairs(table, [("a", "c")])
    table.write_text("target\tsource\tdev_zero_shot\tdev_after\na\tb\t0.25\n")
    with pytest.raises(UserInputError, match=r"dev_all.tsv:2: expected 4 tab-separated fields, found 3"):
        dev_all_lib.merge_rows(table, [["a", "c", "0.0", "-"]])


@pytest.mark.slow
def test_tuneall_and_devall_pairs_split_across_jobs_equal_one_process(tiny_backbone_dir, task_dir, tmp_path, capsys):
    sources = make_sources(tmp_path / "sources", tiny_backbone_dir, LORA, TASKS)
    common = ["--model", str(tiny_backbone_dir), "--task_dir", str(task_dir), "--tasks", "beta", "alpha",
              "--source_tasks", "gamma", "--source_ckpt_path", str(sources), "--max_output_length", "4",
              "--quiet"]
    fast = ["--steps", "2", "--learning_rate", "1e-2", "--bsz", "2", "--warmup_steps", "1"]
    pairs = [("beta", "gamma"), ("alpha", "gamma")]  # in the order of --tasks, not alphabetical

    one, split = tmp_path / "one", tmp_path / "split"
    assert run_cli(tune_all.main, [*common, *fast, "--output_dir", str(one)]) == 0
    assert run_cli(dev_all.main, [*common, "--tuneall_ckpt_path", str(one), "--output", str(one / "dev.tsv")]) == 0
    assert run_cli(sweep.main, ["--jobs", "2", "tuneall", *common, *fast, "--output_dir", str(split)]) == 0
    # A stale row from another run is dropped, as a single process replacing the table would.
    (split / "dev.tsv").write_text("target\tsource\tdev_zero_shot\tdev_after\ngamma\talpha\t0.1\t-\n")
    assert run_cli(sweep.main, ["--jobs", "2", "devall", *common, "--tuneall_ckpt_path", str(split),
                                "--output", str(split / "dev.tsv")]) == 0
    assert capsys.readouterr().out.count("jobs: 2 of 2 succeeded") == 2

    for t, s in pairs:
        same_tensors(split / t / s, one / t / s)
        assert (split / "logs" / t / f"{s}.log").is_file()
    assert (split / "dev.tsv").read_bytes() == (one / "dev.tsv").read_bytes()
    assert [line.split("\t")[:2] for line in (one / "dev.tsv").read_text().splitlines()[1:]] == [list(p) for p in pairs]


def read_tree(root: Path, names: list[str]) -> dict[str, bytes]:
    return {name: (root / name).read_bytes() for name in names}


@pytest.mark.slow
def test_study_with_jobs_2_writes_the_sequential_outputs(tiny_backbone_dir, reference_study, tmp_path, capsys,
                                                         monkeypatch):
    """Every dispatched stage through the real launcher; each job's entry point runs in this process, one at a
    time (torch's RNG is per process), so the test does not pay a Python start-up per job. The sequential run is
    the session's reference study."""
    import utils.jobs

    mains = {"tune.py": tune.main, "tune_all.py": tune_all.main, "dev_all.py": dev_all.main}
    lock, scripts = threading.Lock(), []

    def in_process(argv, cwd, log, env=None, started=None) -> int:
        with lock:
            scripts.append(Path(argv[1]).name)
            Path(log).parent.mkdir(parents=True, exist_ok=True)
            Path(log).write_text(" ".join(argv) + "\n")
            return run_cli(mains[Path(argv[1]).name], argv[2:])

    monkeypatch.setattr(utils.jobs, "run_command", in_process)
    one, split = reference_study, tmp_path / "split"
    assert run_cli(study.main, [*small_study_argv(split, tiny_backbone_dir), "--jobs", "2"]) == 0
    console = capsys.readouterr().out
    assert "jobs:" not in console  # one line per stage on the console; what a stage prints goes to its log
    logs = sorted((split / "logs").glob("*.log"))
    out = "".join(log.read_text() for log in logs)
    # sources (4 jobs), random (2), tune-all (2 targets, their 3 sources in one group), dev-all (6 pairs),
    # transfer (2 fusions x 2)
    for n in (4, 2, 2, 6, 4):
        assert f"jobs: {n} of {n} succeeded" in out
    assert sorted(scripts) == sorted(["tune.py"] * 10 + ["tune_all.py"] * 2 + ["dev_all.py"] * 6)

    files = ["lora/sources/result.tsv", "lora/seed_100/iters_2/random/result.tsv", "lora/seed_100/devall.tsv",
             "lora/seed_100/pairs.tsv", "lora/seed_100/iters_2/transfer/average/result.tsv",
             "lora/seed_100/iters_2/transfer/Loss/result.tsv", "results/summary.tsv", "results/transferability.tsv"]
    assert read_tree(split, files) == read_tree(one, files)
    for t in STUDY_TARGETS.split():
        for s in STUDY_POOL.split():
            if s != t:
                tuned = Path("lora") / "seed_100" / "tuneall" / t / s
                same_tensors(split / tuned, one / tuned, (split, one))
    assert "--merge" in (split / "logs" / "lora-seed_100-devall" / "topic_news" / "sent_tweet.log").read_text()
    assert sorted(p.name for p in (split / ".steps").iterdir()) == sorted(p.name for p in (one / ".steps").iterdir())


def test_scripts_route_through_the_launcher_only_when_asked(tmp_path):
    def dry(script: str, **env: str) -> list[str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "JOBS", "JOB_LOG_DIR"))}
        proc = subprocess.run(["bash", str(REPO / "scripts" / script)], env={**clean, "DRY_RUN": "1", **env},
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    assert dry("lora.sh")[1] == "tune.py" and dry("lora.sh", JOBS="1")[1] == "tune.py"
    assert dry("lora.sh", JOBS="3")[1:5] == ["sweep.py", "--jobs", "3", "tune"]
    words = dry("lora_tuneall.sh", SLURM="1", SLURM_PARTITION="gpu", SLURM_GPUS="1", SLURM_TIME="2:00:00",
                SLURM_NO_WAIT="1", JOB_LOG_DIR=str(tmp_path))
    assert words[1:words.index("tuneall")] == ["sweep.py", "--slurm", "--slurm_partition", "gpu", "--slurm_time",
                                               "2:00:00", "--slurm_gpus", "1", "--no_wait", "--log_dir", str(tmp_path)]
    assert dry("lora_devall.sh", SLURM_PARTITION="gpu")[1:3] == ["-m", "get_similarity.dev_all"]  # SLURM unset
    assert dry("adapter_devall.sh", JOBS="2")[1:5] == ["sweep.py", "--jobs", "2", "devall"]
