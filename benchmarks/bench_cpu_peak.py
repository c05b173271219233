"""Measured peak of this machine: GEMM and conv throughput in fp32 and bf16, 1 and all threads.

The numbers the other benchmarks divide by ("fraction of measured peak"), and the reason genbench
only autocasts to bf16 where the CPU has native bf16 instructions.

    python benchmarks/bench_cpu_peak.py
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

from genbench.utils import cpu_has_native_bf16


def _time(fn, min_time=1.0):
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_time:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def gemm_gflops(dtype, n=1024):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / _time(lambda: a @ b) / 1e9


def conv_gflops(dtype, batch=64, ch=64, side=14):
    x = torch.randn(batch, ch, side, side, dtype=dtype).to(memory_format=torch.channels_last)
    w = torch.randn(ch, ch, 3, 3, dtype=dtype).to(memory_format=torch.channels_last)
    flops = 2 * batch * ch * ch * 9 * side * side
    return flops / _time(lambda: F.conv2d(x, w, padding=1)) / 1e9


def main():
    print(f"CPU: {os.cpu_count()} logical cores; native bf16: {cpu_has_native_bf16()}; "
          f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}")
    print("| op | threads | fp32 GFLOP/s | bf16 GFLOP/s | bf16 / fp32 |")
    print("|---|---|---|---|---|")
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        for name, fn in [("GEMM 1024^3", gemm_gflops), ("conv3x3 64ch 14x14 b64", conv_gflops)]:
            f32 = fn(torch.float32)
            b16 = fn(torch.bfloat16)
            print(f"| {name} | {threads} | {f32:.1f} | {b16:.1f} | {b16 / f32:.2f} |")


if __name__ == "__main__":
    main()
