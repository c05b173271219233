"""Several time-to-quality curves on one plot (outputs of bench_time_to_quality.py).

    python benchmarks/plot_ttq.py docs/ttq/baseline/*.json --out docs/ttq/baseline.png \
        [--table]   # also print the Markdown table of the final points

FD of the probes (500 samples, log axis) against training CPU seconds and training FLOPs, one line
per curve, labelled by model; the final full-protocol FD as a hollow marker at the run's end.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("curves", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    records = [json.loads(p.read_text()) for p in args.curves]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, axis, final_key, label in ((axes[0], "train_cpu_s", "train_cpu_s", "training CPU s (process time)"),
                                       (axes[1], "train_flops", "train_flops", "training FLOPs")):
        for i, r in enumerate(records):
            colour = f"C{i}"
            ax.plot(r["curve"][axis], r["curve"]["fd"], marker=".", color=colour, label=r["model"])
            ax.plot([r["final"][final_key]], [r["final"]["fd"]], marker="o", mfc="none", color=colour)
        ax.set(xscale="log", yscale="log", xlabel=label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("FD (probes: 500 samples; o: final, full protocol)")
    axes[1].legend(fontsize=8)
    name = {r["dataset"] for r in records}
    fig.suptitle(f"{', '.join(sorted(name))}: FD against training compute", fontsize=10)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    if args.table:
        print("| model | final FD | rFD | MSE | bits/dim | training CPU s | training TFLOPs | last probe FD |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        for r in records:
            f = r["final"]
            print(f"| {r['model']} | {f['fd']:.2f} | {fmt(f.get('recon_fd'), '.3f')} | {fmt(f.get('mse'), '.5f')} | "
                  f"{fmt(f.get('bits_per_dim'), '.3f')} | {f['train_cpu_s']:.0f} | {f['train_flops'] / 1e12:.1f} | "
                  f"{r['curve']['fd'][-1]:.2f} |")


if __name__ == "__main__":
    main()
