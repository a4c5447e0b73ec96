"""The study's eight stages, one function each, on one delta method (``DeltaRun``) or one of its target sides
(``TargetSide``: the few-shot split of one data seed).

Every stage builds the typed configuration of the library function that does the work (``TuneConfig`` for
tune.py's sweeps, ``TuneAllConfig``, ``DevAllConfig``, ``SimilarityConfig``, ``FusionConfig``) from the study's
settings, and hands it to ``Steps.stage`` with the outputs each step leaves (pipeline/layout.py names them all).
With a launcher the same configuration runs as a command line in its own process (its ``to_argv()``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dataloader.crossfit import load_task
from dataloader.metrics import metric_for_task
from get_similarity.scoring import SimilarityConfig, run_similarity
from models.backbone import load_backbone, pick_device
from models.delta import DeltaConfig, attach_delta
from models.dev_all import keep_pairs, run_dev_all
from models.evaluate import Decoding, score_modules
from models.examples import encode_examples
from models.formats import load_delta_checkpoint
from models.group import chunks, ensure_slots
from models.pair_settings import DevAllConfig, TuneAllConfig
from models.settings import TuneConfig
from models.tune_all import run_tune_all
from models.tuning import run_folder, run_sweep, run_sweeps
from pipeline.launch import order_result_tsv, script_job
from pipeline.layout import SideLayout, StudyLayout
from pipeline.settings import StudyPlan, iters_of, lr_of, sizes_of
from pipeline.steps import StageId, StageWork, StepKey, Steps
from unit_model.config import FusionConfig
from unit_model.fusion import run_fusion
from unit_model.fusion_names import Fusion
from unit_model.weightings import STUDY_INPUTS, metric_names
from utils.io import write_tsv_atomic
from utils.progress import progress_bar

SKIPPED = "no requested fusion or report reads it"


def needed_stages(plan: StudyPlan) -> dict[str, bool]:
    """Which optional stages the requested fusions and reports read (the weighting table says what each fusion
    reads); the others are skipped. The transferability report reads tune-all, dev-all and the pairs. Sources,
    random init (the baseline, and cos's and KL's reference), fusion and transfer always run."""
    inputs = {name for f in plan.fusions for name in f.inputs}
    report = bool(plan.p.transferability)
    return {"tuneall": report or bool({"tuneall", "devall"} & inputs), "devall": report or "devall" in inputs,
            "similarity": "similarity" in inputs, "pairs": report}


@dataclass
class DeltaRun:
    """One delta method's study: its settings as the stages' configurations read them."""

    plan: StudyPlan
    layout: StudyLayout
    steps: Steps | None  # None: only to build configurations (the checks before the first write)
    delta: str
    group_size: int
    needed: dict[str, bool] = field(init=False)

    def __post_init__(self) -> None:
        self.needed = needed_stages(self.plan)

    @property
    def backbone(self) -> dict:
        """What every stage's configuration has (bf16 included: the device flags reach every stage)."""
        p = self.plan.p
        return dict(model=p.model, task_dir=p.task_dir, device=p.device, quiet=p.quiet, bf16=p.bf16,
                    max_input_length=p.max_input_length, max_output_length=p.max_output_length)

    @property
    def sweep(self) -> dict:
        """What every tune.py sweep of the study shares (the sources' and every target arm's)."""
        p = self.plan.p
        return dict(**self.backbone, delta=DeltaConfig(self.delta, **sizes_of(p, self.delta)), seed=p.seed,
                    do_train=True, do_predict=True, overwrite=True, log_file_only=True, predict_batch_size=100,
                    group_size=self.group_size)

    @property
    def sources(self) -> Path:
        return self.layout.sources(self.delta)

    def target_lr(self) -> float:
        return lr_of(self.plan.p, self.delta, self.plan.p.target_lr)

    def target_warmup(self) -> int | None:
        """Every target arm's warm-up steps; None: the trainer's rule (a tenth of the steps)."""
        return None if self.plan.p.target_warmup == "auto" else int(self.plan.p.target_warmup)


