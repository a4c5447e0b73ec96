# ruff: noqa: E402
"""Which parts of a delta module matter on a task: reset one group at a time and re-score.

For a module (--checkpoint: a checkpoint, a tune.py run folder or a tune.py task folder) and a target
task (--task), each parameter group (block granularity: encoder/decoder, then layer granularity: one
group per layer, or per prefix for prefix tuning; see models.delta.param_group) is reset to its initial
value while the others keep the module's values, and the target split (dev by default) is scored by
generation + the task's metric and by the pooled mean token loss.

The initial value is the state right after ``attach_delta`` with ``torch.manual_seed(--init_seed)``
(42: tune.py's default seed). For adapter and LoRA it is neutral (a reset group does nothing); for
prefix tuning it is a random prefix.

Writes into --output_dir, each file atomically (files of an earlier run are replaced only with --overwrite):

* ``importance.tsv``: columns ``granularity, group, dev_score, dev_loss, delta_score, delta_loss`` with
  deltas relative to the full module (negative delta_score / positive delta_loss: the group helps).
  Rows: ``model/full`` (nothing reset), every block group, every layer group, ``model/init`` (every
  group reset).
* ``importance_layers.png``: delta_score and delta_loss per layer group, as bars.

    python -m get_similarity.importance --checkpoint runs/sources/lora/sent_review --task sent_review \\
        --output_dir runs/importance/lora/sent_review
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python get_similarity/importance.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse

from get_similarity.settings import IMPORTANCE_RANGES, importance_parser
from utils.errors import answer_flags_early


def build_parser() -> argparse.ArgumentParser:
    return importance_parser(__doc__)


if __name__ == "__main__":  # --help and a refused flag answer here, before torch and the models load
    answer_flags_early(build_parser)

from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402

from dataloader.crossfit import load_task  # noqa: E402
from dataloader.metrics import metric_for_task  # noqa: E402
from get_similarity.metrics import TokenMean, token_loss  # noqa: E402
from get_similarity.scoring import delta_groups  # noqa: E402
from models.backbone import load_backbone, pick_device, quiet_libraries
from models.backbones import family_of
from models.delta import (
    DeltaConfig,
    attach_delta,
    backbone_fingerprint,
    check_compatible,
    delta_state_dict,
    load_delta_state,
)
from models.evaluate import evaluate  # noqa: E402
from models.examples import EncodedTask, encode_examples, first_output_batches, to_device  # noqa: E402
from models.formats import load_delta_checkpoint
from models.run_folders import resolve_checkpoint  # noqa: E402
from utils.errors import UserInputError, run_cli  # noqa: E402
from utils.io import check_output_folder, save_figure_atomic, write_tsv_atomic  # noqa: E402
from utils.progress import progress_bar  # noqa: E402
from utils.ranges import check_ranges  # noqa: E402

COLUMNS = ["granularity", "group", "dev_score", "dev_loss", "delta_score", "delta_loss"]
TSV_FILE = "importance.tsv"
PLOT_FILE = "importance_layers.png"


@dataclass
class Row:
    granularity: str
    group: str
    dev_score: float
    dev_loss: float


@torch.no_grad()
def pooled_loss(model: torch.nn.Module, task: EncodedTask, pad_id: int, batch_size: int) -> float:
    """Mean token cross-entropy over all target tokens of ``task`` (first gold outputs)."""
    device = next(model.parameters()).device
    mean = TokenMean()
    family = family_of(model)
    for _, batch in first_output_batches(model, task, batch_size, pad_id):
        batch = to_device(batch, device)
        mean.add(*token_loss(family.answer_logits(model, batch), batch["labels"]))
    return mean.value()


def reset(tensors: dict[str, torch.Tensor], init_state: dict[str, torch.Tensor],
          names: list[str]) -> dict[str, torch.Tensor]:
    """``tensors`` with the parameters in ``names`` set back to their initial value."""
    chosen = set(names)
    return {n: (init_state[n] if n in chosen else t) for n, t in tensors.items()}


def importance_rows(model: torch.nn.Module, tokenizer, task: EncodedTask, metric: str,
                    tensors: dict[str, torch.Tensor], init_state: dict[str, torch.Tensor], batch_size: int,
                    max_new_tokens: int, num_beams: int = 1) -> list[Row]:
    """Full module, each block group reset, each layer group reset, everything reset (in that order)."""
    everything = list(init_state)
    plan = [("model", "full", [])]
    for granularity in ("block", "layer"):
        plan += [(granularity, g, names) for g, names in delta_groups(model, granularity).items()]
    plan.append(("model", "init", everything))
    rows = []
    for granularity, group, names in progress_bar(plan, desc="groups"):
        load_delta_state(model, reset(tensors, init_state, names), f"{granularity} {group}")
        score, _ = evaluate(model, tokenizer, task, metric, batch_size, max_new_tokens, num_beams)
        rows.append(Row(granularity, group, score, pooled_loss(model, task, tokenizer.pad_token_id, batch_size)))
    return rows


def plot_layers(rows: list[Row], path: Path, title: str = "") -> None:
    """Bar plots of delta_score and delta_loss per layer group, written atomically to ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    import seaborn as sns

    full = rows[0]
    layers = [r for r in rows if r.granularity == "layer"]
    names = [r.group for r in layers]
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.2 * len(names) + 2), 3.5))
    for ax, label, values in (
        (axes[0], "dev score change", [r.dev_score - full.dev_score for r in layers]),
        (axes[1], "dev loss change", [r.dev_loss - full.dev_loss for r in layers]),
    ):
        sns.barplot(x=names, y=values, ax=ax, color="tab:blue")
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_ylabel(label)
        ax.set_xlabel("layer reset to its initial value")
        ax.tick_params(axis="x", rotation=45)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        save_figure_atomic(fig, path, dpi=120)
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quiet:
        quiet_libraries()
    check_ranges(vars(args), IMPORTANCE_RANGES)
    out = check_output_folder(args.output_dir, "--output_dir", {
        "--task_dir": args.task_dir, "--model": args.model, "--tokenizer_path": args.tokenizer_path,
        "--checkpoint": args.checkpoint})
    for name in (TSV_FILE, PLOT_FILE):
        if (out / name).is_dir():
            raise UserInputError(f"--output_dir: {out / name} is a folder, expected a file or nothing")
        if (out / name).exists() and not args.overwrite:
            raise UserInputError(f"{out / name}: exists (from an earlier run); pass --overwrite to replace it "
                                 "or choose another --output_dir")

    # Inputs first: the task's split and metric, the checkpoint; nothing is written before all are fine.
    examples = load_task(args.task_dir, args.task, args.k, args.data_seed, [args.split])[args.split]
    examples = examples[: args.max_examples] if args.max_examples else examples
    metric = metric_for_task(args.task, args.task_dir)  # always a registered metric (checked when read)
    try:
        folder = resolve_checkpoint(args.checkpoint, task=args.task)
        tensors, meta = load_delta_checkpoint(folder)
    except UserInputError as e:
        raise UserInputError(f"--checkpoint: {e}") from None
    cfg = DeltaConfig.from_checkpoint_meta(meta)

    device = torch.device(pick_device(args.device))
    model, tokenizer = load_backbone(args.model, args.tokenizer_path, device)
    check_compatible(meta, cfg, backbone_fingerprint(model), str(folder),
                     allow_other_weights=args.allow_other_backbone, backbone=args.model)
    torch.manual_seed(args.init_seed)
    attach_delta(model, cfg)
    model.to(device)
    init_state = delta_state_dict(model)
    load_delta_state(model, tensors, str(folder))  # keys and shapes
    task = encode_examples(tokenizer, examples, args.max_input_length, args.max_output_length)
    print(f"{folder} ({cfg.describe()}) on {args.task} {args.split} ({len(examples)} examples, {metric})", flush=True)

    rows = importance_rows(model, tokenizer, task, metric, tensors, init_state, args.batch_size,
                           args.max_output_length, args.num_beams)
    full = rows[0]
    table = [[r.granularity, r.group, f"{r.dev_score:.10g}", f"{r.dev_loss:.10g}",
              f"{r.dev_score - full.dev_score:.10g}", f"{r.dev_loss - full.dev_loss:.10g}"] for r in rows]
    out.mkdir(parents=True, exist_ok=True)
    title = f"{args.task}: full module {metric} {full.dev_score:.3f}, loss {full.dev_loss:.3f} ({cfg.method})"
    plot_layers(rows, out / PLOT_FILE, title)
    write_tsv_atomic(out / TSV_FILE, COLUMNS, table)
    for r in rows:
        print(f"{r.granularity:>5} {r.group:<22} score {r.dev_score:.4f} loss {r.dev_loss:.4f}", flush=True)
    print(f"-> {out / TSV_FILE}, {out / PLOT_FILE}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
