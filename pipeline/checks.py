"""What the study checks before it writes its first file, and what it hashes to know a finished step is current.

Every split a stage reads is parsed, the source library is inspected, the backbone folder and device are
checked, and an output folder of another study (other settings in its params.json) is refused rather than
resumed into: a bad line in a target's dev file would otherwise stop the study after the source stage.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.layout import StudyLayout
from pipeline.settings import RESUMABLE_CHANGES, StudyPlan, budgets_of, sizes_of
from pipeline.stages import DeltaRun, TargetSide, fusion_config
from pipeline.steps import StageId
from unit_model.fusion import check_settings
from utils.errors import UserInputError
from utils.io import check_output_folder, read_json_object


def check_library(plan: StudyPlan) -> None:
    """Every source a target needs is in ``source_library``, of the study's one delta method and its sizes."""
    from models.delta import DeltaConfig
    from models.formats import inspect_delta_checkpoint
    from models.run_folders import resolve_checkpoint, source_path

    p = plan.p
    if len(plan.deltas) != 1:
        raise UserInputError(f"--source_library: one delta method, that of its modules; --deltas gives {p.deltas!r}")
    wanted = DeltaConfig.from_dict({"method": plan.deltas[0], **sizes_of(p, plan.deltas[0])})
    for s in plan.task_pool:
        if all(s == t for t in plan.targets):
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


def check_data(plan: StudyPlan) -> None:
    """Every split a stage reads, parsed; every task's metric known; manual fusions' categories present."""
    from dataloader.crossfit import SPLITS, load_task
    from dataloader.metrics import metric_for_task
    from task_list import resolve_tasks_in

    p = plan.p
    if p.source_library:  # the sources are ready modules: their tasks need no data, only a module each
        task_dir, _ = resolve_tasks_in(p.task_dir, plan.targets)
        check_library(plan)
        for t in plan.targets:
            metric_for_task(t, task_dir)
    else:
        task_dir, _ = resolve_tasks_in(p.task_dir, plan.task_pool)
        for t in plan.task_pool:
            load_task(task_dir, t, p.source_k, p.source_data_seed, SPLITS)
            metric_for_task(t, task_dir)
    for t in plan.targets:
        for data_seed in plan.data_seeds:
            load_task(task_dir, t, p.target_k, data_seed, SPLITS)
    if any(f.weighting.config.get("TASK_LIST") == "manual" for f in plan.fusions):
        # 'manual division' needs a category with another task for every target
        from task_list import task_categories
        from unit_model.sources import category_sources

        categories = task_categories(task_dir)
        for t in plan.targets:
            try:
                category_sources(t, plan.task_pool, categories)
            except UserInputError as e:
                raise UserInputError(f"--fusions manual: {e}; give the task folder a task_categories.tsv "
                                     "(columns task, category) or drop manual from --fusions") from None


def check_backbone(p: argparse.Namespace) -> None:
    """The backbone folder (config.json, a family this project supports) and the device."""
    from models.backbone import check_architecture, checked_device, looks_like_path, pick_device

    model = Path(p.model).expanduser()
    if model.exists() and not (model / "config.json").is_file():
        raise UserInputError(f"--model {p.model}: expected a model folder with config.json")
    if model.exists():
        check_architecture(str(model), p.model)
    if not model.exists() and looks_like_path(p.model):
        raise UserInputError(f"--model {p.model}: folder not found")
    checked_device(pick_device(p.device))


# The study's names of the fusion flags it sets from its own parameters (pipeline/stages.py, fusion_config).
STUDY_FLAGS = {"--optimizer": "--learned_optimizer", "--budget": "--learned_budget", "--search_seed": "--seed"}


