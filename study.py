"""The transfer study in one command: source modules -> similarities -> fused initialisations -> results.

For each delta method in DELTAS:
  1. sources      train one module per task of TASKS on its large split (k=SOURCE_K)
  2. random       tune each target of TARGETS from random initialisation on its few-shot split (the baseline)
  3. tuneall      tune every source on every target's few-shot split (Euclidean, Performance, transferability)
  4. devall       score every source on every target's dev split, zero-shot and after tune-all
  5. similarity   zero-shot similarity metrics of every source on every target (leave-one-out)
  6. fusion       fused initialisation of every target with every fusion method
  7. transfer     tune each target from each fused initialisation (same budget and seed as the baseline)
  8. pairs        test score of every single-source transfer (tune-all modules), for transferability
then writes {OUTPUT}/results/: summary.tsv/.md, heatmaps, gain bar chart, learning curves, transferability.tsv.

Resumable: each step leaves a marker listing its outputs only once they are complete; a rerun skips a
step whose marker and outputs are all present, and redoes a step whose outputs were deleted.
Scale-out: with jobs > 1 or slurm, stages 1, 2, 3, 4 and 7 run as one process per job (a tune.py run, a
tune-all or dev-all pair; utils/jobs.py): N local processes at once, or one Slurm job array per stage,
waited for. The other stages run in this process. The outputs are the same files.
Parameters are the plain variables below; each can be overridden on the command line (--name value).

    .venv/bin/python study.py --output runs/study --targets "sent_review topic_news"
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
from models.sizes import METHOD_SIZES  # noqa: E402
from unit_model.fusion_names import (  # noqa: E402
    ORIGINAL_TEMPERATURES,
    SIMILARITY_METRICS,
    fusion_file_name,
    parse_fusion,
)
from utils.errors import UserInputError  # noqa: E402
from utils.io import check_output_folder, read_json_object, write_text_atomic  # noqa: E402
from utils.params import block_params  # noqa: E402  (the same parameter-block reader as the fusion scripts)
from utils.progress import say  # noqa: E402  (progress lines that never collide with a stage's bars)
from utils.ranges import (  # noqa: E402
    ANY_INT,
    DEVICE,
    FINITE,
    FRACTION,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    check_ranges,
)

_SIZES = METHOD_SIZES["default"]

# ---- parameters (each one can be overridden on the command line as --name value) -------------------
output = "runs/study"  # the study's folder: {delta}/seed_{s}/..., results/, params.json, .steps/
model = "models/default"  # backbone folder or hub id
task_dir = "data/synthetic"  # CrossFit-layout data: the pool's large splits and the targets' few-shot ones
tasks = "ALL_TASKS"  # the source pool; leave-one-out: a target's sources are the other tasks
# Lookup tasks are left out as targets: the default backbone already solves them zero-shot (no room for gain).
targets = "sent_review sent_stars topic_numbered topic_places nli_support nli_entail"  # tuned on few shots
deltas = "lora"  # delta methods, one study each: adapter lora prefix ia3
# WEIGHTING[+OPERATOR][@original]: the paper's ten weightings, two merge operators, learned weights; @original
# weights as the original code did (raw scores at its per-method T) -- grammar in unit_model/fusion_names.py
fusions = ("average manual cos Euclidean Performance Loss KL EL2N LogitsCos GraNd "
           "average+ties Loss+ties learned learned:Loss")
seed = 42  # training seed of every arm (initialisation, batching, dropout)
# source modules (large split)
# source_library: the pool's large splits are then not read; one delta method, whose sizes its modules must have
source_library = ""  # ready source modules instead of stage 1: one per task, or as its sources.tsv maps them
source_k = 512  # shots of the sources' large split
source_iters = 200  # training steps of each source module
source_lr = 3e-3  # learning rate of the sources
source_bsz = 16  # batch size of the sources
source_valid_interval = 50  # sources validate every N steps
source_early_stop = 3  # sources stop after N validations without gain
source_data_seed = 100  # data seed of the sources' split
# targets (few-shot splits): every arm (random init, each fused initialisation) is tuned on every data seed's
# split at every budget, with the same seed and selection rule; tune-all runs the first budget
target_k = 16  # shots of the targets' few-shot splits
target_data_seeds = "13 42 100"  # CrossFit's splits: each one a replicate of the whole target side
target_budgets = "40"  # target_iters per budget, e.g. "40 400" (the larger one with early stopping)
target_lr = 3e-3  # learning rate of every target arm
target_bsz = 8  # batch size of every target arm
target_valid_interval = 10  # target arms validate every N steps
target_warmup = "auto"  # warm-up steps of every target arm; auto: a tenth of the steps (the trainer's rule)
target_early_stop = "0"  # per budget (or one for all): validations without gain before stopping; 0: never
max_input_length = 256  # truncate inputs to N tokens (every stage)
max_output_length = 16  # truncate answers to N tokens (every stage)
# method sizes for the embedded default, from models/sizes.py (its "paper" profile has the paper's)
adapter_size = _SIZES["adapter"]["adapter_size"]  # bottleneck width
lora_r = _SIZES["lora"]["lora_r"]  # LoRA rank
lora_alpha = _SIZES["lora"]["lora_alpha"]  # LoRA alpha (scaling alpha / r)
lora_targets = _SIZES["lora"]["lora_targets"]  # LoRA's locations, a comma set of q, k, v, intermediate, output
prefix_length = _SIZES["prefix"]["prefix_length"]  # prefix tokens
prefix_mlp = _SIZES["prefix"]["prefix_mlp"]  # hidden size of the prefix's reparametrisation MLP
# Per-method budget scales ({method}_iters_scale, {method}_lr_scale; 1 when a method has none): the same
# scale applies to the sources and to every target arm, so the arms of one method stay on equal footing.
prefix_iters_scale = 4  # prefix tuning learns slower: its source and target budgets are this many times longer
ia3_lr_scale = 10  # (IA)³ rescales activations from 1: at 3e-3 it barely moves in 200 steps (0.62 vs 0.98)
# fusion: every method's scores are standardised per target (zscore) before softmax(./tem), so one
# temperature means the same for all; weight_norm none is the original's raw scores, for which it used
# T = 0.1 for the similarity metrics and Euclidean and 0.001 for Performance and cos (cos_tem applies then)
tem = 1.0  # or auto: per method and target, the T of {0.1 .. 4} that scores best zero-shot on its dev split
weight_norm = "zscore"  # zscore | rank | none
cos_tem = 0.05  # weight_norm none only: cosines live in [-1, 1], where T = 1 would give uniform weights
lora_combine = "delta_w"  # LoRA: merge B·A and factor back by SVD (delta_w), or average A and B (params)
# a fusion named WEIGHTING+OPERATOR (e.g. Loss+ties) merges with that operator (unit_model/merges/):
lam = 1.0  # scales every merged task vector
density = 0.2  # ties, dare_*, magnitude_prune: fraction of each tensor's entries kept
majority_sign = "total"  # ties, dare_ties: sign election by total mass or by count
merge_seed = 0  # dare_*: seed of the random drops
top_k = 0  # keep the K heaviest sources of every weighting, renormalised; 0: all
learned_budget = 40  # learned, learned:METRIC: evaluations of the train loss per target (LoraHub's budget)
learned_optimizer = "nevergrad"  # nevergrad (LoraHub's NGOpt) | gradient (Adam through the linear merge)
max_examples = 64  # dev examples scored by each similarity metric
# with dropout on, a module trained in a group draws other dropout masks than alone (docs/scale-out.md)
group_size = "auto"  # modules per forward pass in every stage; auto: what fits a quarter of memory, at most 32
transferability = False  # single-source test scores (pairs stage) and how well each weighting predicts them
bf16 = False  # bf16 autocast on GPU in every stage that runs the backbone
device = "auto"  # auto (cuda when present), cpu, cuda or cuda:N
quiet = True  # silence data-processing and library warnings
# scale-out (sweep.py's launcher): stages 1, 2, 3, 4 and 7 as one process per job
jobs = 1  # local processes at once; 1: every step in this process, in order
slurm = False  # one Slurm job array per stage through submitit, waited for
slurm_partition = ""  # Slurm partition of the arrays (empty: the cluster's default)
slurm_time = "240"  # limit of each array task: minutes, HH:MM:SS or D-HH:MM:SS
slurm_gpus = 0  # GPUs per array task
slurm_cpus = 0  # CPUs per array task; 0: the cluster's default
slurm_mem = 0.0  # GB per array task; 0: the cluster's default
slurm_array_parallelism = 0  # array tasks running at once; 0: submitit's default (256)
slurm_log_dir = ""  # submitit's files; default {output}/logs/{stage}/slurm
# -----------------------------------------------------------------------------------------------------
PARAMS = block_params(globals())
# The valid range of each number of the block, checked before anything is read or written (utils/ranges.py);
# the list parameters (target_data_seeds, target_budgets, target_early_stop) are checked by check_axes.
RANGES = {**{name: POSITIVE_INT for name in (
              "source_k", "source_iters", "source_bsz", "source_valid_interval", "target_k", "target_bsz",
              "target_valid_interval", "max_input_length", "max_output_length", "adapter_size", "lora_r",
              "prefix_length", "prefix_mlp", "prefix_iters_scale", "learned_budget", "max_examples", "jobs")},
          **{name: POSITIVE for name in ("source_lr", "target_lr", "cos_tem", "lora_alpha", "ia3_lr_scale")},
          **{name: NON_NEGATIVE_INT for name in ("source_early_stop", "top_k", "slurm_gpus", "slurm_cpus",
                                                 "slurm_array_parallelism")},
          **{name: ANY_INT for name in ("seed", "source_data_seed", "merge_seed")},
          "tem": POSITIVE.allowing("auto"), "lam": FINITE, "density": FRACTION,
          "slurm_mem": NON_NEGATIVE, "device": DEVICE}



def clock(seconds: float) -> str:
    """A duration as a person reads it: 42s, 3m05s, 1h02m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def words(text: str | list[str]) -> list[str]:
    """A list parameter: space- or comma-separated words (one string or several)."""
    text = " ".join(text) if isinstance(text, list) else text
    return text.replace(",", " ").split()


