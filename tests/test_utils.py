"""genbench.utils: the thread counts for work beside other processes and for work alone."""

import os

import torch

from genbench.utils import default_threads, intra_op_threads, threads_when_alone


def test_work_alone_takes_every_core_unless_genbench_threads_says_otherwise(monkeypatch):
    monkeypatch.delenv("GENBENCH_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert default_threads() == 1 and threads_when_alone() == 2  # beside others one thread, alone both cores
    monkeypatch.setenv("GENBENCH_THREADS", "1")
    assert threads_when_alone() == 1


def test_intra_op_threads_are_restored_after_an_error():
    before = torch.get_num_threads()
    try:
        with intra_op_threads(before + 1):
            assert torch.get_num_threads() == before + 1
            raise RuntimeError("inside")
    except RuntimeError:
        pass
    assert torch.get_num_threads() == before
