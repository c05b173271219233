"""The report's central picture: sample quality against training compute, one line per model.

Each line is a model's FD probes during training (genbench.evaluation.probe: fewer samples and a fast
sampler, hence biased upward), against the training FLOPs (left) and the process CPU seconds
(right) spent up to each probe; the filled marker at its end is the model's full-protocol FD (the
table's) at its total training compute. FLOPs are the machine-independent axis (counted, not timed,
genbench.training.flops); CPU seconds are what a user on this machine pays.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402


def has_quality_curve(row: dict) -> bool:
    return row["kind"] == "model" and bool((row.get("quality_curve") or {}).get("fd"))


def compute_figure(rows: list[dict]):
    """FD against training FLOPs and CPU seconds, log axes (a matplotlib Figure; the report renders
    it); None when no model has FD probes."""
    models = [r for r in rows if has_quality_curve(r)]
    if not models:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key, final_key, label in ((axes[0], "train_flops", "train_flops", "training FLOPs"),
                                      (axes[1], "train_cpu_s", "train_cpu_time_s", "training CPU seconds")):
        for color, r in zip(colors, models):
            c = r["quality_curve"]
            ax.plot(c[key], c["fd"], marker=".", color=color, label=r["name"])
            end = r.get(final_key)
            if isinstance(end, (int, float)) and end > 0 and isinstance(r.get("fd"), (int, float)):
                ax.plot([end], [r["fd"]], marker="o", markersize=7, color=color, linestyle="none")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_xlabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("FD ↓")
    axes[1].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def compute_table(rows: list[dict]) -> list[tuple[str, float | None, float | None, float | None, float | None]]:
    """(model, training TFLOPs, CPU s, wall s, final FD) per model, for the table under the chart."""
    out = []
    for r in rows:
        if r["kind"] == "model":
            flops = r.get("train_flops")
            out.append((r["name"], flops / 1e12 if isinstance(flops, (int, float)) else None,
                        r.get("train_cpu_time_s"), r.get("train_wall_time_s"), r.get("fd")))
    return out