@dataclass
class TargetSide:
    """Stages 2-8 on one few-shot split: everything on the target side lives in one folder per data seed."""

    run: DeltaRun
    data_seed: int

    def stage(self, index: int, name: str, iters: int | None = None) -> StageId:
        return StageId(index, self.run.delta, name, self.data_seed, iters)

    @property
    def paths(self) -> SideLayout:
        return self.run.layout.side(self.run.delta, self.data_seed)

    def target_budget(self, iters: int, early_stop: int) -> dict:
        p, delta = self.run.plan.p, self.run.delta
        return dict(k=p.target_k, data_seed=self.data_seed, train_iters=iters_of(p, delta, iters),
                    learning_rate_list=[self.run.target_lr()], bsz_list=[p.target_bsz],
                    warmup_steps=self.run.target_warmup(),
                    valid_interval=p.target_valid_interval, early_stop=early_stop,
                    log_interval=p.target_valid_interval)


# --- tune.py sweeps (stages 1, 2, 7) ----------------------------------------------------------------------


def run_dir(config: TuneConfig) -> Path:
    """The one run folder of a one-task, one-(lr, bsz) sweep."""
    return run_folder(config, config.tasks[0], config.learning_rate_list[0], config.bsz_list[0])


def tune_stage(run: DeltaRun, stage: StageId, keys: list[StepKey], config: Callable[[StepKey], TuneConfig],
               order: list[StepKey] | None = None) -> None:
    """A stage of tune.py sweeps, one task each: here in groups of the group size (of ``order``, default the
    keys' own), or as tune.py jobs, one step each, whose result.tsv rows are then put in this process's order."""
    def finish(done: list[StepKey]) -> None:
        by_output: dict[str, list[tuple[str, str]]] = {}
        for key in done:
            c = config(key)
            by_output.setdefault(c.output_dir, []).append((c.tasks[0], run_dir(c).name))
        for out, rows in by_output.items():
            order_result_tsv(Path(out), rows)

    run.steps.stage(stage, keys, StageWork(
        outputs=lambda key: [run_dir(config(key))], run=lambda key: run_sweep(config(key)),
        jobs=lambda key: [script_job("/".join(key), "tune.py", config(key).to_argv())], finish=finish,
        groups=chunks(order or keys, run.group_size),
        run_group=lambda group: run_sweeps([config(key) for key in group])))


def train_sources(run: DeltaRun) -> None:
    """Stage 1: one module per task of the pool on its large split (skipped where a library gives them)."""
    p = run.plan.p
    if p.source_library:
        run.steps.skip(StageId(1, run.delta, "sources"), f"source modules from {run.sources}")
        return
    budget = dict(k=p.source_k, data_seed=p.source_data_seed, train_iters=iters_of(p, run.delta, p.source_iters),
                  learning_rate_list=[lr_of(p, run.delta, p.source_lr)], bsz_list=[p.source_bsz],
                  valid_interval=p.source_valid_interval, early_stop=p.source_early_stop, log_interval=50)
    tune_stage(run, StageId(1, run.delta, "sources"), [(t,) for t in run.plan.task_pool],
               lambda key: TuneConfig(**run.sweep, **budget, tasks=[key[0]], output_dir=str(run.sources)))


def tune_random(side: TargetSide, budget: tuple[int, int]) -> None:
    """Stage 2: each target tuned from random initialisation (the baseline) at one budget."""
    out = side.paths.random(budget[0])
    tune_stage(side.run, side.stage(2, "random", budget[0]), [(t,) for t in side.run.plan.targets],
               lambda key: TuneConfig(**side.run.sweep, **side.target_budget(*budget), tasks=[key[0]],
                                      output_dir=str(out)))


def transfer(side: TargetSide, budget: tuple[int, int]) -> None:
    """Stage 7: each target tuned from each fused initialisation, with the baseline's split, budget and seed;
    grouped target by target, so that a target's fused starts share its batches."""
    run, plan = side.run, side.run.plan
    names = [f.name for f in plan.fusions]

    def config(key: StepKey) -> TuneConfig:
        fusion, target = key
        return TuneConfig(**run.sweep, **side.target_budget(*budget), tasks=[target],
                          output_dir=str(side.paths.transfer(budget[0], fusion)),
                          train_checkpoint=str(side.paths.fused_module(fusion, target)))

    tune_stage(run, side.stage(7, "transfer", budget[0]), [(m, t) for m in names for t in plan.targets], config,
               order=[(m, t) for t in plan.targets for m in names])


# --- tune-all, dev-all, similarity (stages 3-5) -------------------------------------------------------------