class Study:
    """One study's folders, step markers and progress lines."""

    def __init__(self, p):
        self.p = p
        self.root = Path(p.output)
        self.markers = self.root / ".steps"
        self.launch = None  # utils.jobs.LaunchOptions when stages run as parallel jobs
        self.group_size = 1  # modules per forward pass, resolved from p.group_size (resolve_group_size)
        # progress: the study's start, and the target sides (a delta method on a data seed) left and their times
        self.started = time.time()
        self.sides_left = 0  # set once the study knows its delta methods and data seeds
        self.side_started = time.time()
        self.side_seconds: list[float] = []
        self.task_pool: list[str] = []  # set by main once resolved: what inputs_digest hashes
        self.target_list: list[str] = []

    @contextlib.contextmanager
    def target_side(self):
        """Time one target side (a delta method on one data seed): what ``progress`` estimates the rest from."""
        self.side_started = time.time()
        self.sides_left -= 1
        yield
        self.side_seconds.append(time.time() - self.side_started)

    def progress(self) -> str:
        """Elapsed time, and what is left once a target side has been timed (each later one takes about as long)."""
        elapsed = f"elapsed {clock(time.time() - self.started)}"
        if not self.side_seconds:
            return elapsed
        per_side = sum(self.side_seconds) / len(self.side_seconds)
        left = max(per_side - (time.time() - self.side_started), 0.0) + per_side * self.sides_left
        return f"{elapsed}, about {clock(left)} left"

    # -- resumability ------------------------------------------------------------------------------
    def marker(self, name: str) -> Path:
        return self.markers / f"{name.replace('/', '__')}.json"

    def recorded(self, name: str) -> dict | None:
        """A step's marker (None when missing or unreadable: the step is then not done)."""
        try:
            made = read_json_object(self.marker(name))
        except UserInputError:
            return None
        return made if isinstance(made.get("outputs"), list) else None

    def done(self, name: str) -> bool:
        made = self.recorded(name)
        return made is not None and all((self.root / o).exists() for o in made["outputs"])

    def inputs_digest(self, title: str) -> str:
        """A hash of what a stage reads besides the study's settings: the backbone's weight files; for the sources
        stage the pool's large splits; for a target side (``{delta}/seed_{s}/...``) the targets' splits of that
        seed and every source module. A finished step whose inputs hash otherwise now is redone."""
        from dataloader.crossfit import split_path
        from utils.io import files_digest

        p = self.p
        model = Path(p.model)
        files = sorted(f for f in model.glob("*") if f.suffix in (".safetensors", ".bin")) if model.is_dir() else []
        delta, side = title.split("/")[:2]
        if side == "sources":
            files += [split_path(p.task_dir, t, p.source_k, p.source_data_seed, split)
                      for t in self.task_pool for split in ("train", "dev", "test")]
        else:
            seed = int(side.removeprefix("seed_"))
            files += [split_path(p.task_dir, t, p.target_k, seed, split)
                      for t in self.target_list for split in ("train", "dev", "test")]
            sources = Path(p.source_library) if p.source_library else self.root / delta / "sources"
            files += sorted(sources.rglob("*.safetensors"))
        return files_digest(files)

    def stale(self, title: str, name: str) -> bool:
        """A step that finished, on inputs that have changed since (or that an older version did not record)."""
        made = self.recorded(f"{title}.{name}")
        return made is not None and made.get("inputs") != self.inputs_digest(title)

    def forget(self, title: str, name: str, outputs: list[Path]) -> None:
        """Remove a stale step's marker and outputs, so that it runs again from scratch."""
        import shutil

        self.marker(f"{title}.{name}").unlink(missing_ok=True)
        for o in outputs:
            if o.is_dir():
                shutil.rmtree(o)
            else:
                o.unlink(missing_ok=True)

    def mark(self, name: str, outputs: list[Path], seconds: float) -> None:
        self.markers.mkdir(parents=True, exist_ok=True)
        marker = self.marker(name)
        write_text_atomic(marker, json.dumps({"outputs": [str(o.relative_to(self.root)) for o in outputs],
                                              "inputs": self.inputs_digest(name.split(".")[0]),
                                              "seconds": round(seconds, 1)}))

    def step(self, name: str, outputs: list[Path], run: Callable[[], None]) -> bool:
        """Run ``run`` unless ``name`` is done; mark it done once every output exists."""
        if self.done(name):
            return False
        start = time.time()
        run()
        missing = [o for o in outputs if not o.exists()]
        if missing:
            raise RuntimeError(f"step {name} finished without writing {missing[0]}")
        self.mark(name, outputs, time.time() - start)
        return True

    def stage(self, index: int, title: str, names: list[str], outputs: Callable[[str], list[Path]],
              run: Callable[[str], None], jobs: Callable[[str], list] | None = None,
              finish: Callable[[list[str]], None] | None = None, groups: list[list[str]] | None = None,
              run_group: Callable[[list[str]], None] | None = None) -> None:
        """A stage is a list of steps; print one progress line, then a line per step that runs.

        With a launcher, a stage that can say each step's ``jobs`` runs them all as one batch, then ``finish``
        puts what the jobs shared in the order the steps would have left it. Without one, a stage with
        ``groups`` (its steps in fixed groups) runs each group that has a step left as one call of
        ``run_group`` (models/group.py: one forward pass for all its modules).
        """
        out = sys.stdout  # the stage's own lines go to its log; this one line per stage to the console
        stale = [n for n in names if self.stale(title, n)]
        if stale:
            say(f"[{index}/8] {title}: what {len(stale)} finished step(s) read has changed since they ran (a split "
                "file, a source module or the backbone): redoing them", out)
            for n in stale:
                self.forget(title, n, outputs(n))
        todo = [n for n in names if not self.done(f"{title}.{n}")]
        say(f"[{index}/8] {title}: {len(names) - len(todo)}/{len(names)} done, {len(todo)} to run", out)
        start = time.time()
        with self.stage_log(title) as log, contextlib.redirect_stdout(log):
            if todo and jobs is not None and self.launch is not None:
                self.dispatch(title, todo, outputs, jobs, finish)
            elif groups is not None and run_group is not None:
                for group in groups:
                    self.group_step(title, group, outputs, run_group)
            else:
                for n in todo:
                    self.step(f"{title}.{n}", outputs(n), lambda n=n: run(n))
        if todo:
            say(f"[{index}/8] {title}: finished in {clock(time.time() - start)} ({self.progress()})", out)

    @contextlib.contextmanager
    def stage_log(self, title: str):
        """``{output}/logs/{stage}.log``: what a stage's steps print (appended, so a resumed stage adds to it)."""
        path = self.root / "logs" / f"{title.replace('/', '-')}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {title}\n")
            log.flush()
            yield log

    def group_step(self, title: str, group: list[str], outputs: Callable[[str], list[Path]],
                   run_group: Callable[[list[str]], None]) -> None:
        """Run a group of steps unless all are done; mark each once its outputs exist.

        A group with any step left runs whole, its finished steps too (their outputs are rewritten): a
        module trained with dropout depends on the modules beside it, so a resumed study trains every
        module in the group an uninterrupted one gives it.
        """
        if all(self.done(f"{title}.{n}") for n in group):
            return
        start = time.time()
        run_group(group)
        seconds = (time.time() - start) / len(group)
        for n in group:
            missing = [o for o in outputs(n) if not o.exists()]
            if missing:
                raise RuntimeError(f"step {title}.{n} finished without writing {missing[0]}")
            self.mark(f"{title}.{n}", outputs(n), seconds)

    def dispatch(self, title: str, todo: list[str], outputs: Callable[[str], list[Path]],
                 jobs: Callable[[str], list], finish: Callable[[list[str]], None] | None) -> None:
        """Run the steps' jobs as one batch; mark each step whose jobs all succeeded, then report failures."""
        from utils.jobs import JobsFailed, run_jobs

        start = time.time()
        batches = {n: jobs(n) for n in todo}
        folder = title.replace("/", "-")
        launch = self.launch
        if launch.slurm and not launch.slurm_log_dir:
            launch = dataclasses.replace(launch, slurm_log_dir=str(self.root / "logs" / folder / "slurm"))
        report = run_jobs([j for batch in batches.values() for j in batch], launch, self.root / "logs" / folder,
                          name=f"study-{folder}")
        succeeded = {r.job.name for r in report.results if r.ok}
        finished = [n for n, batch in batches.items() if all(j.name in succeeded for j in batch)]
        if finished and finish is not None:
            finish(finished)
        for n in finished:
            missing = [o for o in outputs(n) if not o.exists()]
            if missing:
                raise RuntimeError(f"step {title}.{n} finished without writing {missing[0]}")
            self.mark(f"{title}.{n}", outputs(n), time.time() - start)
        if report.failed:
            raise JobsFailed(report)


