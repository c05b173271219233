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

    python benchmarks/plot_ttq.py docs/ttq/new/*.json --by-model --before docs/ttq/baseline/*.json \
        --cpu-rates docs/ttq/step_cost.json --out docs/ttq/new.png

With --cpu-rates (an output of bench_step_cost.py, whose step costs were all timed side by side):
the x axis is training CPU seconds at those rates, each curve's point after global step n costing
the sum, over the steps before it, of its stage's CPU ms per step: the presets' current precision
and layout for the curves given, the earlier presets' ("before": bf16 in the diffusion stages only,
NCHW) for the --before curves. Training is deterministic (FD against steps does not depend on the
clock), so this puts runs taken on different days, under different host load, on one clock.
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
    ap.add_argument("--before", nargs="*", type=Path, default=[],
                    help="--by-model: curves of the earlier presets (labelled 'before', 'before' rates)")
    ap.add_argument("--cpu-rates", type=Path, default=None,
                    help="--by-model: x axis = CPU seconds at these step costs (bench_step_cost.py JSON)")
    args = ap.parse_args()
    records = [json.loads(p.read_text()) for p in args.curves]
    if args.by_model:
        before = [dict(json.loads(p.read_text()), before=True) for p in args.before]
        rates = json.loads(args.cpu_rates.read_text()) if args.cpu_rates else None
        plot_by_model(before + records, args.out, rates)
        return
    if args.before or args.cpu_rates:
        ap.error("--before and --cpu-rates go with --by-model")
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
    label = ", ".join(short) or "preset"
    return f"before: {label}" if record.get("before") else label


def cpu_at_rates(record: dict, rates: dict) -> list[float]:
    """CPU seconds after each curve point's global step, at the step costs of `rates` (a
    bench_step_cost.py output): the earlier presets' for a 'before' record, the current ones' else.
    The last stage's last phase runs on past its preset length (a recipe with more steps)."""
    model = rates["models"][record["model"]]
    phases = []
    for stage in model["stages"]:
        combo = stage["before"] if record.get("before") else stage["preset"]
        phases += [(p["steps"], p["ms_per_step"][combo] / 1000) for p in stage["phases"]]
    out = []
    for step in record["curve"]["global_step"]:
        seconds, left = 0.0, step
        for i, (count, cost) in enumerate(phases):
            take = left if i == len(phases) - 1 else min(left, count)
            seconds, left = seconds + take * cost, left - take
        out.append(seconds)
    return out


def plot_by_model(records: list[dict], out: Path, rates: dict | None = None) -> None:
    models = list(dict.fromkeys(r["model"] for r in records))
    cols = min(3, len(models))
    rows = -(-len(models) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 4.6 * rows), squeeze=False, constrained_layout=True)
    for ax, model in zip(axes.flat, models):
        for i, r in enumerate(x for x in records if x["model"] == model):
            colour = f"C{i}"
            x = cpu_at_rates(r, rates) if rates else [f / 1e12 for f in r["curve"]["train_flops"]]
            ax.plot(x, r["curve"]["fd"], marker=".", color=colour, label=run_label(r),
                    linestyle="--" if r.get("before") else "-")
            ax.plot([x[-1]], [r["final"]["fd"]], marker="o", mfc="none", color=colour)
        xlabel = "training CPU s (at the side-by-side step costs)" if rates else "training TFLOPs"
        ax.set(xscale="log", yscale="log", title=model, xlabel=xlabel)
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
