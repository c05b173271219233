"""The report's figures, drawn with matplotlib and returned as PNG bytes (None when there is nothing
to draw): training curves, FD against network calls, costs, and the pictures of how each family
works (the VAE's latent space, a VQ codebook's usage, a diffusion trajectory).

Every figure is sized to fit a laptop page (at most 1100 px wide at 100 dpi; the page is 1248 px wide
in a 1280 px window).
"""

from __future__ import annotations

import io
import math

import matplotlib
import numpy as np

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

DPI = 100


def _figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


CURVES_PER_ROW = 3  # 3 x 3.2 inches at 100 dpi: under a laptop page's width


def curves_png(rows: list[dict]) -> bytes | None:
    models = [r for r in rows if r["kind"] == "model" and r.get("curves")]
    if not models:
        return None
    n = len(models)
    cols = min(n, CURVES_PER_ROW)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for i, (ax, r) in enumerate(zip(axes.flat, models)):
        for stage, c in r["curves"].items():
            ax.plot(c["step"], c["loss"], label=stage)
        ax.set_title(r["name"])
        ax.set_xlabel("step")
        losses = [v for c in r["curves"].values() for v in c["loss"]]
        if losses and min(losses) > 0:
            ax.set_yscale("log")
        if len(r["curves"]) > 1:
            ax.legend(fontsize=7)
        if i % cols == 0:
            ax.set_ylabel("training loss")
    fig.tight_layout()
    return _figure_png(fig)


SAMPLER_MARKERS = {"ddim": "o", "dpm++2m": "s", "heun": "^", "ddpm": "x"}


