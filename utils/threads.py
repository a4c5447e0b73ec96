"""How many CPU threads a process should use: the cores it may run on, shared among the jobs it starts.

PyTorch starts one intra-op thread per core of the machine. A process pinned to fewer cores (taskset, a cgroup's
cpuset), or one of N jobs on the same cores, would then run more threads than it gets cores, and spinning threads
that wait for a core cost far more than a fair share (bench/threads.py). ``OMP_NUM_THREADS`` always wins.
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on (its affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def threads_per_job(jobs: int = 1) -> int:
    """Threads for each of ``jobs`` processes sharing this process's cores (at least one)."""
    return max(1, usable_cores() // max(1, jobs))


def limit_torch_threads() -> None:
    """Cap torch's intra-op threads at the usable cores, unless OMP_NUM_THREADS says how many."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    import torch

    if torch.get_num_threads() > usable_cores():
        torch.set_num_threads(usable_cores())