def tune_all(side: TargetSide) -> None:
    """Stage 3: every source tuned on every target for the first budget (a job per group of sources)."""
    run, plan = side.run, side.run.plan
    p, out = plan.p, side.paths.tuneall

    def config(target: str, sources: list[str]) -> TuneAllConfig:
        return TuneAllConfig(**run.backbone, k=p.target_k, data_seed=side.data_seed, tasks=[target],
                             source_tasks=sources, source_ckpt_path=str(run.sources), output_dir=str(out),
                             steps=iters_of(p, run.delta, plan.first_iters), learning_rate=run.target_lr(),
                             bsz=p.target_bsz, warmup_steps=run.target_warmup(),
                             seed=p.seed, log_file_only=True, group_size=run.group_size)

    def sources_of(target: str) -> list[str]:
        return [s for s in plan.task_pool if s != target]

    run.steps.stage(side.stage(3, "tuneall"), [(t,) for t in plan.targets], StageWork(
        outputs=lambda key: [out / key[0] / s for s in sources_of(key[0])],
        run=lambda key: run_tune_all(config(key[0], plan.task_pool)),
        # a job per group: the sources of a target in tune-all's own groups of the group size
        jobs=lambda key: [script_job(f"{key[0]}/{group[0]}", "get_similarity/tune_all.py",
                                     config(key[0], group).to_argv())
                          for group in chunks(sources_of(key[0]), run.group_size)]))


def dev_all(side: TargetSide) -> None:
    """Stage 4: every source's dev score on every target, zero-shot and after tune-all (a job per pair)."""
    run, plan = side.run, side.run.plan
    out = side.paths.devall
    pairs = [(t, s) for t in plan.targets for s in plan.task_pool if s != t]  # run_dev_all's order

    def config(targets: list[str], sources: list[str], merge: bool = False) -> DevAllConfig:
        return DevAllConfig(**run.backbone, k=plan.p.target_k, data_seed=side.data_seed, tasks=targets,
                            source_tasks=sources, source_ckpt_path=str(run.sources),
                            tuneall_ckpt_path=str(side.paths.tuneall), output=str(out), overwrite=True,
                            merge=merge, predict_batch_size=100, group_size=run.group_size)

    run.steps.stage(side.stage(4, "devall"), [("all",)], StageWork(
        outputs=lambda _: [out], run=lambda _: run_dev_all(config(plan.targets, plan.task_pool)),
        jobs=lambda _: [script_job(f"{t}/{s}", "get_similarity/dev_all.py", config([t], [s], merge=True).to_argv())
                        for t, s in pairs],
        finish=lambda _: keep_pairs(out, pairs)))


def similarity(side: TargetSide) -> None:
    """Stage 5: every similarity metric of the registry, of every source on every target (leave-one-out)."""
    run, plan = side.run, side.run.plan
    table = side.paths.similarity
    # A step that runs again (its marker missing: killed, or an output deleted) replaces its outputs.
    config = SimilarityConfig(**run.backbone, k=plan.p.target_k, data_seed=side.data_seed, overwrite=True,
                              delta=run.delta, metric=metric_names(run.delta), tasks=plan.targets,
                              source_tasks=plan.task_pool, source_ckpt_path=str(run.sources),
                              random_tuned_ckpt_path=str(side.paths.random(plan.first_iters)),
                              output_dir=str(table.parent), max_examples=plan.p.max_examples, init_seed=plan.p.seed,
                              group_size=run.group_size, prefilter=plan.p.prefilter or None,
                              prefilter_top=plan.p.prefilter_top)
    run.steps.stage(side.stage(5, "similarity"), [("all",)],
                    StageWork(outputs=lambda _: [table], run=lambda _: run_similarity(config)))


# --- fusion and the pairs (stages 6, 8) ---------------------------------------------------------------------


def fusion_config(side: TargetSide, fusion: Fusion) -> FusionConfig:
    """The fusion run of one fusion name on this side: the weighting's inputs from the layout, the operator and
    merge settings as parsed, and the weight rule (``@original``: raw scores at the weighting's temperature)."""
    run, plan = side.run, side.run.plan
    p = plan.p
    inputs = {STUDY_INPUTS[name]: str(side.paths.study_input(name, plan.first_iters)) for name in fusion.inputs}
    weight_norm, tem = p.weight_norm, p.tem
    if fusion.original:
        weight_norm, tem = "none", fusion.weighting.original_temperature
    elif fusion.weighting.name == "cos" and weight_norm == "none":
        tem = p.cos_tem
    learned = fusion.weighting.learns_weights
    if learned:
        inputs.update(learned_start=fusion.start, budget=p.learned_budget, search_seed=p.seed,
                      optimizer=p.learned_optimizer)
        if tem == "auto":  # the search sets the weights; T only shapes a metric start
            tem = 1.0
    return FusionConfig(delta=run.delta, tasks=plan.task_pool, targets=plan.targets,
                        source_ckpt_path=str(run.sources), task_dir=p.task_dir,
                        save_ckpt_path=str(side.paths.fused(fusion.name)), weight_norm=weight_norm,
                        merge=fusion.operator, merge_settings=plan.merge_settings, top_k=0 if learned else p.top_k,
                        tem=tem, lora_combine=p.lora_combine, overwrite=True, model=p.model, k=p.target_k,
                        data_seed=side.data_seed, device=p.device, bf16=p.bf16,
                        max_input_length=p.max_input_length, max_output_length=p.max_output_length, **inputs)


