"""The comparison's outputs: metrics.json, report.md and one self-contained report.html.

The HTML embeds every image (base64 PNG), needs no network and no script, and is laid out plainly:
the metrics table with the best model value per column marked, then per-model samples,
reconstructions and latent interpolations, training curves, costs, and the qualitative
comparison of the families filled from what was measured.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from genbench.files import atomic_write_bytes, write_json  # noqa: E402

from .compute import compute_figure, compute_table  # noqa: E402

# (key, header, direction: +1 higher is better, -1 lower is better, 0 not ranked, format)
COLUMNS = [
    ("fd", "FD ↓", -1, "{:.2f}"),
    ("kid", "KID ↓", -1, "{:.4f}"),
    ("precision", "Precision ↑", +1, "{:.3f}"),
    ("recall", "Recall ↑", +1, "{:.3f}"),
    ("density", "Density", 0, "{:.3f}"),
    ("coverage", "Coverage ↑", +1, "{:.3f}"),
    ("class_entropy", "Class entropy ↑", +1, "{:.3f}"),
    ("memorization_ratio", "NN-dist ratio", 0, "{:.2f}"),
    ("recon_fd", "rFD ↓", -1, "{:.2f}"),
    ("mse", "MSE ↓", -1, "{:.5f}"),
    ("psnr", "PSNR ↑", +1, "{:.2f}"),
    ("ssim", "SSIM ↑", +1, "{:.3f}"),
    ("bits_per_dim", "bits/dim ↓", -1, "{:.3f}"),
    ("parameters", "Params", 0, "{:,}"),
    ("train_wall_time_s", "Train s ↓", -1, "{:.0f}"),
    ("sample_ms_per_image", "Sample ms/img ↓", -1, "{:.2f}"),
]


def _fmt(value, fmt: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan"
    return fmt.format(value)


def best_per_column(rows: list[dict]) -> dict[str, set[int]]:
    """Indices of the best *model* rows per ranked column (ties all marked)."""
    best = {}
    for key, _, direction, _ in COLUMNS:
        if direction == 0:
            continue
        vals = [(i, r.get(key)) for i, r in enumerate(rows) if r["kind"] == "model"
                and isinstance(r.get(key), (int, float)) and math.isfinite(r.get(key))]
        if not vals:
            continue
        target = max(v for _, v in vals) if direction > 0 else min(v for _, v in vals)
        best[key] = {i for i, v in vals if v == target}
    return best


def _png_b64(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
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


def sampler_table(rows: list[dict]) -> list[tuple[str, str, int, float, float]]:
    """(model, sampler (spacing), network calls, FD, ms per sample), by model then calls."""
    out = []
    for r in rows:
        if r["kind"] == "model":
            for p in sorted(r.get("fd_by_sampler") or [], key=lambda p: (p["network_calls"], p["sampler"])):
                how = p["sampler"] + (f" ({p['spacing']})" if p.get("spacing") else "")
                out.append((r["name"], how, p["network_calls"], p["fd"], p["sample_ms_per_image"]))
    return out


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


def qualitative_rows(rows: list[dict]) -> list[dict]:
    """The families side by side, every cell taken from the run or its evaluation."""
    out = []
    for r in rows:
        if r["kind"] != "model":
            continue
        calls = r.get("network_calls_per_sample") or {}
        stab = r.get("stability") or {}
        stab_txt = "; ".join(f"{s}: median step-to-step change {v['median_abs_rel_change']:.1%}, "
                             f"largest jump {v['max_rel_jump']:+.0%}" for s, v in stab.items()) or "n/a"
        out.append({
            "model": r["name"],
            "latent": (r.get("family") or {}).get("latent", "n/a"),
            "likelihood": r.get("bpd_estimator") or "not defined",
            "network calls per sample call": ", ".join(f"{k} ×{v}" for k, v in calls.items()) or "n/a",
            "training stability (measured)": stab_txt,
        })
    return out


def _public(result: dict) -> dict:
    """metrics.json: everything but the embedded images."""
    rows = [{k: v for k, v in r.items() if k != "images_png"} for r in result["rows"]]
    return {**result, "rows": rows}


def markdown_table(rows: list[dict]) -> str:
    best = best_per_column(rows)
    head = "| model | " + " | ".join(h for _, h, _, _ in COLUMNS) + " |"
    sep = "|---" * (len(COLUMNS) + 1) + "|"
    lines = [head, sep]
    for i, r in enumerate(rows):
        cells = []
        for key, _, _, fmt in COLUMNS:
            txt = _fmt(r.get(key), fmt)
            cells.append(f"**{txt}**" if i in best.get(key, ()) else txt)
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(result: dict) -> str:
    ds = result["dataset"]["name"]
    lines = [
        f"# genbench comparison on {ds} ({result['preset']} preset)",
        "",
        f"{result['num_samples']} samples per model against the {ds} test set; features from genbench's own "
        f"classifier (test accuracy {result['feature_network']['test_accuracy']:.3f}). Best model value per "
        "column in bold. Reference rows use the same protocol.",
        "",
        markdown_table(result["rows"]),
        "",
        "bits/dim estimators:",
        "",
    ]
    for r in result["rows"]:
        if r["kind"] == "model":
            lines.append(f"- {r['name']}: {r.get('bpd_estimator')}")
    sweep = sampler_table(result["rows"])
    if sweep:
        lines += ["", "Diffusion models, FD against network calls per sample:", "",
                  "| model | sampler | network calls | FD | ms / sample |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {how} | {calls} | {fd:.2f} | {ms:.2f} |" for name, how, calls, fd, ms in sweep]
    lines += ["", f"Wall time of the whole comparison: {result['wall_time_s']:.0f} s. {budget_note(result)}".rstrip(), ""]
    return "\n".join(lines)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1400px;
color:#222;line-height:1.4;padding:0 1em}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}
tr.reference td{color:#777;font-style:italic}
td.best{font-weight:bold;background:#e5f3e5}
.models{display:flex;flex-wrap:wrap;gap:1.5em}
.model{border:1px solid #ddd;padding:.8em;border-radius:6px}
.model img{image-rendering:pixelated;max-width:300px;display:block;margin:.3em 0}
img{max-width:100%;height:auto}
.note{color:#555;font-size:13px}
"""


