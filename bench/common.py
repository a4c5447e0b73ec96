"""Shared pieces of the benchmarks: sizes, synthetic backbones and delta modules, timing, peak RSS, tables.

Every bench writes one markdown table to ``bench/results/<name>.md`` (or ``--results_dir``) through the
project's atomic writers and prints it. Ratios are always measured within one run, interleaved or repeated,
with medians, because the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file (python bench/x.py): make the repo importable
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from models.delta import DeltaConfig, save_delta_checkpoint  # noqa: E402
from models.run_folders import CHECKPOINT_SUBDIR, RESULT_COLUMNS  # noqa: E402
from models.settings import DEFAULT_MODEL_DIR  # noqa: E402
from utils.errors import UserInputError  # noqa: E402
from utils.io import write_text_atomic, write_tsv_atomic  # noqa: E402
from utils.params import HelpFormatter  # noqa: E402

RESULTS_DIR = REPO / "bench" / "results"
PEAK_RSS = REPO / "bench" / "peak_rss.py"
METHODS = ("adapter", "lora", "prefix")

# The module sizes of scripts/adapter.sh, scripts/lora.sh and scripts/prefix.sh (also the study's defaults).
SCRIPT_SIZES: dict[str, dict[str, Any]] = {
    "adapter": {"adapter_type": "houlsby", "adapter_size": 12},
    "lora": {"lora_r": 8, "lora_alpha": 16},
    "prefix": {"prefix_length": 32, "prefix_mlp": 64},
}

# Shapes of the public checkpoints, without their weights (the vocabulary is the embedded default's).
T5_SHAPES: dict[str, dict[str, Any]] = {
    "t5-small": {"d_model": 512, "d_ff": 2048, "d_kv": 64, "num_layers": 6, "num_decoder_layers": 6,
                 "num_heads": 8, "feed_forward_proj": "relu"},
    "t5-base": {"d_model": 768, "d_ff": 3072, "d_kv": 64, "num_layers": 12, "num_decoder_layers": 12,
                "num_heads": 12, "feed_forward_proj": "relu"},
}


def script_config(method: str) -> DeltaConfig:
    """The delta config that the method's sweep script trains with by default."""
    if method not in SCRIPT_SIZES:
        raise UserInputError(f"--methods: expected some of {', '.join(METHODS)}, found {method!r}")
    return DeltaConfig(method, **SCRIPT_SIZES[method]).validate()


def bench_parser(description: str) -> argparse.ArgumentParser:
    """The flags every bench shares: --quick and --results_dir."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes and one repeat: checks the code paths in seconds")
    p.add_argument("--results_dir", default=str(RESULTS_DIR), help="where the markdown table is written")
    return p


def check_positive(flag: str, values: Sequence[int]) -> None:
    for v in values:
        if v <= 0:
            raise UserInputError(f"{flag}: expected positive integers, found {v}")


# --------------------------------------------------------------------------------------------------
# Backbones and synthetic delta modules


def default_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(DEFAULT_MODEL_DIR))


def default_config():
    """The embedded default backbone's T5Config (synthetic modules of "the default size" use it)."""
    from transformers import T5Config

    return T5Config.from_pretrained(str(DEFAULT_MODEL_DIR))


def t5_config(shape: str, vocab_size: int):
    """A T5Config of a public checkpoint's shape with the given vocabulary (no download)."""
    from transformers import T5Config

    if shape not in T5_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(T5_SHAPES)}")
    return T5Config(vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                    tie_word_embeddings=False, **T5_SHAPES[shape])