def sizes_of(p, delta: str) -> dict:
    """The method's sizes, from the study's parameters (or the table's default for one it has none of)."""
    from models.methods import get_method

    return {f.name: getattr(p, f.name, _SIZES[delta][f.name]) for f in get_method(delta).size_fields}


def iters_of(p, delta: str, iters: int) -> int:
    return iters * getattr(p, f"{delta}_iters_scale", 1)


def lr_of(p, delta: str, lr: float) -> float:
    return lr * getattr(p, f"{delta}_lr_scale", 1)


def needed_stages(fusions: list[str], transferability: bool) -> dict[str, bool]:
    """Which optional stages the requested fusions and reports read; the others are skipped.

    Tune-all and dev-all serve Euclidean, Performance and the transferability report; the pairs stage only
    that report; the similarity stage only the similarity-metric fusions. Sources, random init (the baseline,
    and KL's and cos's reference), fusion and transfer always run.
    """
    weightings = [parse_fusion(f).reads for f in fusions]
    tuneall = transferability or any(f in ("Euclidean", "Performance") for f in weightings)
    return {"tuneall": tuneall, "devall": tuneall, "pairs": transferability,
            "similarity": any(f in SIMILARITY_METRICS for f in weightings)}


def run_delta(study: Study, delta: str, task_pool: list[str], target_list: list[str]) -> None:
    from get_similarity.dev_all import DevAllConfig, keep_pairs, run_dev_all
    from get_similarity.score import SimilarityConfig, run_similarity
    from get_similarity.tune_all import TuneAllConfig, run_tune_all
    from models.delta import DeltaConfig
    from models.group import chunks
    from models.settings import TuneConfig
    from models.tuning import run_folder, run_sweep, run_sweeps
    from unit_model.fusion import FusionConfig, run_fusion
    from unit_model.report import budget_dir, seed_dir
    from unit_model.sources import fused_dir_name

    p, root, size = study.p, study.root / delta, study.group_size
    fusion_list = words(p.fusions)
    needed = needed_stages(fusion_list, p.transferability)

    def skip(index: int, name: str) -> None:
        say(f"[{index}/8] {delta}/{name}: skipped (no requested fusion or report reads it)")

    source_lr, target_lr = lr_of(p, delta, p.source_lr), lr_of(p, delta, p.target_lr)
    warmup = None if p.target_warmup == "auto" else int(p.target_warmup)  # None: the trainer's rule
    # every stage's config has these fields (bf16 included: the device flags reach every stage)
    backbone = dict(model=p.model, task_dir=p.task_dir, device=p.device, quiet=p.quiet, bf16=p.bf16,
                    max_input_length=p.max_input_length, max_output_length=p.max_output_length)
    source_iters = iters_of(p, delta, p.source_iters)
    sweep = dict(**backbone, delta=DeltaConfig(delta, **sizes_of(p, delta)), seed=p.seed, do_train=True,
                 do_predict=True, overwrite=True, log_file_only=True, predict_batch_size=100, group_size=size)
    source_budget = dict(k=p.source_k, data_seed=p.source_data_seed, train_iters=source_iters,
                         learning_rate_list=[source_lr], bsz_list=[p.source_bsz],
                         valid_interval=p.source_valid_interval, early_stop=p.source_early_stop, log_interval=50)

    # Parallel jobs run the same configuration as a command line in their own process (sweep.script_job);
    # shared result.tsv files are then put in the order these steps would have written them.
    from sweep import order_result_tsv, script_job

    def run_dir(config: TuneConfig) -> Path:  # the one run folder of a one-task, one-(lr, bsz) sweep
        return run_folder(config, config.tasks[0], config.learning_rate_list[0], config.bsz_list[0])

    def in_order(config: Callable[[str], TuneConfig]) -> Callable[[list[str]], None]:
        """Put the rows of the steps done into the order of the steps, in each output folder's result.tsv."""
        def finish(steps: list[str]) -> None:
            by_output: dict[str, list[tuple[str, str]]] = {}
            for step in steps:
                c = config(step)
                by_output.setdefault(c.output_dir, []).append((c.tasks[0], run_dir(c).name))
            for out, keys in by_output.items():
                order_result_tsv(Path(out), keys)
        return finish

    def tune_stage(index: int, name: str, steps: list[str], config: Callable[[str], TuneConfig],
                   finish: Callable[[list[str]], None], order: list[str] | None = None) -> None:
        """A stage of tune.py sweeps, one task each: here in groups of ``size`` (of ``order``, default the steps'
        own), or run as tune.py jobs, one step each."""
        study.stage(index, f"{delta}/{name}", steps,
                    lambda step: [run_dir(config(step))],
                    lambda step: run_sweep(config(step)),
                    jobs=lambda step: [script_job(step.replace(".", "/"), "tune.py", config(step).to_argv())],
                    finish=finish, groups=chunks(order or steps, size),
                    run_group=lambda group: run_sweeps([config(step) for step in group]))

    if p.source_library:  # ready modules: nothing to train
        src = Path(p.source_library)
        say(f"[1/8] {delta}/sources: skipped (source modules from {src})")
    else:
        src = root / "sources"
        def source_config(t: str) -> TuneConfig:
            return TuneConfig(**sweep, **source_budget, tasks=[t], output_dir=str(src))

        tune_stage(1, "sources", task_pool, source_config, finish=in_order(source_config))

    budgets = budgets_of(p)

    def target_side(data_seed: int) -> None:
        """Stages 2-8 on one few-shot split: everything on the target side lives in one folder per data seed."""
        split = seed_dir(data_seed)
        base = root / split
        target_data = dict(k=p.target_k, data_seed=data_seed)

        def target_budget(iters: int, early_stop: int) -> dict:
            return dict(**target_data, train_iters=iters_of(p, delta, iters), learning_rate_list=[target_lr],
                        bsz_list=[p.target_bsz], warmup_steps=warmup, valid_interval=p.target_valid_interval,
                        early_stop=early_stop, log_interval=p.target_valid_interval)

        def random_stage(budget: tuple[int, int]) -> None:
            out = base / budget_dir(budget[0]) / "random"

            def random_config(t: str) -> TuneConfig:
                return TuneConfig(**sweep, **target_budget(*budget), tasks=[t], output_dir=str(out))

            tune_stage(2, f"{split}/{budget_dir(budget[0])}/random", target_list, random_config,
                       finish=in_order(random_config))

        # The first budget's random-init modules are the reference of KL and cos, and tune-all runs it.
        first_iters = iters_of(p, delta, budgets[0][0])
        random_stage(budgets[0])
        rnd = base / budget_dir(budgets[0][0]) / "random"
        tuneall = base / "tuneall"

        def tuneall_config(t: str, sources: list[str]) -> TuneAllConfig:
            return TuneAllConfig(**backbone, **target_data, tasks=[t], source_tasks=sources,
                                 source_ckpt_path=str(src), output_dir=str(tuneall), steps=first_iters,
                                 learning_rate=target_lr, bsz=p.target_bsz, warmup_steps=warmup,
                                 seed=p.seed, log_file_only=True, group_size=size)

        def tuneall_stage() -> None:
            study.stage(3, f"{delta}/{split}/tuneall", target_list,
                        lambda t: [tuneall / t / s for s in task_pool if s != t],
                        lambda t: run_tune_all(tuneall_config(t, task_pool)),
                        # a job per group: the sources of a target in tune-all's own groups of `size`
                        jobs=lambda t: [script_job(f"{t}/{group[0]}", "get_similarity/tune_all.py",
                                                   tuneall_config(t, group).to_argv())
                                        for group in chunks([s for s in task_pool if s != t], size)])

        devall = base / "devall.tsv"
        devall_pairs = [(t, s) for t in target_list for s in task_pool if s != t]  # dev_all.py's order

        def devall_config(targets: list[str], sources: list[str], merge: bool = False) -> DevAllConfig:
            return DevAllConfig(**backbone, **target_data, tasks=targets, source_tasks=sources,
                                source_ckpt_path=str(src), tuneall_ckpt_path=str(tuneall), output=str(devall),
                                overwrite=True, merge=merge, predict_batch_size=100, group_size=size)

        def devall_stage() -> None:
            study.stage(4, f"{delta}/{split}/devall", ["all"], lambda _: [devall],
                        lambda _: run_dev_all(devall_config(target_list, task_pool)),
                        jobs=lambda _: [script_job(f"{t}/{s}", "get_similarity/dev_all.py",
                                                   devall_config([t], [s], merge=True).to_argv())
                                        for t, s in devall_pairs],
                        finish=lambda _: keep_pairs(devall, devall_pairs))

        similarity = base / "similarity"

        def similarity_stage() -> None:
            # A step that runs again (its marker missing: killed, or an output deleted) replaces its outputs.
            config = SimilarityConfig(**backbone, **target_data, overwrite=True, delta=delta,
                                      metric=list(SIMILARITY_METRICS), tasks=target_list, source_tasks=task_pool,
                                      source_ckpt_path=str(src), random_tuned_ckpt_path=str(rnd),
                                      output_dir=str(similarity), max_examples=p.max_examples, init_seed=p.seed,
                                      group_size=size)
            study.stage(5, f"{delta}/{split}/similarity", ["all"], lambda _: [similarity / "result.tsv"],
                        lambda _: run_similarity(config))

        for index, name, run in ((3, "tuneall", tuneall_stage), (4, "devall", devall_stage),
                                 (5, "similarity", similarity_stage)):
            if needed[name]:
                run()
            else:
                skip(index, f"{split}/{name}")
        fused = base / "fused"

        def fuse(fusion: str) -> None:
            # The study's fusion names -> a weighting of unit_model/weightings/, the inputs it reads, an operator.
            spec = parse_fusion(fusion)
            method, start = spec.weighting, spec.start
            weighting, inputs = {
                "average": ("average", {"TASK_LIST": "all"}),
                "manual": ("average", {"TASK_LIST": "manual"}),
                "cos": ("cos", {"random_tuned_ckpt_path": str(rnd)}),
                "Euclidean": ("Euclidean", {"tuneall_ckpt_path": str(tuneall)}),
                "Performance": ("Performance", {"tuneall_ckpt_path": str(tuneall), "devall_tsv": str(devall)}),
                "learned": ("learned", {"learned_start": start, "result_tsv": str(similarity / "result.tsv"),
                                        "budget": p.learned_budget, "search_seed": p.seed,
                                        "optimizer": p.learned_optimizer}),
            }.get(method, ("others", {"result_tsv": str(similarity / "result.tsv"), "metric": method}))
            weight_norm, tem = p.weight_norm, p.tem
            if spec.original:  # the original code's rule: raw scores at its per-method temperature
                weight_norm, tem = "none", ORIGINAL_TEMPERATURES[method]
            elif method == "cos" and weight_norm == "none":
                tem = p.cos_tem
            if method == "learned" and tem == "auto":  # the search sets the weights; T only shapes a metric start
                tem = 1.0
            config = FusionConfig(delta=delta, tasks=task_pool, targets=target_list, source_ckpt_path=str(src),
                                  task_dir=p.task_dir,
                                  save_ckpt_path=str(fused / fusion_file_name(fusion)), weight_norm=weight_norm,
                                  merge=spec.operator,
                                  lam=p.lam, density=p.density, majority_sign=p.majority_sign,
                                  merge_seed=p.merge_seed, top_k=0 if method == "learned" else p.top_k,
                                  tem=tem,
                                  lora_combine=p.lora_combine, overwrite=True, model=p.model, k=p.target_k,
                                  data_seed=data_seed, device=p.device, bf16=p.bf16,
                                  max_input_length=p.max_input_length, max_output_length=p.max_output_length,
                                  **inputs)
            run_fusion(weighting, config)

        study.stage(6, f"{delta}/{split}/fusion", fusion_list,
                    lambda m: [fused / fusion_file_name(m) / fused_dir_name(t) for t in target_list], fuse)

        def transfer_stage(budget: tuple[int, int]) -> None:
            transfer = base / budget_dir(budget[0]) / "transfer"

            def transfer_config(mt: str) -> TuneConfig:
                m, t = mt.split(".")
                return TuneConfig(**sweep, **target_budget(*budget), tasks=[t],
                                  output_dir=str(transfer / fusion_file_name(m)),
                                  train_checkpoint=str(fused / fusion_file_name(m) / fused_dir_name(t)))

            # grouped target by target: a target's fused starts share its batches (Parallel)
            tune_stage(7, f"{split}/{budget_dir(budget[0])}/transfer",
                       [f"{m}.{t}" for m in fusion_list for t in target_list], transfer_config,
                       finish=in_order(transfer_config), order=[f"{m}.{t}" for t in target_list for m in fusion_list])

        # Every budget tunes random init and every fused initialisation on the same split, seed and rule.
        for budget in budgets:
            if budget != budgets[0]:
                random_stage(budget)
            transfer_stage(budget)
        pairs = base / "pairs.tsv"
        if not needed["pairs"]:
            skip(8, f"{split}/pairs")
            return
        study.stage(8, f"{delta}/{split}/pairs", ["all"], lambda _: [pairs],
                    lambda _: score_pairs(p, delta, tuneall, target_list, task_pool, data_seed, pairs, size))

    for data_seed in data_seeds_of(p):
        with study.target_side():
            target_side(data_seed)