def budget_note(result: dict) -> str:
    """One sentence on an equal-compute comparison (`--budget`), empty otherwise."""
    b = result.get("budget")
    if not b:
        return ""
    scales = ", ".join(f"{m} {p['scale']:.3g}x" for m, p in b["models"].items())
    return (f"Equal compute: every model trained {b['flops']:.3g} FLOPs, its preset's steps (and warm-up and "
            f"schedule) scaled by one factor per model ({scales}); the compute table gives what each achieved.")


def render_html(result: dict) -> str:
    rows = result["rows"]
    best = best_per_column(rows)
    esc = html.escape
    ds = result["dataset"]["name"]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>genbench comparison: {esc(ds)}</title><style>{CSS}</style></head><body>",
        f"<h1>genbench comparison on {esc(ds)} <small>({esc(result['preset'])} preset)</small></h1>",
        f"<p class='note'>{result['num_samples']} samples per model, scored against the {esc(ds)} test set in the "
        f"feature space of genbench's own classifier (test accuracy {result['feature_network']['test_accuracy']:.3f}; "
        "no ImageNet weights exist offline). Reconstruction and likelihood on "
        f"{result['eval_test_images']} test images. Best model value per column highlighted; grey rows are "
        "references computed the same way. Whole comparison: "
        f"{result['wall_time_s']:.0f} s. {html.escape(budget_note(result))}</p>",
        "<h2>Metrics</h2><table id='metrics'><thead><tr><th>model</th>",
    ]
    parts += [f"<th>{esc(h)}</th>" for _, h, _, _ in COLUMNS]
    parts.append("</tr></thead><tbody>")
    for i, r in enumerate(rows):
        cls = "reference" if r["kind"] == "reference" else "model"
        parts.append(f"<tr class='{cls}' data-model='{esc(r['name'])}'><td>{esc(r['name'])}</td>")
        for key, _, _, fmt in COLUMNS:
            mark = " class='best'" if i in best.get(key, ()) else ""
            parts.append(f"<td{mark}>{esc(_fmt(r.get(key), fmt))}</td>")
        parts.append("</tr>")
    parts.append("</tbody></table>")
    parts.append("<p class='note'>FD: Fréchet distance; KID: kernel distance (unbiased MMD², cubic kernel); "
                 "precision/recall/density/coverage: k-NN manifolds (k=5); class entropy: normalised entropy of the "
                 "classifier's predicted classes (1 = all classes equally, 0 = mode collapse); NN-dist ratio: median "
                 "distance of samples to their nearest training image over the same for test images (≈1 generalises, "
                 "→0 copies). bits/dim: " + "; ".join(f"{esc(r['name'])}: {esc(str(r.get('bpd_estimator')))}"
                                                      for r in rows if r["kind"] == "model") + ".</p>")

    parts.append("<h2>Samples, reconstructions, interpolations</h2><div class='models'>")
    for r in rows:
        if r["kind"] != "model":
            continue
        parts.append(f"<div class='model'><h3>{esc(r['name'])}</h3>")
        for key, title in [("samples", "samples"), ("reconstructions", "test images (odd) and reconstructions (even)"),
                           ("interpolations", "latent interpolations between test images")]:
            data = (r.get("images_png") or {}).get(key)
            if data:
                parts.append(f"<div class='note'>{esc(title)}</div><img alt='{esc(r['name'])} {key}' "
                             f"src='{_png_b64(data)}'>")
        parts.append("</div>")
    parts.append("</div>")

    fig = compute_figure(rows)
    if fig is not None:
        parts.append("<h2>Quality against training compute</h2><p class='note'>FD of a few samples at intervals of "
                     "each model's last stage (fewer samples and, for diffusion, a 10-call sampler: biased upward), "
                     "against the training FLOPs (counted, the same on any machine) and process CPU seconds spent "
                     "so far, all stages included; the large dot ends each line at the table's FD.</p>")
        parts.append(f"<img alt='FD against training compute' src='{_png_b64(_figure_png(fig))}'>")
        parts.append("<table id='compute'><thead><tr><th>model</th><th>training TFLOP</th><th>CPU s</th>"
                     "<th>wall s</th><th>FD ↓</th></tr></thead><tbody>")
        for name, tflop, cpu, wall, fd in compute_table(rows):
            parts.append(f"<tr><td>{esc(name)}</td><td>{_fmt(tflop, '{:.3g}')}</td><td>{_fmt(cpu, '{:.0f}')}</td>"
                         f"<td>{_fmt(wall, '{:.0f}')}</td><td>{_fmt(fd, '{:.2f}')}</td></tr>")
        parts.append("</tbody></table>")
    sweep = sampler_png(rows)
    if sweep:
        parts.append("<h2>Diffusion: quality against network calls</h2><p class='note'>The same samples count and "
                     "seed as the table; the first point of each model is the sampler of the table's row.</p>")
        parts.append(f"<img alt='FD against network calls per sample' src='{_png_b64(sweep)}'>")
        parts.append("<table id='samplers'><thead><tr><th>model</th><th>sampler</th><th>network calls</th>"
                     "<th>FD ↓</th><th>ms / sample</th></tr></thead><tbody>")
        for name, how, calls, fd, ms in sampler_table(rows):
            parts.append(f"<tr><td>{esc(name)}</td><td>{esc(how)}</td><td>{calls}</td><td>{_fmt(fd, '{:.2f}')}</td>"
                         f"<td>{_fmt(ms, '{:.2f}')}</td></tr>")
        parts.append("</tbody></table>")
    curves = curves_png(rows)
    if curves:
        parts.append(f"<h2>Training curves</h2><img alt='training curves' src='{_png_b64(curves)}'>")
    cost = cost_png(rows)
    if cost:
        parts.append(f"<h2>Cost</h2><img alt='cost' src='{_png_b64(cost)}'>")
        parts.append("<table id='cost'><thead><tr><th>model</th><th>params</th><th>train wall s</th>"
                     "<th>train images/s</th><th>peak memory MB</th><th>sample ms/image</th><th>device</th></tr></thead><tbody>")
        for r in rows:
            if r["kind"] != "model":
                continue
            ips = ", ".join(f"{s}: {v:.0f}" for s, v in (r.get("train_images_per_s") or {}).items() if v)
            parts.append(f"<tr><td>{esc(r['name'])}</td><td>{_fmt(r.get('parameters'), '{:,}')}</td>"
                         f"<td>{_fmt(r.get('train_wall_time_s'), '{:.0f}')}</td><td>{esc(ips)}</td>"
                         f"<td>{_fmt(r.get('peak_memory_mb'), '{:.0f}')}</td>"
                         f"<td>{_fmt(r.get('sample_ms_per_image'), '{:.2f}')}</td><td>{esc(str(r.get('device')))}</td></tr>")
        parts.append("</tbody></table>")

    qual = qualitative_rows(rows)
    if qual:
        keys = list(qual[0])
        parts.append("<h2>The families, as measured</h2><table id='families'><thead><tr>")
        parts += [f"<th>{esc(k)}</th>" for k in keys]
        parts.append("</tr></thead><tbody>")
        for q in qual:
            parts.append("<tr>" + "".join(f"<td style='text-align:left'>{esc(str(q[k]))}</td>" for k in keys) + "</tr>")
        parts.append("</tbody></table>")
    parts.append("</body></html>")
    return "".join(parts)


def write_reports(out: Path, result: dict) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "metrics.json", "md": out / "report.md", "html": out / "report.html"}
    write_json(paths["json"], _finite_or_null(json.loads(json.dumps(_public(result), default=_json_default))))
    atomic_write_bytes(paths["md"], render_markdown(result).encode())
    atomic_write_bytes(paths["html"], render_html(result).encode())
    return paths


def _finite_or_null(o):
    """NaN and infinities as null: json.dumps writes them as NaN / Infinity, which is not JSON (RFC 8259)
    and which strict readers (JavaScript's JSON.parse) refuse."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite_or_null(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_finite_or_null(v) for v in o]
    return o


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)
