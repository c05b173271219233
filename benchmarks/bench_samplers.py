"""FD against network calls per sample: samplers x steps on a trained diffusion run (issue 13).

For each (sampler, steps): `--samples` samples drawn with seed 0 through the run's exported model,
scored by the genbench protocol's FD (the feature network of `genbench compare`, against the whole
test set), and the sampling cost: wall and process CPU seconds per image. Writes a JSON file and
prints a markdown table (FD relative to the run's own DDIM-50 when that is in the sweep).

    python benchmarks/bench_samplers.py RUN --samples 5000 \
        --sweep ddim:50,ddim:20,ddim:10,dpm++2m:5,dpm++2m:10,dpm++2m:15,dpm++2m:20,heun:9,heun:15,heun:19 \
        --out bench_samplers.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from genbench.data import DatasetSpec
from genbench.evaluation import metrics
from genbench.evaluation.compare import parse_sampler_sweep
from genbench.evaluation.features import get_feature_network
from genbench.evaluation.trained_run import TrainedRun


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--samples", type=int, default=5000)
    ap.add_argument("--sweep", default="ddim:50,dpm++2m:10")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = TrainedRun(args.run, device="cpu")
    if not run.model.has_sampler:
        raise SystemExit(f"{args.run}: a {run.name} run has no sampler")
    ds = DatasetSpec.from_dict(run.info["dataset"]).load()
    feats = get_feature_network(ds)
    real = feats.features(ds.test)
    T = run.model.diffusion.num_timesteps
    points = []
    for sampler in parse_sampler_sweep(args.sweep):
        run.model.set_sampler(sampler)
        wall, cpu = time.perf_counter(), time.process_time()
        images = run.sample(args.samples, seed=0, batch_size=args.batch_size)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        fd = metrics.frechet_distance(feats.features(images.clamp(0, 1)), real)
        point = {"sampler": sampler.name, "spacing": sampler.resolved_spacing(), "steps": sampler.steps,
                 "network_calls": sampler.network_calls(T), "fd": fd, "wall_s_per_image": wall / args.samples,
                 "cpu_s_per_image": cpu / args.samples}
        points.append(point)
        print(json.dumps(point), flush=True)
        if args.out:
            args.out.write_text(json.dumps({"run": str(args.run), "model": run.name, "samples": args.samples,
                                            "threads": args.threads, "points": points}, indent=2))
    ref = next((p["fd"] for p in points if p["sampler"] == "ddim" and p["steps"] == 50), None)
    print(f"\n| {run.name} sampler | network calls | FD | FD / DDIM-50 | CPU ms / image |")
    print("|---|---|---|---|---|")
    for p in sorted(points, key=lambda p: (p["sampler"], p["network_calls"])):
        rel = f"{p['fd'] / ref:.2f}" if ref else "-"
        print(f"| {p['sampler']} ({p['spacing']}) | {p['network_calls']} | {p['fd']:.2f} | {rel} | "
              f"{p['cpu_s_per_image'] * 1000:.1f} |")


if __name__ == "__main__":
    main()