AXES = ("target_data_seeds", "target_budgets", "target_early_stop")  # list parameters of the study itself


def check_axes(p) -> None:
    """The replicate axes as one-line errors: integers, no repeats, one early-stop value or one per budget."""
    from utils.errors import UserInputError

    rules = {"target_data_seeds": (0, "data seeds"), "target_budgets": (1, "numbers of steps"),
             "target_early_stop": (0, "numbers of validations")}
    for name, (least, what) in rules.items():
        values = words(str(getattr(p, name)))
        if not values or not all(v.isdigit() and int(v) >= least for v in values):
            raise UserInputError(f"--{name}: expected {what} (integers of at least {least}), found "
                                 f"{getattr(p, name)!r}")
        if name != "target_early_stop" and len(set(map(int, values))) != len(values):
            raise UserInputError(f"--{name}: a value is listed twice in {getattr(p, name)!r}")
    budgets, stops = words(p.target_budgets), words(str(p.target_early_stop))
    if len(stops) not in (1, len(budgets)):
        raise UserInputError(f"--target_early_stop: expected one value or one per budget ({len(budgets)}), "
                             f"found {len(stops)}")


def data_seeds_of(p) -> list[int]:
    """The target data seeds: each one's few-shot split is a replicate of the whole target side."""
    return [int(s) for s in words(p.target_data_seeds)]


