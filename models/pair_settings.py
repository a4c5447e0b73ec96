"""The settings and command lines of tune-all and dev-all (the study's stages 3 and 4), importable without torch:
``get_similarity/tune_all.py`` and ``dev_all.py`` parse their flags from here before the heavy imports load, so
``--help`` and a refused flag answer at once.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from models.methods import METHODS
from models.settings import AUTO, GROUP_SIZE, BackboneDataConfig, add_backbone_and_data_args, add_group_size_arg
from utils.params import HelpFormatter, field_defaults, flags_of
from utils.ranges import ANY_INT, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, setting


@dataclass(kw_only=True)
class PairsConfig(BackboneDataConfig):
    """What tune-all and dev-all share: the (target, source) pairs of ``tasks`` x ``source_tasks``
    (leave-one-out), the source modules, and how the dev split is predicted."""

    source_ckpt_path: str
    tasks: list[str] = field(default_factory=lambda: ["SAMPLE_TASKS"])
    source_tasks: list[str] | None = None
    tune_method: str | None = None  # expected method of the sources; None: whatever they are
    predict_batch_size: int = setting(64, POSITIVE_INT)
    num_beams: int = setting(1, POSITIVE_INT)
    bf16: bool = False
    overwrite: bool = False
    group_size: int | str = setting(AUTO, GROUP_SIZE)  # modules per forward pass (models/group.py); 1: one at a time

    def to_argv(self) -> list[str]:
        """The entry point's flags that give this config back (those left at their default are left out)."""
        return flags_of(vars(self), field_defaults(type(self)))


@dataclass(kw_only=True)
class TuneAllConfig(PairsConfig):
    """One tune-all run: every pair tuned from its source for ``steps`` steps, the last module kept."""

    output_dir: str
    steps: int = setting(200, POSITIVE_INT)
    learning_rate: float = setting(5e-4, POSITIVE)
    bsz: int = setting(8, POSITIVE_INT)
    warmup_steps: int | None = setting(None, NON_NEGATIVE_INT.allowing(None))  # None: default_warmup
    weight_decay: float = setting(0.0, NON_NEGATIVE)
    max_grad_norm: float = setting(1.0, NON_NEGATIVE)  # 0: no clipping
    seed: int = setting(42, ANY_INT)
    log_file_only: bool = False


def pairs_parser(description: str | None, never: str, modules: str) -> argparse.ArgumentParser:
    """A parser with ``PairsConfig``'s flags, phrased for the entry point: a target is ``never`` its own source,
    and ``--tune_method`` names the method of its ``modules``."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    p.add_argument("--tasks", nargs="+", help="targets: task names or named lists")
    p.add_argument("--source_tasks", nargs="+", help=f"sources (default: --tasks); a target is never {never}")
    p.add_argument("--source_ckpt_path", required=True,
                   help="folder holding one source module per task: {source_ckpt_path}/{source}")
    p.add_argument("--tune_method",
                   help=f"expected method of the {modules} ({', '.join(METHODS)}); default: whatever they are")
    p.add_argument("--predict_batch_size", type=int, help="batch size of the dev generation")
    p.add_argument("--num_beams", type=int, help="beam width of the dev generation (1: greedy)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on GPU")
    add_group_size_arg(p)
    add_backbone_and_data_args(p)
    return p


def tune_all_parser(description: str | None) -> argparse.ArgumentParser:
    p = pairs_parser(description, "tuned from itself", "sources")
    p.add_argument("--output_dir", required=True, help="tuned modules go to {output_dir}/{target}/{source}")
    p.add_argument("--steps", type=int, help="training steps per (target, source) pair")
    p.add_argument("--learning_rate", type=float, help="AdamW learning rate of every pair")
    p.add_argument("--bsz", type=int, help="training batch size")
    p.add_argument("--warmup_steps", type=int,
                   help="linear warm-up steps, then linear decay to 0 (default: a tenth of --steps)")
    p.add_argument("--weight_decay", type=float, help="AdamW weight decay")
    p.add_argument("--max_grad_norm", type=float, help="clip each module's gradient to this norm (0: no clipping)")
    p.add_argument("--seed", type=int, help="seed of batching and dropout (same for every pair)")
    p.add_argument("--overwrite", action="store_true", help="redo pairs whose tuned module already exists")
    p.add_argument("--log_file_only", action="store_true", help="log lines only to tune_all.log (progress bars stay)")
    p.set_defaults(**field_defaults(TuneAllConfig))
    return p


@dataclass(kw_only=True)
class DevAllConfig(PairsConfig):
    """One dev-all run: the dev score of every source module on every target, zero-shot and after tune-all."""

    output: str
    tuneall_ckpt_path: str | None = None
    merge: bool = False
    resume: bool = False  # score only the pairs --output lacks (or holds without the tuned score that now exists)


def dev_all_parser(description: str | None) -> argparse.ArgumentParser:
    p = pairs_parser(description, "scored with its own module", "modules")
    p.add_argument("--tuneall_ckpt_path",
                   help="tune_all.py's --output_dir: tuned modules at {tuneall_ckpt_path}/{target}/{source}")
    p.add_argument("--output", required=True, help="TSV to write: target, source, dev_zero_shot, dev_after")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output (with --merge: the rows of this run's pairs)")
    p.add_argument("--merge", action="store_true",
                   help="replace this run's rows in an existing --output and keep its other rows (under a file "
                        "lock): parallel jobs that each score some pairs share one table")
    p.add_argument("--resume", action="store_true",
                   help="score only the pairs that --output lacks, or holds with dev_after '-' where a tuned module "
                        "now exists; its other rows are kept (implies --merge)")
    p.set_defaults(**field_defaults(DevAllConfig))
    return p