def save_random_backbone(folder: Path, shape: str, seed: int = 0, device: str = "cpu") -> Path:
    """A randomly initialised T5 of ``shape`` with the default tokenizer, saved so ``--model folder`` loads it."""
    from transformers import T5ForConditionalGeneration

    tokenizer = default_tokenizer()
    config = t5_config(shape, len(tokenizer))
    torch.manual_seed(seed)
    with torch.device(device):  # on a GPU the random init is much faster than on one CPU thread
        model = T5ForConditionalGeneration(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.to("cpu").save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    del model
    return folder


def fingerprint_of(config) -> dict[str, int]:
    """models.delta.backbone_fingerprint without building the model (so without the weights hash:
    checks compare only what a checkpoint records)."""
    return {"d_model": int(config.d_model), "num_layers": int(config.num_layers),
            "num_decoder_layers": int(config.num_decoder_layers), "vocab_size": int(config.vocab_size)}


def delta_shapes(config, cfg: DeltaConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the delta parameters on a backbone of ``config``; the backbone is never allocated."""
    from transformers import T5ForConditionalGeneration

    from models.delta import attach_delta, delta_params

    with torch.device("meta"):
        model = T5ForConditionalGeneration(config)
    attach_delta(model, cfg)
    return {n: tuple(p.shape) for n, p in sorted(delta_params(model).items())}


def write_sources(root: Path, names: Sequence[str], cfg: DeltaConfig, config, seed: int = 0,
                  backbone: str = "default", lr: float = 3e-3, bsz: int = 16) -> list[Path]:
    """Random delta modules laid out like a tune.py output: ``root/{name}/{run}/checkpoint`` + result.tsv.

    Values are N(0, 0.02) everywhere (LoRA's B included, so no module is neutral); score.py and the fusion
    scripts resolve each ``root/{name}`` task folder to its run through ``root/result.tsv``.
    """
    shapes = delta_shapes(config, cfg)
    fingerprint = fingerprint_of(config)
    gen = torch.Generator().manual_seed(seed)
    paths, rows = [], []
    for i, name in enumerate(names):
        tensors = {n: torch.randn(s, generator=gen) * 0.02 for n, s in shapes.items()}
        run = root / name / f"lr_{lr!r}_bsz_{bsz}_random_{seed}"
        paths.append(save_delta_checkpoint(run / CHECKPOINT_SUBDIR, tensors, cfg, backbone, fingerprint, task=name,
                                           metric="ACC", score=0.5 + 0.001 * i, step=100))
        rows.append([name, 16, 100, repr(lr), bsz, 42, cfg.method, run.name, f"{0.5 + 0.001 * i:.4f}", "-", 100])
    write_tsv_atomic(root / "result.tsv", RESULT_COLUMNS, rows)
    return paths


def module_mb(shapes: dict[str, tuple[int, ...]], bytes_per_value: int = 4) -> float:
    return sum(int(torch.Size(s).numel()) for s in shapes.values()) * bytes_per_value / 2**20


# --------------------------------------------------------------------------------------------------
# Timing and memory


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of nothing")
    return float(statistics.median(values))


def bench_env() -> dict[str, str]:
    """The environment for child processes: offline, quiet tokenizers, the caller's thread count."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def children_cpu() -> float:
    """User + system CPU seconds of every finished child of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_child(argv: Sequence[str], what: str) -> tuple[float, float, str]:
    """Run a command to completion: (wall seconds, CPU seconds, stdout); start-up included in both.

    CPU time (user + system of the child and its children) is what the benches compare: on a shared,
    busy machine it barely moves with the load of other processes, while wall time can double.
    """
    cpu0, start = children_cpu(), time.perf_counter()
    proc = subprocess.run([str(a) for a in argv], cwd=REPO, env=bench_env(), capture_output=True, text=True)
    wall, cpu = time.perf_counter() - start, children_cpu() - cpu0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{what} failed with exit code {proc.returncode}: {' | '.join(tail)}")
    return wall, cpu, proc.stdout


def run_peak_rss(module: str, args: Sequence[str], preload: Sequence[str], scratch: Path, what: str) -> dict:
    """Run ``python -m module args`` in a fresh child through bench/peak_rss.py; return its measurements.

    Keys: ``baseline_mb`` (RSS after importing ``preload``, where the peak mark is reset), ``peak_mb`` (the peak
    RSS from then to the end), ``seconds`` and ``cpu_seconds`` (wall and CPU time of the module's own run,
    imports excluded) and ``wall`` (the whole child).
    """
    out = scratch / f"rss-{time.monotonic_ns()}.json"
    wall, _, _ = run_child([sys.executable, PEAK_RSS, "--out", out, "--preload", ",".join(preload), "-m", module, "--",
                      *args], what)
    result = json.loads(out.read_text(encoding="utf-8"))
    out.unlink()
    if result["exit_code"] != 0:
        raise RuntimeError(f"{what}: {module} exited with code {result['exit_code']}")
    result["wall"] = wall
    return result


# --------------------------------------------------------------------------------------------------
# Output


def fmt(x: float, digits: int = 2) -> str:
    return f"{x:,.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line() -> str:
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())  # the machine is shared: say how busy it was
    return (f"machine: {os.cpu_count()} CPU cores ({platform.machine()}), OMP_NUM_THREADS={threads}, "
            f"torch {torch.__version__}, Python {platform.python_version()}; load average at the end {load}")


def write_report(results_dir: str | Path, name: str, title: str, command: str, tables: Sequence[str],
                 notes: Sequence[str] = ()) -> Path:
    """Print the report and write it atomically to ``{results_dir}/{name}.md``."""
    parts = [f"# {title}", "", f"`{command}`", "", f"{machine_line()}; {time.strftime('%Y-%m-%d %H:%M')}", ""]
    for table in tables:
        parts += [table, ""]
    parts += [f"- {n}" for n in notes]
    text = "\n".join(parts).rstrip() + "\n"
    path = Path(results_dir) / f"{name}.md"
    write_text_atomic(path, text)
    print(text, flush=True)
    print(f"-> {path}", flush=True)
    return path


def command_line(script: str, argv: Sequence[str] | None, launcher: str = ".venv/bin/python") -> str:
    """The command that reproduces a report, as typed from the repository root."""
    args = list(sys.argv[1:] if argv is None else argv)
    threads = os.environ.get("OMP_NUM_THREADS")  # unset: PyTorch's default, and no prefix to type
    return " ".join([*([f"OMP_NUM_THREADS={threads}"] if threads else []), launcher, script, *args])


def scratch_dir(prefix: str) -> Path:
    import tempfile

    return Path(tempfile.mkdtemp(prefix=f"bench-{prefix}-"))


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
