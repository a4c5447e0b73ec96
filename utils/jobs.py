"""Run a list of independent jobs: N local processes at once, or one Slurm job array through submitit.

A job is the argv of one of the project's entry points (``[sys.executable, "tune.py", ...]``), run as its
own process with stdout and stderr in ``{log_dir}/{name}.log``. Jobs never share state in memory; what
they share on disk (``result.tsv``, a dev-all table) is written under a file lock by the entry points.

* ``jobs=1`` runs them one after the other, in order; ``jobs=N`` keeps N running (a thread per slot waits
  on its child process). A failing job does not stop the others.
* ``slurm=True`` submits one job array (``executor.map_array``), one array task per job, and waits for
  it unless ``wait=False``. The executor comes from a factory, so tests pass submitit's local one.

Either way a tqdm bar counts finished jobs, and a summary names each failed job with its exit code, its
last log line and its log; ``Report.failed`` is non-empty then and the command-line callers exit non-zero.
Logs are streamed, not written atomically: a job that is killed leaves the log it had, which is the point.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.errors import UserInputError
from utils.progress import progress_bar
from utils.threads import threads_per_job

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SLURM_MINUTES = 240  # submitit's own default (5 minutes) is too short for any training run


@dataclass(frozen=True)
class Job:
    """One process to run: ``name`` is unique in its batch and names the log (``/`` makes subfolders)."""

    name: str
    argv: list[str]


@dataclass
class JobResult:
    job: Job
    log: Path
    returncode: int | None  # None: the job never returned (Slurm: cancelled, timed out, node failure)
    error: str = ""  # why it failed, when the log cannot say (scheduler errors)
    scheduler_log: str = ""  # Slurm: submitit's stderr file of the array task

    @property
    def ok(self) -> bool:
        return self.returncode == 0


@dataclass
class Report:
    results: list[JobResult] = field(default_factory=list)
    seconds: float = 0.0
    submitted: str | None = None  # the Slurm array's id when it was not waited for

    @property
    def failed(self) -> list[JobResult]:
        if self.submitted is not None:  # nothing is known yet about jobs that were not waited for
            return []
        return [r for r in self.results if not r.ok]

    def summary(self) -> str:
        if self.submitted is not None:
            return f"jobs: submitted {len(self.results)} job(s) as Slurm array {self.submitted}"
        lines = [f"jobs: {len(self.results) - len(self.failed)} of {len(self.results)} succeeded "
                 f"in {self.seconds:.0f}s"]
        for r in self.failed:
            why = f"exit code {r.returncode}" if r.returncode is not None else (r.error or "did not finish")
            last = last_line(r.log)
            lines.append(f"  FAILED {r.job.name}: {why}" + (f" ({last})" if last else "") + f"; log {r.log}"
                         + (f"; scheduler log {r.scheduler_log}" if r.scheduler_log else ""))
        return "\n".join(lines)


class JobsFailed(Exception):
    """Some jobs of a batch failed (the summary has been printed); raised by callers that cannot go on."""

    def __init__(self, report: Report):
        first = report.failed[0]
        super().__init__(f"{len(report.failed)} of {len(report.results)} job(s) failed (first: {first.job.name}, "
                         f"log {first.log}); fix the cause and rerun to resume")
        self.report = report


@dataclass
class LaunchOptions:
    """How to run a batch; ``validate()`` turns flag values into these or raises UserInputError."""

    jobs: int = 1
    slurm: bool = False
    slurm_partition: str | None = None
    slurm_time: str | int = DEFAULT_SLURM_MINUTES  # minutes, or [D-]HH:MM:SS
    slurm_gpus: int = 0
    slurm_cpus: int | None = None  # None: the cluster's default
    slurm_mem: float | None = None  # GB; None: the cluster's default
    slurm_array_parallelism: int | None = None  # None: submitit's default (256)
    slurm_log_dir: str | None = None  # submitit's folder (pickles, scheduler logs); default {log_dir}/slurm
    slurm_cluster: str | None = None  # None: submitit detects Slurm; "local": the array runs on this machine
    wait: bool = True
    poll_s: float = 10.0  # how often a waiting Slurm array is polled

    @property
    def minutes(self) -> int:
        return parse_minutes(self.slurm_time)

    def validate(self) -> LaunchOptions:
        if self.jobs < 1:
            raise UserInputError(f"--jobs: expected a positive integer, found {self.jobs}")
        if self.slurm and self.jobs > 1:
            raise UserInputError("--jobs with --slurm: choose one (--slurm_array_parallelism caps the array tasks "
                                 "that run at once)")
        if not self.wait and not self.slurm:
            raise UserInputError("--no_wait: only with --slurm (local jobs end with this process)")
        self.minutes  # noqa: B018  (raises on a bad --slurm_time)
        if self.slurm_gpus < 0:
            raise UserInputError(f"--slurm_gpus: expected zero or more, found {self.slurm_gpus}")
        for flag, value in {"--slurm_cpus": self.slurm_cpus,
                            "--slurm_array_parallelism": self.slurm_array_parallelism}.items():
            if value is not None and value <= 0:
                raise UserInputError(f"{flag}: expected a positive integer, found {value}")
        if self.slurm_mem is not None and not self.slurm_mem > 0:
            raise UserInputError(f"--slurm_mem: expected a positive number of GB, found {self.slurm_mem}")
        return self


def parse_minutes(text: str | int) -> int:
    """Slurm-style time limit -> minutes: ``90``, ``1:30:00`` or ``2-00:00:00`` (days-hours:minutes:seconds)."""
    text = str(text).strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not match or (match.group(1) is None and match.group(3) is not None and match.group(4) is None):
        raise UserInputError(f"--slurm_time: expected minutes, HH:MM:SS or D-HH:MM:SS, found {text!r}")
    days, first, second, third = (int(g) if g else 0 for g in match.groups())
    if match.group(1) is None and match.group(3) is None:
        minutes = first  # a plain number is minutes, as in sbatch --time
    else:
        minutes = days * 1440 + first * 60 + second + (1 if third else 0)
    if minutes <= 0:
        raise UserInputError(f"--slurm_time: expected a positive time limit, found {text!r}")
    return minutes


def add_launch_args(parser: argparse.ArgumentParser) -> None:
    """The scale-out flags (``--jobs``, ``--slurm`` and its settings, ``--log_dir``) in their own group."""
    g = parser.add_argument_group("scale-out (one process per job)")
    g.add_argument("--jobs", type=int, default=1, help="local processes at once (1: one after the other, in order)")
    g.add_argument("--log_dir", default=None, help="per-job log files go to {log_dir}/{job}.log "
                   "(default: a logs/ folder beside the outputs)")
    g.add_argument("--slurm", action="store_true", help="submit one Slurm job array (through submitit), one task "
                   "per job, and wait for it")
    g.add_argument("--no_wait", action="store_true", help="with --slurm: print the array's job id and return")
    g.add_argument("--slurm_partition", default=None, help="Slurm partition of the array (default: the cluster's)")
    g.add_argument("--slurm_time", default=str(DEFAULT_SLURM_MINUTES),
                   help="time limit of each array task: minutes, HH:MM:SS or D-HH:MM:SS")
    g.add_argument("--slurm_gpus", type=int, default=0, help="GPUs per array task")
    g.add_argument("--slurm_cpus", type=int, default=None, help="CPUs per array task (default: the cluster's)")
    g.add_argument("--slurm_mem", type=float, default=None, help="memory per array task in GB (default: the cluster's)")
    g.add_argument("--slurm_array_parallelism", type=int, default=None,
                   help="array tasks running at once (default: submitit's, 256)")
    g.add_argument("--slurm_log_dir", default=None, help="submitit's folder: pickled jobs and scheduler logs "
                   "(default: {log_dir}/slurm)")
    g.add_argument("--slurm_cluster", default=None, choices=["slurm", "local"],
                   help="default: detected; local runs the array on this machine through submitit (a dry run)")


def options_from_args(args: argparse.Namespace) -> LaunchOptions:
    return LaunchOptions(jobs=args.jobs, slurm=args.slurm, slurm_partition=args.slurm_partition,
                         slurm_time=args.slurm_time, slurm_gpus=args.slurm_gpus, slurm_cpus=args.slurm_cpus,
                         slurm_mem=args.slurm_mem, slurm_array_parallelism=args.slurm_array_parallelism,
                         slurm_log_dir=args.slurm_log_dir, slurm_cluster=args.slurm_cluster,
                         wait=not args.no_wait).validate()


def last_line(log: Path) -> str:
    """The last non-empty line of a log (progress bars end lines with carriage returns)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in re.split(r"[\r\n]+", tail) if line.strip()]
    return lines[-1][:200] if lines else ""


