"""The report's quality-against-compute chart and table (genbench.evaluation.compute)."""

import copy
import io
import re

import matplotlib.pyplot as plt
from PIL import Image

from genbench.evaluation.compute import compute_figure, compute_table, has_quality_curve
from genbench.evaluation.report import render_html, render_markdown
from tests.evaluation.test_report import ROWS

CURVE = {"global_step": [10, 20], "train_flops": [1e9, 2e9], "train_s": [1.0, 2.5], "train_cpu_s": [0.9, 2.0],
         "fd": [40.0, 20.0]}


def _result(rows, budget=None):
    out = {"dataset": {"name": "digits"}, "preset": "quick", "num_samples": 10, "eval_test_images": 5,
           "feature_network": {"test_accuracy": 0.9}, "rows": rows, "wall_time_s": 3.0}
    if budget:
        out["budget"] = budget
    return out


def _rows_with_curves():
    rows = copy.deepcopy(ROWS)
    for r in rows:
        if r["name"] == "ae":
            r.update(quality_curve=CURVE, train_flops=2.5e9, train_cpu_time_s=2.2)
        elif r["name"] == "ddpm":
            r.update(quality_curve={k: [] for k in CURVE}, train_flops=None)  # trained without probes
    return rows


def test_only_models_with_probes_get_a_line_and_the_table_lists_every_model():
    rows = _rows_with_curves()
    assert [r["name"] for r in rows if has_quality_curve(r)] == ["ae"]
    fig = compute_figure(rows)
    lines = [line for ax in fig.axes for line in ax.get_lines()]
    # per panel: the probe curve and the final-FD marker at the run's total compute
    assert sorted(tuple(line.get_xdata()) for line in lines) == sorted([(1e9, 2e9), (2.5e9,), (0.9, 2.0), (2.2,)])
    assert all(ax.get_xscale() == "log" and ax.get_yscale() == "log" for ax in fig.axes)
    plt.close(fig)
    table = {name: rest for name, *rest in compute_table(rows)}
    assert table["ae"] == [2.5e-3, 2.2, 12.6, 12.3456] and table["ddpm"][0] is None
    assert compute_figure(ROWS) is None  # no probes anywhere: no chart


def test_the_html_shows_the_chart_the_table_and_the_budget_note():
    rows = _rows_with_curves()
    page = render_html(_result(rows, budget={"flops": 2e12, "models": {"ae": {"scale": 1.5}, "ddpm": {"scale": 0.25}}}))
    assert "Quality against training compute" in page and "Equal compute: every model trained 2e+12 FLOPs" in page
    png = re.search(r"alt='FD against training compute' src='data:image/png;base64,([^']+)'", page).group(1)
    import base64
    width, height = Image.open(io.BytesIO(base64.b64decode(png))).size
    assert 600 < width <= 1400 and height > 200  # fits a laptop page
    table = page[page.index("<table id='compute'>"):]
    table = table[: table.index("</table>")]
    assert "<td>ae</td><td>0.0025</td><td>2</td><td>13</td><td>12.35</td>" in table
    assert "<td>ddpm</td><td>n/a</td>" in table
    assert "ae 1.5x" in render_markdown(_result(rows, budget={"flops": 2e12, "models": {"ae": {"scale": 1.5}}}))
    assert "Quality against training compute" not in render_html(_result(ROWS))
