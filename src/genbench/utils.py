"""Tiny helpers shared by every module (lucidrains style)."""

from __future__ import annotations

import contextlib
import functools
import os
import re

import torch

from .errors import GenbenchError


def exists(x) -> bool:
    return x is not None


def default(x, d):
    if exists(x):
        return x
    return d() if callable(d) else d


DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"


def select_device(device: str | None = None) -> torch.device:
    """`None`/"auto": CUDA when available, else CPU; "cpu", "cuda" or "cuda:N" as asked, when this
    machine and torch build have it (else a GenbenchError naming the device)."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, str) or not re.fullmatch(DEVICE_PATTERN, device):
        raise GenbenchError(f"device {device!r}: expected auto, cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise GenbenchError(f"device {device!r}: CUDA is not available in this torch build or on this machine")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise GenbenchError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(device)


MAX_SEED = 2**63 - 1


def check_seed(seed: int, what: str = "--seed") -> int:
    """A seed torch's generators accept, with room for the per-batch offsets added to it."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED // 2:
        raise GenbenchError(f"{what} {seed!r}: expected an integer in [0, 2**62]")
    return seed


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16).

    Without them PyTorch emulates bf16 convolutions and matmuls, which we measured at 12-50x
    *slower* than fp32 on an AVX2-only EPYC (docs/benchmarks.md), so bf16 is skipped there."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_effective(device: torch.device, requested: bool) -> bool:
    """Whether a bf16 request is honoured on `device`: only where the hardware has native bf16."""
    if not requested:
        return False
    if device.type == "cuda":  # pre-Ampere GPUs emulate bf16, slower than fp32
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and cpu_has_native_bf16()


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA, or on a CPU with native bf16; a no-op context otherwise."""
    if not bf16_effective(device, enabled):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def default_threads() -> int:
    """Intra-op threads: 1 on machines with at most 2 cores, else torch's default.

    Measured on the 2-core development machine: with any other process running, 2 threads made
    small-op training steps 5-20x slower than 1 (OpenMP workers spin waiting for a core), while
    on an idle machine 1 thread costs little for these small models. GENBENCH_THREADS overrides."""
    env = os.environ.get("GENBENCH_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise GenbenchError(f"GENBENCH_THREADS={env!r}: expected a positive integer") from None
        if n < 1:
            raise GenbenchError(f"GENBENCH_THREADS={env!r}: expected a positive integer")
        return n
    return 1 if (os.cpu_count() or 1) <= 2 else torch.get_num_threads()


def threads_when_alone() -> int:
    """Intra-op threads for work that has the machine to itself (the comparison's evaluation, after its
    training processes are done): GENBENCH_THREADS when set, else every core. default_threads()'s one
    thread is for work beside other processes; alone on 2 cores, a second thread made sampling the
    standard presets' DDPM and VQ-GAN 1.3-1.5x faster (benchmarks/bench_eval_threads.py)."""
    return default_threads() if os.environ.get("GENBENCH_THREADS") else (os.cpu_count() or 1)


@contextlib.contextmanager
def intra_op_threads(n: int):
    """torch's intra-op threads set to `n` inside, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
