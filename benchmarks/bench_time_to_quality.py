"""Time to quality: a model's FD against the training compute it spent (issue 14).

    python benchmarks/bench_time_to_quality.py MODEL --dataset fashion-mnist --preset standard \
        --points 10 --out ttq/ddpm-baseline [--set KEY=VALUE ...] [--baseline ttq/ddpm-old/ttq.json]

Trains (or resumes, or reuses) MODEL through `genbench compare` (one model, one process) with FD probes
at `--points` points of its last stage (genbench.evaluation.probe: `--probe-samples` samples, diffusion
with DPM-Solver++ at 10 calls), then scores the finished model by the full protocol (`--num-samples`).
Writes OUT/ttq.json (the curve, the final point, the machine's CPU flags), OUT/ttq.csv and OUT/ttq.png
(FD against training FLOPs and process CPU seconds, log axes).

With `--baseline B.json` (an earlier output of this script): both curves on one plot, and the CPU
seconds (and FLOPs) each needed to reach the baseline's last probe FD, read off the probe curves
(same estimator on both sides) by log-log interpolation between probes, and their ratio; and the
final points side by side (`final_comparison`): whether this run's full-protocol figures are all at
least as good as the baseline's (FD, and where the model has them rFD, MSE, bits/dim) and the ratio
of the two runs' training CPU seconds and FLOPs. Probes of 500 samples are noisy (a few tenths of
FD), so the final points are the stricter test.

With `--from-compare DIR` nothing is trained: the record is read from the metrics.json of a finished
`genbench compare` run in DIR (its FD probes, `--fd-points` of them, and its final row), e.g. the
full six-model comparison; its training processes ran two at a time, one per core.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from genbench.data import DatasetSpec  # noqa: E402
from genbench.evaluation.compare import run_comparison, split_model_sets  # noqa: E402


def cpu_flags() -> list[str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    flags = next((line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Flags")), [])
    return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))


def reach(curve: dict, target: float, axis: str) -> float | None:
    """The `axis` value at which the probe curve first reaches FD <= target (log-log interpolation
    between the two probes around it); None when it never does."""
    xs, fds = curve[axis], curve["fd"]
    for i, fd in enumerate(fds):
        if fd <= target:
            if i == 0:
                return xs[0]
            x0, x1, f0, f1 = xs[i - 1], xs[i], fds[i - 1], fd
            if f0 == f1 or min(x0, x1, f0, f1, target) <= 0:
                return x1
            w = (math.log(f0) - math.log(target)) / (math.log(f0) - math.log(f1))
            return math.exp(math.log(x0) + w * (math.log(x1) - math.log(x0)))
    return None


QUALITY_KEYS = ("fd", "recon_fd", "mse", "bits_per_dim")  # lower is better, all of them


def final_comparison(base: dict, this: dict) -> dict:
    """The two runs' final points: every quality figure both have, whether this run's is at least as
    good, and the baseline / this-run ratios of training CPU seconds and FLOPs."""
    keys = [k for k in QUALITY_KEYS if base.get(k) is not None and this.get(k) is not None]
    return {"quality": {k: {"baseline": base[k], "this run": this[k]} for k in keys},
            "at_least_as_good": all(this[k] <= base[k] for k in keys),
            "cpu_ratio": base["train_cpu_s"] / this["train_cpu_s"],
            "flop_ratio": base["train_flops"] / this["train_flops"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--points", type=int, default=10)
    ap.add_argument("--num-samples", type=int, default=None)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--baseline", type=Path, default=None)
    ap.add_argument("--from-compare", type=Path, default=None, metavar="DIR",
                    help="read MODEL's curve and final point from DIR/metrics.json of a finished comparison")
    args = ap.parse_args()
    if args.from_compare:
        result = json.loads((args.from_compare / "metrics.json").read_text())
    else:
        sets = split_model_sets([f"{args.model}:{item}" for item in args.set])
        result = run_comparison(DatasetSpec(args.dataset), args.out, models=[args.model], preset=args.preset,
                                sets=sets, num_samples=args.num_samples, jobs=1, sampler_sweep=(),
                                fd_points=args.points)
    row = next(r for r in result["rows"] if r["kind"] == "model" and r["name"] == args.model)
    record = {"model": args.model, "dataset": args.dataset, "preset": args.preset, "sets": args.set,
              "cpu_flags": cpu_flags(), "curve": row["quality_curve"],
              "final": {"fd": row["fd"], "train_flops": row["train_flops"], "train_cpu_s": row["train_cpu_time_s"],
                        "train_wall_s": row["train_wall_time_s"], "num_samples": result["num_samples"],
                        "recon_fd": row.get("recon_fd"), "mse": row.get("mse"), "bits_per_dim": row.get("bits_per_dim")}}
    curves = {"this run": record}
    if args.baseline:
        base = json.loads(args.baseline.read_text())
        curves = {"baseline": base, "this run": record}
        target = base["curve"]["fd"][-1]
        record["vs_baseline"] = {"target_probe_fd": target}
        for axis in ("train_cpu_s", "train_flops"):
            b, n = reach(base["curve"], target, axis), reach(record["curve"], target, axis)
            record["vs_baseline"][axis] = {"baseline": b, "this run": n,
                                           "ratio": b / n if b and n else None}
        record["vs_baseline"]["final"] = final_comparison(base["final"], record["final"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ttq.json").write_text(json.dumps(record, indent=2))
    with open(args.out / "ttq.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["global_step", "train_flops", "train_cpu_s", "train_s", "fd"])
        c = record["curve"]
        w.writerows(zip(c["global_step"], c["train_flops"], c["train_cpu_s"], c["train_s"], c["fd"]))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, axis, label in ((axes[0], "train_flops", "training FLOPs"), (axes[1], "train_cpu_s", "training CPU s")):
        for name, rec in curves.items():
            ax.plot(rec["curve"][axis], rec["curve"]["fd"], marker=".", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel(f"FD ({args.model}, probes)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "ttq.png", dpi=100)
    print(json.dumps({k: v for k, v in record.items() if k != "curve"}, indent=2))


if __name__ == "__main__":
    main()