def run_command(argv: Sequence[str], cwd: str, log: str, env: dict[str, str] | None = None,
                started: Callable[[subprocess.Popen], None] | None = None) -> int:
    """Run one job with its output in ``log``; returns the exit code. Also the function of each Slurm array task."""
    log_path = Path(log)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as out:
        out.write(f"$ {shlex.join(argv)}\n# in {cwd}\n")
        out.flush()
        proc = subprocess.Popen(list(argv), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        if started is not None:
            started(proc)
        return proc.wait()


def log_path(log_dir: Path, job: Job) -> Path:
    return log_dir / f"{job.name}.log"


def check_names(jobs: Sequence[Job]) -> None:
    names = [j.name for j in jobs]
    for name in names:
        if not name or name.startswith("/") or ".." in Path(name).parts:
            raise ValueError(f"job name {name!r} is not a relative file name")
    if len(set(names)) != len(names):
        raise ValueError("job names must be unique in a batch (they name the log files)")


ExecutorFactory = Callable[[Path, LaunchOptions], Any]


def default_executor(folder: Path, options: LaunchOptions) -> Any:
    import submitit

    return submitit.AutoExecutor(folder=folder, cluster=options.slurm_cluster)


def run_jobs(jobs: Sequence[Job], options: LaunchOptions, log_dir: Path | str, *, name: str = "delta-transfer",
             cwd: str | Path | None = None, executor_factory: ExecutorFactory | None = None) -> Report:
    """Run ``jobs`` as ``options`` say, print the summary, return the report (failures included, never raised)."""
    check_names(jobs)
    log_dir = Path(log_dir)
    cwd = str(cwd or os.getcwd())
    start = time.time()
    if options.slurm:
        report = _run_slurm(list(jobs), options, log_dir, name, cwd, executor_factory or default_executor)
    else:
        report = _run_local(list(jobs), options, log_dir, name, cwd)
    report.seconds = time.time() - start
    print(report.summary(), flush=True)
    return report


def job_env(options: LaunchOptions) -> dict[str, str]:
    env = dict(os.environ)
    if options.jobs > 1:  # N processes each taking every core would spin threads for cores they never get
        env.setdefault("OMP_NUM_THREADS", str(threads_per_job(options.jobs)))
    env.setdefault("TQDM_MININTERVAL", "5")  # progress bars go to log files: fewer redraws
    return env


def _run_local(jobs: list[Job], options: LaunchOptions, log_dir: Path, name: str, cwd: str) -> Report:
    env = job_env(options)
    running: set[subprocess.Popen] = set()
    lock = threading.Lock()

    def one(job: Job) -> int:
        def started(proc: subprocess.Popen) -> None:
            with lock:
                running.add(proc)

        try:
            return run_command(job.argv, cwd, str(log_path(log_dir, job)), env, started)
        finally:
            with lock:
                running.difference_update({p for p in running if p.poll() is not None})

    results: dict[int, JobResult] = {}
    pool = ThreadPoolExecutor(max_workers=options.jobs, thread_name_prefix="job")
    bar = progress_bar(total=len(jobs), desc=f"{name} jobs", unit="job")
    try:
        futures: dict[Future, int] = {pool.submit(one, job): i for i, job in enumerate(jobs)}
        for future in as_completed(futures):
            i = futures[future]
            job = jobs[i]
            try:
                code: int | None = future.result()
                error = ""
            except OSError as e:  # the program could not start at all
                code, error = None, f"could not start: {e}"
            results[i] = JobResult(job, log_path(log_dir, job), code, error)
            if code != 0:
                bar.write(f"job {job.name} failed ({error or f'exit code {code}'}); log {results[i].log}")
            bar.update()
    except BaseException:
        # Ctrl-C (or any error here): start nothing more and stop what runs, then let the error through.
        pool.shutdown(wait=False, cancel_futures=True)
        with lock:
            for proc in running:
                proc.terminate()
        raise
    finally:
        bar.close()
        pool.shutdown(wait=True)
    return Report([results[i] for i in range(len(jobs))])


def _run_slurm(jobs: list[Job], options: LaunchOptions, log_dir: Path, name: str, cwd: str,
               factory: ExecutorFactory) -> Report:
    import submitit

    folder = Path(options.slurm_log_dir) if options.slurm_log_dir else log_dir / "slurm"
    executor = factory(folder, options)
    params = {"name": name, "timeout_min": options.minutes, "gpus_per_node": options.slurm_gpus,
              "cpus_per_task": options.slurm_cpus, "mem_gb": options.slurm_mem,
              "slurm_partition": options.slurm_partition,
              "slurm_array_parallelism": options.slurm_array_parallelism}
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    cluster = getattr(executor, "cluster", None)
    if cluster in ("slurm", "local"):
        # Array tasks unpickle run_command from this module: make the repository importable wherever they start.
        repo = shlex.quote(str(REPO))
        executor.update_parameters(**{f"{cluster}_setup": [f"export PYTHONPATH={repo}${{PYTHONPATH:+:$PYTHONPATH}}"]})
    logs = [str(log_path(log_dir, job)) for job in jobs]
    submitted = executor.map_array(run_command, [job.argv for job in jobs], [cwd] * len(jobs), logs)
    array_id = str(submitted[0].job_id).split("_")[0] if submitted else ""
    if not options.wait:
        print(f"submitted {len(jobs)} job(s) as array {array_id}; per-job logs in {log_dir}, submitit files in "
              f"{folder}" + (f"; watch with: squeue -j {array_id}" if cluster == "slurm" else ""), flush=True)
        return Report([JobResult(job, Path(log), None, "not waited for") for job, log in zip(jobs, logs)],
                      submitted=array_id)

    index = {id(s): i for i, s in enumerate(submitted)}
    results: dict[int, JobResult] = {}
    bar = progress_bar(total=len(jobs), desc=f"{name} array {array_id}", unit="job")
    try:
        # A real scheduler is polled sparingly; submitit's local executor is just processes on this machine.
        poll = options.poll_s if cluster == "slurm" else min(options.poll_s, 0.5)
        for done in submitit.helpers.as_completed(submitted, poll_frequency=poll):
            i = index[id(done)]
            code: int | None = None
            error = ""
            try:
                code = done.result()
            except Exception as e:  # noqa: BLE001  (cancelled, timed out, node failure: reported, not raised)
                error = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            stderr = str(getattr(done.paths, "stderr", ""))
            results[i] = JobResult(jobs[i], Path(logs[i]), code, error, stderr if code != 0 else "")
            if code != 0:
                bar.write(f"job {jobs[i].name} failed ({error or f'exit code {code}'}); log {logs[i]}")
            bar.update()
    except KeyboardInterrupt:
        print(f"interrupted: array {array_id} keeps running"
              + (f" (cancel it with: scancel {array_id})" if cluster == "slurm" else ""), file=sys.stderr)
        raise
    finally:
        bar.close()
    return Report([results[i] for i in range(len(jobs))])
