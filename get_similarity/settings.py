"""The settings and command lines of the get_similarity entry points (score, tune-all, dev-all, importance),
importable without torch: each script parses its flags from here before its heavy imports load, so ``--help`` and
a refused flag answer at once. The scripts re-export their configuration classes.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from dataloader.crossfit import SPLITS
from models.methods import GRANULARITIES, METHODS
from models.settings import AUTO, GROUP_SIZE, BackboneDataConfig, add_backbone_and_data_args, add_group_size_arg
from utils.params import HelpFormatter, field_defaults
from utils.ranges import ANY_INT, POSITIVE_INT, ranges_of, setting


@dataclass(kw_only=True)
class SimilarityConfig(BackboneDataConfig):
    """One scoring run: ``metric`` of every source module on every target's ``split``, leave-one-out."""

    delta: str
    metric: list[str]
    source_ckpt_path: str
    tasks: list[str] = field(default_factory=lambda: ["ALL_TASKS"])
    source_tasks: list[str] | None = None
    random_tuned_ckpt_path: str | None = None
    split: str = "dev"
    max_examples: int | None = setting(None, POSITIVE_INT.allowing(None))
    batch_size: int = setting(32, POSITIVE_INT)
    granularity: str = "model"
    init_seed: int = setting(42, ANY_INT)
    output_dir: str = "runs/similarity"
    overwrite: bool = False
    resume: bool = False  # score only the rows that result.tsv lacks; the rows it has are kept as they are
    bf16: bool = False
    group_size: int | str = setting(AUTO, GROUP_SIZE)  # sources per forward pass (models/group.py); 1: one at a time
    prefilter: str | None = None  # two-stage retrieval: this parameter-space metric ranks every source first
    prefilter_top: int = setting(20, POSITIVE_INT)  # ... and the other metrics score only its top N


def similarity_parser(description: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    p.add_argument("--delta", required=True, choices=METHODS, help="delta method of the source modules")
    p.add_argument("--metric", nargs="+", required=True,
                   help="one or several metrics of the registry in get_similarity/metrics.py (built in: Loss, KL, "
                        "EL2N, LogitsCos, GraNd, LEEP, LogME, Arrow, GradAlign), or 'all'")
    p.add_argument("--tasks", nargs="+", help="target tasks or named lists (task_list.py)")
    p.add_argument("--source_tasks", nargs="+",
                   help="source tasks (default: --tasks); a target is never its own source")
    p.add_argument("--source_ckpt_path", required=True,
                   help="folder holding one checkpoint (or tune.py task folder) per source task: PATH/{task}")
    p.add_argument("--random_tuned_ckpt_path",
                   help="KL only: PATH/{target} holds the module tuned from random init on the target")
    p.add_argument("--split", choices=SPLITS, help="the target split to score on (D_t)")
    p.add_argument("--max_examples", type=int, help="use only the first N examples of the split")
    p.add_argument("--batch_size", type=int, help="examples per forward pass")
    add_group_size_arg(p)
    p.add_argument("--granularity", choices=GRANULARITIES,
                   help="score the whole module (model), per stack (block) or per layer")
    p.add_argument("--init_seed", type=int,
                   help="seed of the initial delta state that groups outside the scored one are reset to")
    p.add_argument("--output_dir", help="result.tsv is written (or updated) here")
    p.add_argument("--overwrite", action="store_true",
                   help="replace rows of result.tsv that this run would write (same target, source, metric, group)")
    p.add_argument("--resume", action="store_true",
                   help="score only the (target, source, metric, group) rows that result.tsv lacks; without it (and "
                        "without --overwrite) a row this run would write that is already there is refused")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on GPU (forward and backward passes)")
    p.add_argument("--prefilter", metavar="METRIC",
                   help="two-stage retrieval for a large library: this metric, one that runs no forward pass per "
                        "source (Arrow, GradAlign), ranks every source, and the other metrics score only the top "
                        "--prefilter_top; a fusion from the table merges those (default: off, every metric scores "
                        "every source)")
    p.add_argument("--prefilter_top", type=int, help="how many sources the --prefilter keeps per target")
    add_backbone_and_data_args(p)
    p.set_defaults(**field_defaults(SimilarityConfig))
    return p


# --------------------------------------------------------------------------------------------------
# Scoring


# importance.py parses into a namespace, not a dataclass: the ranges of its own flags, beside the shared ones
IMPORTANCE_RANGES = {**ranges_of(BackboneDataConfig), "batch_size": POSITIVE_INT, "num_beams": POSITIVE_INT,
                     "init_seed": ANY_INT,
                     "max_examples": POSITIVE_INT.allowing(None)}


def importance_parser(description: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="delta checkpoint, tune.py run folder or tune.py task folder")
    p.add_argument("--task", required=True, help="target task scored with the module")
    p.add_argument("--split", default="dev", choices=SPLITS, help="the split to score on")
    p.add_argument("--max_examples", type=int, default=None, help="use only the first N examples of the split")
    p.add_argument("--batch_size", type=int, default=32, help="examples per forward pass / generation batch")
    p.add_argument("--num_beams", type=int, default=1, help="beam width of the generation (1: greedy)")
    p.add_argument("--init_seed", type=int, default=42, help="seed of the initial delta state groups are reset to")
    p.add_argument("--output_dir", default="runs/importance", help="importance.tsv and the plot are written here")
    p.add_argument("--overwrite", action="store_true", help="replace importance.tsv and the plot of an earlier run")
    add_backbone_and_data_args(p)
    return p
