"""Dev-all (the study's stage 4): every source module's dev score on every target, zero-shot and after
tune-all.

The command line is ``get_similarity/dev_all.py``, whose help says what a run does and writes; this module
is what it, sweep.py and the study call.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dataloader.crossfit import load_task
from dataloader.metrics import metric_for_task
from models.backbone import load_backbone, pick_device
from models.delta import attach_delta, backbone_fingerprint, check_compatible
from models.evaluate import Decoding, score_modules
from models.examples import encode_examples, longest_example
from models.formats import load_delta_checkpoint
from models.group import ensure_slots, pick_group_size
from models.pair_settings import DevAllConfig
from models.run_folders import file_lock
from models.tune_all import check_sources_fit, load_sources, read_tuned, resolve_pairs
from utils.errors import UserInputError
from utils.io import check_output_path, read_table, write_tsv_atomic
from utils.progress import progress_bar
from utils.ranges import check_ranges

COLUMNS = ["target", "source", "dev_zero_shot", "dev_after"]


def read_rows(path: Path) -> list[list[str]]:
    """Rows of a dev-all table as text; a wrong header or row is a UserInputError naming the file and line."""
    return read_table(path, COLUMNS)


def check_no_earlier_rows(path: Path, pairs: list[tuple[str, str]], merge: bool) -> None:
    """Refuse to replace an earlier run's output: the whole table, or with ``merge`` the rows of ``pairs``."""
    if not path.exists():
        return
    if not merge:
        raise UserInputError(f"--output {path}: exists (from an earlier run); pass --overwrite to replace it "
                             "or choose another --output")
    wanted = set(pairs)
    for line, row in enumerate(read_rows(path), start=2):
        if (row[0], row[1]) in wanted:
            raise UserInputError(f"{path}:{line}: already holds the row of (target={row[0]}, source={row[1]}) from "
                                 "an earlier run; pass --overwrite to replace it or choose another --output")


def unfinished_pairs(output: Path, pairs: list[tuple[str, str]],
                     tuneall_ckpt_path: str | None) -> list[tuple[str, str]]:
    """The pairs a resumed run scores: those without a row in ``output``, or whose row lacks the tuned score
    (``dev_after`` '-') of a tune-all module that exists now."""
    if not output.is_file():
        return pairs
    tuned_root = Path(tuneall_ckpt_path) if tuneall_ckpt_path else None
    done = {(r[0], r[1]) for r in read_rows(output)
            if r[3] != "-" or tuned_root is None or not (tuned_root / r[0] / r[1]).is_dir()}
    return [pair for pair in pairs if pair not in done]