def budgets_of(p) -> list[tuple[int, int]]:
    """(target_iters, early_stop) per budget; one early-stop value may serve every budget."""
    iters = [int(n) for n in words(p.target_budgets)]
    stops = [int(n) for n in words(str(p.target_early_stop))]
    if len(stops) == 1:
        stops *= len(iters)
    return list(zip(iters, stops, strict=True))


def score_pairs(p, delta: str, tuneall: Path, target_list: list[str], task_pool: list[str], data_seed: int,
                out: Path, group_size: int = 1) -> None:
    """Test score of each target's module tuned from each single source (tune-all), for transferability; a
    target's modules are predicted ``group_size`` at a time (models.evaluate.predict_group)."""
    import torch

    from dataloader.crossfit import load_task
    from dataloader.metrics import metric_for_task
    from models.backbone import load_backbone, pick_device
    from models.delta import DeltaConfig, attach_delta
    from models.evaluate import Decoding, predict_group, score_predictions
    from models.examples import encode_examples
    from models.formats import load_delta_checkpoint
    from models.group import chunks, ensure_slots, load_slot_state
    from models.methods import DELTA_NAME
    from utils.io import write_tsv_atomic
    from utils.progress import progress_bar

    device = pick_device(p.device)
    net, tokenizer = load_backbone(p.model, None, device)
    rows, slots = [], []
    bar = progress_bar(total=len(target_list) * (len(task_pool) - 1), desc=f"{delta} single-source test scores",
                       leave=False)
    for t in target_list:
        test = load_task(p.task_dir, t, p.target_k, data_seed, ("test",))["test"]
        encoded = encode_examples(tokenizer, test, p.max_input_length, p.max_output_length)
        for group in chunks([s for s in task_pool if s != t], group_size):
            modules = [load_delta_checkpoint(tuneall / t / s) for s in group]
            if not slots:
                torch.manual_seed(p.seed)
                cfg = DeltaConfig.from_checkpoint_meta(modules[0][1])
                attach_delta(net, cfg)
                net.to(device)
                slots = ensure_slots(net, cfg, group_size) if group_size > 1 else [DELTA_NAME]
            for slot, s, (tensors, _) in zip(slots, group, modules):
                load_slot_state(net, slot, tensors, str(tuneall / t / s))
            predictions = predict_group(net, tokenizer, encoded, Decoding(p.max_output_length), 100,
                                        slots[:len(group)], bf16=p.bf16)
            metric = metric_for_task(t, p.task_dir)
            rows += [[t, s, repr(score_predictions(metric, pred, encoded))] for s, pred in zip(group, predictions)]
            bar.update(len(group))
    bar.close()
    write_tsv_atomic(out, ["target", "source", "test"], rows)


