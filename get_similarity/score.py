# ruff: noqa: E402
"""Score source delta modules against target tasks with zero-shot similarity metrics.

For every target t of --tasks and every source s of --source_tasks other than t (leave-one-out), the
source's module θ_s (``{source_ckpt_path}/{s}``: a checkpoint, tune.py run folder or tune.py task
folder, whose best dev run is taken) is scored on t's split (dev by default) with each --metric of
get_similarity/metrics.py. The backbone is loaded once; the delta module is attached once (its config
comes from the first source checkpoint, and every other checkpoint must match it) and each source's
tensors are swapped in.

Memory does not grow with the number of sources: every source (and KL reference) is checked before any
scoring from its config and its safetensors header alone (method, sizes, backbone, parameter names and
shapes), and its tensors are read only when it is scored and dropped right after, so at most one module's
tensors are held at a time. The price is one read of a source's file per target it is scored on.

Granularity (--granularity model|block|layer, groups from models.delta.param_group):

* GraNd of a group is the norm of the per-example gradient over that group's parameters alone (the full
  source module is loaded).
* Loss, KL, EL2N and LogitsCos of a group are measured with the source's parameters in that group and
  every other group's parameters at their initial value: the state right after ``attach_delta`` with
  ``torch.manual_seed(--init_seed)`` (the default 42 is tune.py's default seed, so it is also the state
  the sources started from when tuned from scratch). For adapter and LoRA that state is neutral (up/B
  matrices are zero), so a group is scored as if it were the only module present; for prefix tuning the
  initial state is a random prefix, not the absence of one.
* At model granularity the single group "model" is the whole module.

Writes ``{output_dir}/result.tsv`` (atomically) with columns ``target, source, metric, group, score``;
the metric's direction is in get_similarity/metrics.py (LogitsCos: higher is more similar; the others:
lower). An existing result.tsv is updated, as tune.py updates its own: rows of other (target, source,
metric, group) keys are kept, so runs of several metrics, granularities or targets (parallel jobs too: the
update holds a file lock) share one file. A row this run would write that is already there, from an
earlier run, is refused before any scoring unless --overwrite, which replaces it.

    python -m get_similarity.score --delta lora --metric Loss EL2N --tasks ALL_TASKS \\
        --source_ckpt_path runs/sources/lora --output_dir runs/similarity/lora
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python get_similarity/score.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse

from get_similarity.settings import SimilarityConfig, similarity_parser
from utils.errors import answer_flags_early, run_cli
from utils.params import config_from


def build_parser() -> argparse.ArgumentParser:
    return similarity_parser(__doc__)


if __name__ == "__main__":  # --help and a refused flag answer here, before torch and the models load
    answer_flags_early(build_parser)


def main(argv: list[str] | None = None) -> int:
    from get_similarity.scoring import run_similarity  # after the flags: --help needs no torch

    run_similarity(config_from(SimilarityConfig, build_parser().parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
