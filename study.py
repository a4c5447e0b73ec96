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
Parameters are the plain variables below; each can be overridden on the command line (--name value). The
stages live in pipeline/ (one function each); this file is their settings and one call.

    .venv/bin/python study.py --output runs/study --targets "sent_review topic_news"
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
from pipeline.settings import DEFAULT_SIZES, parse_study_params  # noqa: E402  (torch-free: --help answers at once)
from unit_model.merges import MERGE_SETTINGS  # noqa: E402
from utils.params import block_params  # noqa: E402  (the same parameter-block reader as the fusion scripts)

# ---- parameters (each one can be overridden on the command line as --name value) -------------------
output = "runs/study"  # the study's folder: {delta}/seed_{s}/..., results/, params.json, .steps/
model = "models/default"  # backbone folder or hub id
task_dir = "data/synthetic"  # CrossFit-layout data: the pool's large splits and the targets' few-shot ones
tasks = "ALL_TASKS"  # the source pool; leave-one-out: a target's sources are the other tasks (all, if it is not in it)
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
adapter_size = DEFAULT_SIZES["adapter"]["adapter_size"]  # bottleneck width
lora_r = DEFAULT_SIZES["lora"]["lora_r"]  # LoRA rank
lora_alpha = DEFAULT_SIZES["lora"]["lora_alpha"]  # LoRA alpha (scaling alpha / r)
lora_targets = DEFAULT_SIZES["lora"]["lora_targets"]  # LoRA's locations, a comma set of q, k, v, intermediate, output
prefix_length = DEFAULT_SIZES["prefix"]["prefix_length"]  # prefix tokens
prefix_mlp = DEFAULT_SIZES["prefix"]["prefix_mlp"]  # hidden size of the prefix's reparametrisation MLP
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
# a fusion named WEIGHTING+OPERATOR (e.g. Loss+ties) merges with that operator (unit_model/merges/); the
# operators' settings (--lam, --density, --majority_sign, --merge_seed) are declared beside them and added below
top_k = 0  # keep the K heaviest sources of every weighting, renormalised; 0: all
learned_budget = 40  # learned, learned:METRIC: evaluations of the train loss per target (LoraHub's budget)
learned_optimizer = "nevergrad"  # nevergrad (LoraHub's NGOpt) | gradient (Adam through the linear merge)
max_examples = 64  # dev examples scored by each similarity metric
prefilter = ""  # two-stage retrieval: this metric (Arrow, GradAlign) ranks all sources, the rest score its top N
prefilter_top = 20  # sources the prefilter keeps per target
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
# The merge operators' settings, each declared once beside its operator (name, default, check, help: the flags'
# help comes from unit_model/config.py, which reads the same declarations).
PARAMS.update({name: s.default for name, s in MERGE_SETTINGS.items()})


def parse_args(argv: list[str] | None):
    """The parameter block with the command line's overrides."""
    return parse_study_params(PARAMS, argv, __doc__)


def main(argv: list[str] | None = None) -> int:
    p = parse_args(argv)  # before the heavy imports: --help and a refused flag answer at once
    from pipeline.run import run_study

    return run_study(p)


if __name__ == "__main__":
    from utils.errors import run_cli

    sys.exit(run_cli(main))