# Parameters a resumed study may change: they do not alter any finished step's outputs (steps are keyed by
# fusion method, delta method, data seed and budget, so adding any of them only adds steps). A budget's early
# stopping may not change: target_early_stop is compared budget by budget.
RESUMABLE_CHANGES = ("output", "device", "quiet", "fusions", "deltas", "target_data_seeds", "target_budgets",
                     "target_early_stop")


def check_library(p, task_pool: list[str], target_list: list[str]) -> None:
    """Every source a target needs is in ``source_library``, of the study's one delta method and its sizes."""
    from models.delta import DeltaConfig
    from models.formats import inspect_delta_checkpoint
    from models.run_folders import resolve_checkpoint, source_path
    from utils.errors import UserInputError

    deltas = words(p.deltas)
    if len(deltas) != 1:
        raise UserInputError(f"--source_library: one delta method, that of its modules; --deltas gives {p.deltas!r}")
    wanted = DeltaConfig.from_dict({"method": deltas[0], **sizes_of(p, deltas[0])})
    for s in task_pool:
        if all(s == t for t in target_list):
            continue  # a target's own module is never its source
        try:
            # inspection refuses a module with a NaN now, not after the stages that read it wrote their outputs
            _, meta = inspect_delta_checkpoint(resolve_checkpoint(source_path(p.source_library, s), task=s))
        except UserInputError as e:
            raise UserInputError(f"--source_library: task {s}: {e}") from None
        made = DeltaConfig.from_checkpoint_meta(meta)
        if made.to_dict() != wanted.to_dict():
            raise UserInputError(f"--source_library: task {s}'s module is {made.describe()}; the study would tune "
                                 f"{wanted.describe()}: set the study's sizes to the library's (e.g. --lora_r, "
                                 "--lora_alpha)")