def sampler_png(rows: list[dict]) -> bytes | None:
    """FD against network calls per sample, one line per (diffusion model, sampler), log axes."""
    models = [r for r in rows if r["kind"] == "model" and r.get("fd_by_sampler")]
    if not models:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for color, r in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], models):
        by_name: dict[str, list[dict]] = {}
        for p in r["fd_by_sampler"]:
            by_name.setdefault(p["sampler"], []).append(p)
        for name, points in by_name.items():
            points = sorted(points, key=lambda p: p["network_calls"])
            ax.plot([p["network_calls"] for p in points], [p["fd"] for p in points], marker=SAMPLER_MARKERS.get(name, "."),
                    color=color, label=f"{r['name']} {name}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    calls = sorted({p["network_calls"] for r in models for p in r["fd_by_sampler"]})
    ax.set_xticks(calls, [str(c) for c in calls])  # plain numbers: the calls measured
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("network calls per sample")
    ax.set_ylabel("FD ↓")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return _figure_png(fig)


def cost_png(rows: list[dict]) -> bytes | None:
    models = [r for r in rows if r["kind"] == "model"]
    if not models:
        return None
    names = [r["name"] for r in models]
    fig, axes = plt.subplots(1, 3, figsize=(11, 2.8))
    for ax, key, title in zip(axes, ["train_wall_time_s", "sample_ms_per_image", "parameters"],
                              ["training wall time (s)", "sampling (ms / image)", "parameters"]):
        vals = [r.get(key) or 0 for r in models]
        ax.bar(names, vals, color="#4a7ab5")
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        if max(vals) > 0 and max(vals) / max(min(v for v in vals if v > 0) if any(vals) else 1, 1e-12) > 100:
            ax.set_yscale("log")
    fig.tight_layout()
    return _figure_png(fig)


# ---------------------------------------------------------------------------------------------
# how each family works


def latent_space_png(summary: dict, labels: np.ndarray | None, title: str = "") -> bytes:
    """The posterior means of test images on their first two principal axes, coloured by class, and
    the variance of each unit's mean over the inputs against the active-unit threshold (posterior
    collapse shows as units below it). `summary`: genbench.evaluation.latents.posterior_summary."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(8.6, 3.4), gridspec_kw={"width_ratios": [1.1, 1]})
    xy = np.asarray(summary["pca"])
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=6, alpha=0.7)
    else:
        cmap = plt.get_cmap("tab10")
        for c in np.unique(labels):
            sel = labels == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.7, color=cmap(int(c) % 10), label=str(int(c)))
        ax.legend(fontsize=6, markerscale=2, ncol=2, loc="best", title="class", title_fontsize=7)
    ev = summary["pca_explained"]
    ax.set_xlabel(f"PC 1 ({ev[0]:.0%} of the variance)", fontsize=8)
    ax.set_ylabel(f"PC 2 ({ev[1]:.0%})", fontsize=8)
    ax.set_title(f"{title} posterior means of test images, PCA".strip(), fontsize=9)
    ax.tick_params(labelsize=7)
    var = np.sort(np.asarray(summary["unit_variances"], dtype=float))[::-1]
    thr = summary["active_threshold"]
    bx.bar(np.arange(1, len(var) + 1), np.maximum(var, 1e-12), color=np.where(var > thr, "#4a7ab5", "#c0c0c0"),
           width=0.9)
    bx.axhline(thr, color="#c44", lw=1, ls="--", label=f"active threshold {thr:g}")
    bx.set_yscale("log")
    bx.set_xlabel("latent unit (sorted)", fontsize=8)
    bx.set_ylabel("Var over x of E_q[z_u | x]", fontsize=8)
    bx.set_title(f"active units: {summary['active_units']} of {summary['latent_dims']}", fontsize=9)
    bx.legend(fontsize=7)
    bx.tick_params(labelsize=7)
    fig.tight_layout()
    return _figure_png(fig)


def codebook_png(usage: dict, title: str = "") -> bytes:
    """Code frequencies over the test set (sorted, most used first), and the batch perplexity and
    unused codes over training. `usage`: genbench.evaluation.latents.codebook_usage."""
    k = usage["codebook_size"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(8.6, 3.0))
    counts = np.sort(np.asarray(usage["counts"], dtype=float))[::-1]
    freq = counts / max(counts.sum(), 1)
    ax.bar(np.arange(1, k + 1), freq, width=1.0, color="#4a7ab5")
    ax.set_xlim(0.5, k + 0.5)
    ax.set_xlabel(f"code, by frequency ({usage['codes_used']} of {k} used)", fontsize=8)
    ax.set_ylabel("share of test-set codes", fontsize=8)
    ax.set_title(f"{title} test set: perplexity {usage['perplexity']:.1f} of {k}".strip(), fontsize=9)
    ax.tick_params(labelsize=7)
    tr = usage["training"]
    if tr["step"]:
        bx.plot(tr["step"], tr["perplexity"], color="#4a7ab5", label="batch perplexity")
        bx.set_ylabel("batch perplexity", fontsize=8, color="#4a7ab5")
        bx.set_ylim(0, k * 1.05)
        cx = bx.twinx()
        cx.plot(tr["step"], tr["unused_codes"], color="#c44", ls="--", label="unused codes")
        cx.set_ylabel("codes unused in the dead-code window", fontsize=8, color="#c44")
        cx.set_ylim(0, k * 1.05)
        cx.tick_params(labelsize=7)
    else:
        bx.text(0.5, 0.5, "no quantizer records in the log", ha="center", va="center", transform=bx.transAxes)
    bx.set_xlabel("training step", fontsize=8)
    bx.set_title("codebook over training", fontsize=9)
    bx.tick_params(labelsize=7)
    fig.tight_layout()
    return _figure_png(fig)


def latent_tiles(z: np.ndarray, limit: float = 3.0) -> np.ndarray:
    """A latent (C, h, w) or (D,) as one greyscale image in [0, 1]: its channels as tiles in a
    near-square grid (ceil(sqrt(C)) tiles a row), one line of 0.5 between them, values mapped linearly
    from [-limit, limit] (the unit-variance latents of latent diffusion stay mostly inside +-3)."""
    z = np.asarray(z, dtype=float)
    if z.ndim == 1:
        z = z[None, None, :]
    tiles = np.clip((z + limit) / (2 * limit), 0, 1)
    c, h, w = tiles.shape
    cols = math.ceil(math.sqrt(c))
    rows = math.ceil(c / cols)
    out = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1), 0.5)
    for i in range(c):
        r, q = divmod(i, cols)
        out[r * (h + 1): r * (h + 1) + h, q * (w + 1): q * (w + 1) + w] = tiles[i]
    return out


def trajectory_png(t: list[int], rows: list[tuple[str, list[np.ndarray]]], cell: float = 0.62) -> bytes:
    """A grid of pictures: one column per timestep t (labelled on top), one row per (label, pictures),
    each picture (H, W) or (H, W, 3) in [0, 1], drawn without smoothing."""
    n_rows, n_cols = len(rows), len(t)
    widest = max(p.shape[1] / p.shape[0] for _, pics in rows for p in pics)
    fig, axes = plt.subplots(n_rows, n_cols, squeeze=False,
                             figsize=(1.3 + cell * n_cols * max(1.0, widest), 0.35 + cell * n_rows))
    for r, (label, pics) in enumerate(rows):
        for c, p in enumerate(pics):
            ax = axes[r, c]
            ax.imshow(p, cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="equal")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"t={t[c]}", fontsize=7)
        axes[r, 0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.subplots_adjust(left=1.2 / fig.get_figwidth(), right=0.99, top=1 - 0.3 / fig.get_figheight(), bottom=0.02,
                        wspace=0.08, hspace=0.08)
    return _figure_png(fig)