def lock_of(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


def merge_rows(path: Path, rows: list[list[str]]) -> None:
    """Replace these pairs' rows of the table at ``path`` in place and append the new ones; safe in parallel."""
    with file_lock(lock_of(path)):
        new = {(r[0], r[1]): r for r in rows}
        merged = [new.pop((r[0], r[1]), r) for r in (read_rows(path) if path.is_file() else [])]
        write_tsv_atomic(path, COLUMNS, merged + list(new.values()))


def keep_pairs(path: Path, pairs: list[tuple[str, str]]) -> None:
    """Rewrite the table with exactly these pairs' rows in this order: what one process scoring them writes."""
    with file_lock(lock_of(path)):
        rows = {(r[0], r[1]): r for r in read_rows(path)}
        missing = [pair for pair in pairs if pair not in rows]
        if missing:
            raise UserInputError(f"{path}: no row for target {missing[0][0]!r} and source {missing[0][1]!r}")
        write_tsv_atomic(path, COLUMNS, [rows[pair] for pair in pairs])


def fmt(x: float | None) -> str:
    return "-" if x is None else repr(float(x))  # full precision: the fusion takes differences of these



def run_dev_all(config: DevAllConfig) -> None:
    """Score every pair and write the table; everything that can be wrong is checked before the first generation."""
    check_ranges(config)  # every number against the range its field declares (models/pair_settings.py)
    # Everything that can be wrong with the input is checked before the first generation.
    task_dir, targets, source_names, pairs = resolve_pairs(config)
    output = check_output_path(config.output, "--output", {
        "--task_dir": config.task_dir, "--model": config.model, "--tokenizer_path": config.tokenizer_path,
        "--source_ckpt_path": config.source_ckpt_path,
        # the table may sit beside the tuned modules (runs/tuneall/lora/dev_all.tsv), not among them
        "--tuneall_ckpt_path": [Path(config.tuneall_ckpt_path) / t for t in targets] if config.tuneall_ckpt_path
        else None})
    if output.is_dir():
        raise UserInputError(f"--output {output}: is a folder; expected a TSV file name")
    merge = config.merge or config.resume
    if merge and output.is_file():
        read_rows(output)  # refuse a table it cannot merge into before scoring anything
    if config.resume and not config.overwrite:
        pairs = unfinished_pairs(output, pairs, config.tuneall_ckpt_path)
        if not pairs:
            print(f"every pair is in {output} already: nothing to score (--resume)", flush=True)
            return
        targets = [t for t in targets if any(pt == t for pt, _ in pairs)]
    elif not config.overwrite:
        check_no_earlier_rows(output, pairs, merge)
    raw = {t: load_task(task_dir, t, config.k, config.data_seed, ["dev"])["dev"] for t in targets}
    metrics = {t: metric_for_task(t, task_dir) for t in targets}
    cfg, sources = load_sources(config.source_ckpt_path, source_names, config.tune_method)
    tuned: dict[tuple[str, str], Path] = {}  # pairs with a tuned module, and its folder
    metas: dict[tuple[str, str], dict | None] = {}
    if config.tuneall_ckpt_path is not None:
        root = Path(config.tuneall_ckpt_path)
        if not root.is_dir():
            raise UserInputError(f"--tuneall_ckpt_path {root}: folder does not exist")
        metas = {(t, s): read_tuned(root / t / s, t, s) for t, s in pairs}
        tuned = {pair: root / pair[0] / pair[1] for pair, meta in metas.items() if meta is not None}

    device = torch.device(pick_device(config.device))
    model, tokenizer = load_backbone(config.model, config.tokenizer_path, device)
    fingerprint = backbone_fingerprint(model)
    attach_delta(model, cfg)
    model.to(device)
    check_sources_fit(model, cfg, fingerprint, sources, config.allow_other_backbone, config.model)
    for (t, s), folder in tuned.items():
        check_compatible(metas[(t, s)], cfg, fingerprint, str(folder), allow_other_weights=config.allow_other_backbone)
    dev = {t: encode_examples(tokenizer, raw[t], config.max_input_length, config.max_output_length) for t in targets}
    # Every module scored on a target (its sources as they are, then its tuned modules) in groups of G that
    # share each generation (models.evaluate.score_modules); tuned modules are read when their group runs.
    todo = set(pairs)
    work = {t: [(("zero_shot", s), lambda s=s: sources[s].tensors, str(sources[s].folder))
                for s in source_names if (t, s) in todo]
            + [(("after", s), lambda folder=folder: load_delta_checkpoint(folder)[0], str(folder))
               for (target, s), folder in tuned.items() if target == t and (t, s) in todo]
            for t in targets}
    size, why = pick_group_size(config.group_size, max(len(items) for items in work.values()), model.config, device,
                                config.predict_batch_size, longest_example(dev.values()), training=False)
    print(f"{len(pairs)} pair(s) of {len(targets)} target(s) x {len(source_names)} source(s), {len(tuned)} tuned: "
          f"{cfg.describe()} ({device}); {why}; output {output}", flush=True)
    slots = ensure_slots(model, cfg, size)  # one slot: the attached module itself
    bar = progress_bar(total=sum(len(items) for items in work.values()), desc="dev scores")
    scores = {t: score_modules(model, tokenizer, dev[t], metrics[t], work[t], slots, Decoding(config.max_output_length),
                               config.predict_batch_size, config.num_beams, config.bf16, bar.update)
              for t in targets}
    bar.close()
    zero_shot = {(t, s): v for t in targets for (kind, s), v in scores[t].items() if kind == "zero_shot"}
    after = {(t, s): v for t in targets for (kind, s), v in scores[t].items() if kind == "after"}

    rows = [[t, s, fmt(zero_shot[(t, s)]), fmt(after.get((t, s)))] for t, s in pairs]
    output.parent.mkdir(parents=True, exist_ok=True)
    if merge:
        merge_rows(output, rows)
    else:
        write_tsv_atomic(output, COLUMNS, rows)
    print(f"wrote {len(rows)} row(s) to {output}", flush=True)