def check_inputs(p, task_pool: list[str], target_list: list[str]) -> None:
    """Everything a later stage would trip on, checked before the study writes its first file.

    Every split that a stage reads is parsed (a bad line in a target's dev file would otherwise stop the
    study after the source stage), the backbone folder and device are checked, and an output folder of
    another study (other parameters in its params.json) is refused rather than resumed into.
    """
    from dataloader.crossfit import SPLITS, load_task
    from dataloader.metrics import metric_for_task
    from models.backbone import checked_device, looks_like_path, pick_device
    from task_list import resolve_tasks_in
    from utils.errors import UserInputError

    if p.source_library:  # the sources are ready modules: their tasks need no data, only a module each
        task_dir, _ = resolve_tasks_in(p.task_dir, target_list)
        check_library(p, task_pool, target_list)
        for t in target_list:
            metric_for_task(t, task_dir)
    else:
        task_dir, _ = resolve_tasks_in(p.task_dir, task_pool)
        for t in task_pool:
            load_task(task_dir, t, p.source_k, p.source_data_seed, SPLITS)
            metric_for_task(t, task_dir)
    for t in target_list:
        for data_seed in data_seeds_of(p):
            load_task(task_dir, t, p.target_k, data_seed, SPLITS)
    # 'manual division' needs a category with another task for every target
    if any(parse_fusion(f).weighting == "manual" for f in words(p.fusions)):
        from task_list import task_categories
        from unit_model.sources import category_sources

        categories = task_categories(task_dir)
        for t in target_list:
            try:
                category_sources(t, task_pool, categories)
            except UserInputError as e:
                raise UserInputError(f"--fusions manual: {e}; give the task folder a task_categories.tsv "
                                     "(columns task, category) or drop manual from --fusions") from None
    model = Path(p.model).expanduser()
    if model.exists() and not (model / "config.json").is_file():
        raise UserInputError(f"--model {p.model}: expected a model folder with config.json")
    if model.exists():
        from models.backbone import check_architecture

        check_architecture(str(model), p.model)
    if not model.exists() and looks_like_path(p.model):
        raise UserInputError(f"--model {p.model}: folder not found")
    checked_device(pick_device(p.device))
    root = check_output_folder(p.output, "--output", {"--task_dir": p.task_dir, "--model": p.model,
                                                      "--source_library": p.source_library})
    params = root / "params.json"
    if not params.is_file() and (root / ".steps").is_dir() and any((root / ".steps").iterdir()):
        raise UserInputError(f"{root}: holds finished steps (.steps/) but no params.json, so the settings they were "
                             "made with are unknown; resuming would give them this run's: choose another --output "
                             "or remove the folder")
    if params.is_file():
        earlier = read_json_object(params)
        now = json.loads(json.dumps(vars(p)))  # as it would be written: tuples become lists
        from models.methods import EARLIER_SIZES

        # A size added since the folder was made (lora_targets) is at the value every earlier study had.
        earlier = {**EARLIER_SIZES, **earlier}
        for key, value in now.items():
            if key in earlier and key not in RESUMABLE_CHANGES and earlier[key] != value:
                raise UserInputError(f"{params}: this folder holds a study with {key}={earlier[key]!r}, this run "
                                     f"asks {key}={value!r}; resuming would mix the two: rerun with the same "
                                     "parameters or choose another --output")
        if "target_budgets" in earlier and "target_early_stop" in earlier:
            then = dict(budgets_of(argparse.Namespace(**earlier)))
            first_then, first_now = next(iter(then)), budgets_of(p)[0][0]
            if first_then != first_now:
                raise UserInputError(f"{params}: this folder's first budget is {first_then}, this run's {first_now}; "
                                     "the first budget is the one tune-all, KL and cos use: keep it first")
            for iters, stop in budgets_of(p):
                if iters in then and then[iters] != stop:
                    raise UserInputError(f"{params}: this folder holds budget {iters} with target_early_stop "
                                         f"{then[iters]}, this run asks {stop}; rerun with the same early stopping "
                                         "or choose another --output")


