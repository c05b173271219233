"""Sampling cost of finished runs at 1 and at every core's intra-op threads, interleaved (issue 14).

    python benchmarks/bench_eval_threads.py RUNS_DIR [--models ddpm,vqgan] [--samples 500] [--rounds 2]

RUNS_DIR is the output folder of a finished `genbench compare` (RUNS_DIR/MODEL/model). `genbench
compare` evaluates with every core once its training processes are done (genbench.utils.
threads_when_alone) and trains with one thread per process (default_threads); this measures what
the second thread buys for the evaluation's dominant cost, drawing samples in the protocol's
batches (SAMPLE_BATCH), with the model's own sampler. Rounds alternate the thread counts so that
host drift hits both; the best round of each is printed, in wall ms per image.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from genbench.evaluation.protocol import SAMPLE_BATCH
from genbench.models.base import GenerativeModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path)
    ap.add_argument("--models", default="ddpm,vqgan")
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    counts = sorted({1, os.cpu_count() or 1})
    for name in args.models.split(","):
        model = GenerativeModel.from_pretrained(args.runs / name / "model", device=torch.device("cpu")).eval()
        best = {}
        for _ in range(args.rounds):
            for threads in counts:
                torch.set_num_threads(threads)
                gen = torch.Generator().manual_seed(0)
                t0 = time.perf_counter()
                with torch.no_grad():
                    for i in range(0, args.samples, SAMPLE_BATCH):
                        model.sample(min(SAMPLE_BATCH, args.samples - i), generator=gen)
                ms = (time.perf_counter() - t0) / args.samples * 1000
                best[threads] = min(best.get(threads, ms), ms)
        line = ", ".join(f"{t} thread{'s' * (t > 1)} {ms:.2f}" for t, ms in best.items())
        print(f"{name}: {line} ms/image; {best[counts[0]] / best[counts[-1]]:.2f}x", flush=True)


if __name__ == "__main__":
    main()
