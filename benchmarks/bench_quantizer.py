"""Nearest-code lookup throughput: genbench's matmul lookup vs two naive implementations.

    python benchmarks/bench_quantizer.py [--n 16384] [--dim 64] [--sizes 512 8192] [--device cpu]

Methods, all returning argmin_k ||z_n - e_k||^2 for N vectors z against a (K, D) codebook:
- genbench: ||e||^2 - 2 z.e^T via one batched GEMM per chunk of rows (genbench.core.quantizer.nearest_code);
- cdist: torch.cdist(z, e).argmin(1) (computes the square root, and the full (N, K) matrix at once);
- broadcast: ((z[:, None] - e[None]) ** 2).sum(-1).argmin(1), which materialises (N, K, D); run
  only where that tensor fits under --max-broadcast-gib.

Prints a Markdown table of codes per second (median of --repeats timed runs after one warm-up),
the speed-up of genbench over each, the working memory each method allocates for distances, and
the fraction of indices that agree with genbench. On a shared CPU, `--clock cpu` (process CPU
time, with --threads 1) measures the work done rather than the time spent waiting for a core.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from genbench.core.quantizer import nearest_code


def lookup_cdist(z, e):
    return torch.cdist(z, e).argmin(1)


def lookup_broadcast(z, e):
    return (z[:, None, :] - e[None, :, :]).pow(2).sum(-1).argmin(1)


def timed(fn, repeats: int, device: torch.device, clock=time.perf_counter) -> tuple[float, torch.Tensor]:
    """Median time of `repeats` calls (after one warm-up) and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = clock()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(clock() - t)
    return statistics.median(times), out


def mib(n_floats: int) -> str:
    return f"{n_floats * 4 / 2**20:,.0f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=16384, help="vectors to quantize")
    ap.add_argument("--dim", type=int, default=64, help="code dimension D")
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 8192], help="codebook sizes K")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    ap.add_argument("--max-broadcast-gib", type=float, default=2.0, help="skip broadcast beyond this (N,K,D) size")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="wall time, or process CPU time")
    args = ap.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(args.n, args.dim, generator=g).to(device)

    print(f"N = {args.n} vectors, D = {args.dim}, device = {device}, torch {torch.__version__}, "
          f"threads = {torch.get_num_threads()}, {args.clock} clock, median of {args.repeats} runs\n")
    print("| K | method | codes/s | genbench speed-up | distance memory | indices equal to genbench |")
    print("|---:|---|---:|---:|---:|---:|")
    chunk = 1 << 24  # nearest_code's default chunk_elements
    for k in args.sizes:
        e = torch.randn(k, args.dim, generator=g).to(device)
        t_ref, ref = timed(lambda: nearest_code(z, e, chunk), args.repeats, device, clock)
        rows = [("genbench (matmul, chunked)", t_ref, ref, mib(min(args.n, max(1, chunk // k)) * k))]
        t, idx = timed(lambda: lookup_cdist(z, e), args.repeats, device, clock)
        rows.append(("torch.cdist + argmin", t, idx, mib(args.n * k)))
        big = args.n * k * args.dim
        if big * 4 / 2**30 <= args.max_broadcast_gib:
            t, idx = timed(lambda: lookup_broadcast(z, e), args.repeats, device, clock)
            rows.append(("broadcast (N,K,D)", t, idx, mib(big)))
        else:
            rows.append(("broadcast (N,K,D): skipped", None, None, mib(big)))
        for name, t, idx, mem in rows:
            if t is None:
                print(f"| {k} | {name} | - | - | {mem} | - |")
                continue
            agree = (idx == ref).float().mean().item()
            print(f"| {k} | {name} | {args.n / t:,.0f} | {t / t_ref:.2f}x | {mem} | {agree:.4f} |")


if __name__ == "__main__":
    main()
