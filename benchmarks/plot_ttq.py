"""Several time-to-quality curves on one plot (outputs of bench_time_to_quality.py).

    python benchmarks/plot_ttq.py docs/ttq/baseline/*.json --out docs/ttq/baseline.png \
        [--table]   # also print the Markdown table of the final points
    python benchmarks/plot_ttq.py docs/ttq/baseline/*.json docs/ttq/recipes/*.json --by-model \
        --out docs/ttq/recipes.png

FD of the probes (500 samples, log axis) against training CPU seconds and training FLOPs, one line
per curve, labelled by model; the final full-protocol FD as a hollow marker at the run's end. With
--by-model: one panel per model (FD against training FLOPs: this machine's speed drifted by up to 40 %
between runs hours apart, docs/benchmarks.md, so CPU seconds of runs not taken side by side do not
compare), a line per run, labelled by its `--set` items ("preset" for none).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("curves", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--by-model", action="store_true")
    args = ap.parse_args()
    records = [json.loads(p.read_text()) for p in args.curves]
    if args.by_model:
        plot_by_model(records, args.out)
        return
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


def run_label(record: dict) -> str:
    short = [item.replace("train.stages.", "").replace("train.", "").replace("model.", "") for item in record["sets"]]
    return ", ".join(short) or "preset"


def plot_by_model(records: list[dict], out: Path) -> None:
    models = list(dict.fromkeys(r["model"] for r in records))
    cols = min(3, len(models))
    rows = -(-len(models) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 4.6 * rows), squeeze=False, constrained_layout=True)
    for ax, model in zip(axes.flat, models):
        for i, r in enumerate(x for x in records if x["model"] == model):
            colour = f"C{i}"
            flops = [f / 1e12 for f in r["curve"]["train_flops"]]
            ax.plot(flops, r["curve"]["fd"], marker=".", color=colour, label=run_label(r))
            ax.plot([r["final"]["train_flops"] / 1e12], [r["final"]["fd"]], marker="o", mfc="none", color=colour)
        ax.set(xscale="log", yscale="log", title=model, xlabel="training TFLOPs")
        lo, hi = ax.get_xlim()
        narrow = hi / lo < 10  # no decade tick inside: label the minor ticks instead
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}") if narrow else NullFormatter())
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        for which in ("major", "minor"):  # log FD axes span less than a decade: label the minor ticks too
            getattr(ax.yaxis, f"set_{which}_formatter")(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2))  # below: never over a curve
    for ax in list(axes.flat)[len(models):]:
        ax.set_visible(False)
    axes[0][0].set_ylabel("FD (probes: 500 samples; o: final)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    main()