def fuse(side: TargetSide) -> None:
    """Stage 6: the fused initialisation of every target with every fusion."""
    run, plan = side.run, side.run.plan
    by_name = {f.name: f for f in plan.fusions}
    run.steps.stage(side.stage(6, "fusion"), [(f.name,) for f in plan.fusions], StageWork(
        outputs=lambda key: [side.paths.fused_module(key[0], t) for t in plan.targets],
        run=lambda key: run_fusion(by_name[key[0]].weighting, fusion_config(side, by_name[key[0]]))))


def score_pairs(side: TargetSide) -> None:
    """Stage 8: the test score of each target's module tuned from each single source (tune-all), for the
    transferability report; a target's modules are scored the group size at a time (models.evaluate)."""
    run, plan = side.run, side.run.plan
    p, tuned, out = plan.p, side.paths.tuneall, side.paths.pairs

    def score_all() -> None:
        device = pick_device(p.device)
        net, tokenizer = load_backbone(p.model, None, device)
        size = run.group_size
        first = plan.targets[0]
        torch.manual_seed(p.seed)
        cfg = DeltaConfig.from_checkpoint_meta(load_delta_checkpoint(tuned / first / next(
            s for s in plan.task_pool if s != first))[1])
        attach_delta(net, cfg)
        net.to(device)
        slots = ensure_slots(net, cfg, size)  # one slot: the attached module itself
        rows = []
        bar = progress_bar(total=len(plan.targets) * (len(plan.task_pool) - 1), leave=False,
                           desc=f"{run.delta} single-source test scores")
        for t in plan.targets:
            test = load_task(p.task_dir, t, p.target_k, side.data_seed, ("test",))["test"]
            encoded = encode_examples(tokenizer, test, p.max_input_length, p.max_output_length)
            modules = [(s, lambda s=s, t=t: load_delta_checkpoint(tuned / t / s)[0], str(tuned / t / s))
                       for s in plan.task_pool if s != t]
            scores = score_modules(net, tokenizer, encoded, metric_for_task(t, p.task_dir), modules, slots,
                                   Decoding(p.max_output_length), 100, bf16=p.bf16, done=bar.update)
            rows += [[t, s, repr(score)] for s, score in scores.items()]
        bar.close()
        write_tsv_atomic(out, ["target", "source", "test"], rows)

    run.steps.stage(side.stage(8, "pairs"), [("all",)], StageWork(outputs=lambda _: [out], run=lambda _: score_all()))


# --- one delta method ----------------------------------------------------------------------------------------


def run_target_side(side: TargetSide) -> None:
    """Stages 2-8 on one split, in order; the optional ones only where a fusion or the report reads them."""
    run, budgets = side.run, side.run.plan.budgets
    tune_random(side, budgets[0])  # the first budget's random init is cos's and KL's reference
    for index, name, stage in ((3, "tuneall", tune_all), (4, "devall", dev_all), (5, "similarity", similarity)):
        if run.needed[name]:
            stage(side)
        else:
            run.steps.skip(side.stage(index, name), SKIPPED)
    fuse(side)
    # Every budget tunes random init and every fused initialisation on the same split, seed and rule.
    for budget in budgets:
        if budget != budgets[0]:
            tune_random(side, budget)
        transfer(side, budget)
    if run.needed["pairs"]:
        score_pairs(side)
    else:
        run.steps.skip(side.stage(8, "pairs"), SKIPPED)


def run_delta(run: DeltaRun) -> None:
    """One delta method's study: its sources, then every data seed's target side."""
    train_sources(run)
    for data_seed in run.plan.data_seeds:
        with run.steps.progress.target_side():
            run_target_side(TargetSide(run, data_seed))