def resolve_group_size(p, task_pool: list[str], target_list: list[str]) -> tuple[int, str]:
    """The study's one group size for every stage (each stage caps it at its own number of modules), and how it
    was chosen: auto sizes it, without loading the backbone's weights, for the longest example the study
    trains on (the pool's source splits, unless a library replaces them, and every target split) at the
    training batch sizes, and for the dev-all and pairs predictions (100 rows)."""
    import torch
    from transformers import AutoTokenizer

    from dataloader.crossfit import load_task
    from models.backbone import load_backbone_config, pick_device
    from models.examples import encode_examples, longest_example
    from models.group import pick_group_size

    if p.group_size != "auto":
        return int(p.group_size), f"group size {p.group_size}"
    tokenizer = AutoTokenizer.from_pretrained(p.model)
    splits = [] if p.source_library else [(t, p.source_k, p.source_data_seed) for t in task_pool]
    splits += [(t, p.target_k, seed) for seed in data_seeds_of(p) for t in target_list]
    encoded = [encode_examples(tokenizer, examples, p.max_input_length, p.max_output_length)
               for t, k, seed in splits for examples in load_task(p.task_dir, t, k, seed, ["train"]).values()]
    config, device, length = load_backbone_config(p.model), torch.device(pick_device(p.device)), \
        longest_example(encoded)
    train = pick_group_size("auto", len(task_pool), config, device, max(p.source_bsz, p.target_bsz), length, True)
    predict = pick_group_size("auto", len(task_pool), config, device, 100, length, False)
    return min(train, predict)


def parse_args(argv: list[str] | None):
    """The parameter block with the command line's overrides; list parameters as one space-separated string,
    so params.json spells them one way however the words were given."""
    from models.methods import REGISTRY
    from models.settings import parse_group_size
    from unit_model.config import CHOICES, HELP, LIST_PARAMS, TYPES
    from utils.params import parse_params

    types = {**TYPES, "group_size": lambda v: str(parse_group_size(v))}  # params.json: "auto" or "8"
    # a set of names (lora_targets) in its one spelling, "v,q" as "q,v"
    types.update({f.name: f.normalise for m in REGISTRY.values() for f in m.size_fields if f.subset_of})
    return parse_params(PARAMS, argv, __doc__, HELP, CHOICES, (*LIST_PARAMS, *AXES), types)


def main(argv: list[str] | None = None) -> int:
    from task_list import resolve_tasks, task_categories
    from utils.errors import UserInputError

    p = parse_args(argv)  # before the heavy imports: --help and a refused flag answer at once
    from unit_model.report import budget_dir, write_results
    check_ranges(vars(p), RANGES)
    check_axes(p)
    if p.target_warmup != "auto" and not (p.target_warmup.isdigit()):
        raise UserInputError(f"--target_warmup: expected auto or a number of steps, found {p.target_warmup!r}")
    task_pool = resolve_tasks(words(p.tasks), flag="--tasks")
    target_list = resolve_tasks(words(p.targets), flag="--targets")
    outside = [t for t in target_list if t not in task_pool]
    if outside:
        raise UserInputError(f"--targets: {', '.join(outside)} not in --tasks (the source pool)")
    delta_list = words(p.deltas)
    from models.delta import METHODS
    for d in delta_list:
        if d not in METHODS:
            raise UserInputError(f"--deltas: unknown delta method {d!r}; expected some of {', '.join(METHODS)}")
    from unit_model.merges import MERGES, MergeSettings, check_settings
    check_settings(MergeSettings(lam=p.lam, density=p.density, majority_sign=p.majority_sign, seed=p.merge_seed))
    from unit_model.config import OPTIMIZERS
    if p.learned_optimizer not in OPTIMIZERS:
        raise UserInputError(f"--learned_optimizer: expected one of {', '.join(OPTIMIZERS)}, found "
                             f"{p.learned_optimizer!r}")
    for f in words(p.fusions):
        spec = parse_fusion(f, tuple(MERGES))
        if spec.weighting == "learned" and p.learned_optimizer == "gradient" and not MERGES[spec.operator].linear:
            raise UserInputError(f"--fusions {f}: --learned_optimizer gradient needs a linear merge (linear or "
                                 f"task_arithmetic); {spec.operator} has no gradient in its weights")

    check_inputs(p, task_pool, target_list)

    study = Study(p)
    study.task_pool, study.target_list = task_pool, target_list
    if p.jobs != 1 or p.slurm:
        from utils.jobs import LaunchOptions
        study.launch = LaunchOptions(
            jobs=p.jobs, slurm=p.slurm, slurm_partition=p.slurm_partition or None, slurm_time=p.slurm_time,
            slurm_gpus=p.slurm_gpus, slurm_cpus=p.slurm_cpus or None, slurm_mem=p.slurm_mem or None,
            slurm_array_parallelism=p.slurm_array_parallelism or None,
            slurm_log_dir=p.slurm_log_dir or None).validate()
    study.group_size, why = resolve_group_size(p, task_pool, target_list)
    study.sides_left = len(delta_list) * len(data_seeds_of(p))
    study.root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(study.root / "params.json", json.dumps(vars(p), indent=1))
    start = time.time()
    print(f"study: {len(delta_list)} delta method(s), {len(task_pool)} source tasks, {len(target_list)} targets, "
          f"{len(words(p.fusions))} fusion methods -> {study.root}; {why}", flush=True)
    from utils.jobs import JobsFailed
    try:
        for d in delta_list:
            run_delta(study, d, task_pool, target_list)
    except JobsFailed as e:  # the launcher has printed which jobs failed and where their logs are
        print(f"error: {e}", file=sys.stderr)
        return 1
    results = study.root / "results"
    write_results(study.root, delta_list, target_list, task_pool, words(p.fusions), results,
                  task_categories(p.task_dir), data_seeds=data_seeds_of(p),
                  budgets=[budget_dir(iters) for iters, _ in budgets_of(p)])
    print(f"study finished in {time.time() - start:.0f}s; summary: {results / 'summary.md'}", flush=True)
    return 0


if __name__ == "__main__":
    from utils.errors import run_cli

    sys.exit(run_cli(main))
