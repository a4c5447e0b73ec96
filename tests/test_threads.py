"""Thread counts: the cores a process may use, shared among its jobs; OMP_NUM_THREADS always wins."""

from __future__ import annotations

import torch

from utils import threads
from utils.jobs import LaunchOptions, job_env


def test_jobs_share_the_usable_cores(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.usable_cores() == 6
    assert [threads.threads_per_job(n) for n in (1, 2, 4, 8)] == [6, 3, 1, 1]
    assert job_env(LaunchOptions(jobs=2))["OMP_NUM_THREADS"] == "3"
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert job_env(LaunchOptions(jobs=2))["OMP_NUM_THREADS"] == "5"  # the user's choice stays


def test_torch_never_runs_more_threads_than_usable_cores(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(4)
        monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {3})
        threads.limit_torch_threads()
        assert torch.get_num_threads() == 1
        torch.set_num_threads(4)
        monkeypatch.setenv("OMP_NUM_THREADS", "4")
        threads.limit_torch_threads()
        assert torch.get_num_threads() == 4  # OMP_NUM_THREADS says how many: left alone
    finally:
        torch.set_num_threads(before)
