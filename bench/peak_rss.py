"""Run a module as ``__main__`` and record its peak RSS (the child side of bench/common.run_peak_rss).

    python bench/peak_rss.py --out m.json --preload torch,get_similarity.score -m get_similarity.score -- ARGS

``--preload`` modules are imported first; then the kernel's peak-RSS mark is reset to the current RSS
(``/proc/self/clear_refs``), which is the baseline, so ``peak - baseline`` is what the run itself added, with
no transient of the imports hiding it. Where the reset is not possible the baseline is the peak so far.
Writes JSON: baseline_mb, peak_mb, seconds and cpu_seconds (of the run), exit_code, peak_reset.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import resource
import runpy
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def status_mb(key: str) -> float | None:
    """VmRSS / VmHWM of this process from /proc (None off Linux)."""
    try:
        text = Path("/proc/self/status").read_text(encoding="utf-8")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return None


def reset_peak() -> bool:
    """Set the peak-RSS mark to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return status_mb("VmHWM") is not None


def peak_mb() -> float:
    hwm = status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file for the measurements")
    p.add_argument("--preload", default="", help="comma-separated modules imported before the baseline")
    p.add_argument("-m", dest="module", required=True, help="module to run as __main__")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the module (after --)")
    a = p.parse_args(argv)
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    for name in filter(None, a.preload.split(",")):
        importlib.import_module(name)
    gc.collect()
    reset = reset_peak()
    baseline = status_mb("VmRSS") if reset else peak_mb()
    sys.argv = [a.module, *args]
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        runpy.run_module(a.module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    from utils.io import write_text_atomic

    write_text_atomic(a.out, json.dumps({"baseline_mb": baseline, "peak_mb": peak_mb(), "seconds": seconds,
                                         "cpu_seconds": cpu_seconds, "exit_code": code, "peak_reset": reset}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