def check_fusions(plan: StudyPlan, layout: StudyLayout) -> None:
    """Each fusion's settings through the fusion's own checks (unit_model.fusion.check_settings), on the
    configuration its stage will run."""
    from get_similarity.metrics import METRICS, check_prefilter

    for delta in plan.deltas:
        if plan.p.prefilter:
            check_prefilter(plan.p.prefilter, delta, method_flag="--deltas")
        for fusion in plan.fusions:
            metric = METRICS.get(fusion.weighting.name)
            if metric is not None:
                metric.require_method(delta, f"--fusions {fusion.name}: {metric.name}", "--deltas")
    run = DeltaRun(plan, layout, None, plan.deltas[0], 1)
    for fusion in plan.fusions:
        try:
            check_settings(fusion_config(TargetSide(run, plan.data_seeds[0]), fusion))
        except UserInputError as e:
            message = str(e)
            for fusion_flag, study_flag in STUDY_FLAGS.items():  # name the flag the user of the study gave
                message = message.replace(f"{fusion_flag} ", f"{study_flag} ")
            raise UserInputError(f"--fusions {fusion.name}: {message}") from None


def check_resume(p: argparse.Namespace, layout: StudyLayout) -> None:
    """An output folder is a new study, or this one resumed: its params.json agrees on every setting that changes
    what a finished step wrote."""
    from models.methods import EARLIER_SIZES

    root = check_output_folder(p.output, "--output", {"--task_dir": p.task_dir, "--model": p.model,
                                                      "--source_library": p.source_library})
    params = layout.params
    if not params.is_file() and (root / ".steps").is_dir() and any((root / ".steps").iterdir()):
        raise UserInputError(f"{root}: holds finished steps (.steps/) but no params.json, so the settings they were "
                             "made with are unknown; resuming would give them this run's: choose another --output "
                             "or remove the folder")
    if not params.is_file():
        return
    # A size added since the folder was made (lora_targets) is at the value every earlier study had.
    earlier = {**EARLIER_SIZES, **read_json_object(params)}
    now = json.loads(json.dumps(vars(p)))  # as it would be written: tuples become lists
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


def check_inputs(plan: StudyPlan, layout: StudyLayout) -> None:
    """Everything a later stage would trip on, checked before the study writes its first file."""
    check_data(plan)
    check_fusions(plan, layout)
    check_backbone(plan.p)
    check_resume(plan.p, layout)


def inputs_digest(plan: StudyPlan, layout: StudyLayout, stage: StageId) -> str:
    """A hash of what a stage reads besides the study's settings: the backbone's weight files; for the sources
    stage the pool's large splits; for a target side the targets' splits of that seed and every source module.
    A finished step whose inputs hash otherwise now is redone."""
    from dataloader.crossfit import split_path
    from utils.io import files_digest

    p = plan.p
    model = Path(p.model)
    files = sorted(f for f in model.glob("*") if f.suffix in (".safetensors", ".bin")) if model.is_dir() else []
    if stage.data_seed is None:
        files += [split_path(p.task_dir, t, p.source_k, p.source_data_seed, split)
                  for t in plan.task_pool for split in ("train", "dev", "test")]
    else:
        files += [split_path(p.task_dir, t, p.target_k, stage.data_seed, split)
                  for t in plan.targets for split in ("train", "dev", "test")]
        files += sorted(layout.sources(stage.delta).rglob("*.safetensors"))
    return files_digest(files)


def resolve_group_size(plan: StudyPlan) -> tuple[int, str]:
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

    p = plan.p
    if p.group_size != "auto":
        return int(p.group_size), f"group size {p.group_size}"
    tokenizer = AutoTokenizer.from_pretrained(p.model)
    splits = [] if p.source_library else [(t, p.source_k, p.source_data_seed) for t in plan.task_pool]
    splits += [(t, p.target_k, seed) for seed in plan.data_seeds for t in plan.targets]
    encoded = [encode_examples(tokenizer, examples, p.max_input_length, p.max_output_length)
               for t, k, seed in splits for examples in load_task(p.task_dir, t, k, seed, ["train"]).values()]
    config, device = load_backbone_config(p.model), torch.device(pick_device(p.device))
    length = longest_example(encoded)
    count = len(plan.task_pool)
    train = pick_group_size("auto", count, config, device, max(p.source_bsz, p.target_bsz), length, True)
    predict = pick_group_size("auto", count, config, device, 100, length, False)
    return min(train, predict)
