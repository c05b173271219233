"""What the comparison's reports say (evaluation/report.py), on a synthetic result: every metrics-table
cell of report.html and report.md against values formatted here by hand, missing values as "n/a" and
NaN as "nan", the best-value marks per column direction (ties all marked, never a reference row, never
an unranked column), model names with HTML special characters escaped wherever they appear, and
metrics.json strict JSON.

References: the expected cells, best marks and directions below are written out by hand from the
metric definitions (FD, KID, MSE, bits/dim, costs: lower is better; precision, recall, coverage,
class entropy, PSNR, SSIM: higher is better; density, NN-distance ratio, parameters: not ranked), the
documents are read back with Python's own html.parser, and metrics.json with a JSON parser that
refuses NaN/Infinity (RFC 8259).
"""

import json
import math
from html.parser import HTMLParser

import numpy as np
import pytest

from genbench.evaluation.report import COLUMNS, best_per_column, render_html, render_markdown, write_reports
from genbench.images import png_bytes

NASTY = "<b>x&y</b> 'q\""  # tags, an ampersand and both quote characters
NAN = float("nan")

LOWER = {"fd", "kid", "recon_fd", "mse", "bits_per_dim", "train_wall_time_s", "sample_ms_per_image"}
HIGHER = {"precision", "recall", "coverage", "class_entropy", "psnr", "ssim"}
UNRANKED = {"density", "memorization_ratio", "parameters"}


def _png(value: int) -> bytes:
    return png_bytes(np.full((4, 4, 1), value, dtype=np.uint8))


def _curves(*losses):
    return {"main": {"step": list(range(1, len(losses) + 1)), "loss": list(losses)}}


ROWS = [
    # a reference better than every model in every column: it must never be marked best
    {"name": "train set (floor)", "kind": "reference", "fd": 0.5, "kid": 0.0001, "precision": 0.99, "recall": 0.99,
     "density": 1.0, "coverage": 0.99, "class_entropy": 0.999, "memorization_ratio": 1.0, "recon_fd": 0.01,
     "mse": 1e-6, "psnr": 60.0, "ssim": 0.999, "bits_per_dim": 0.1, "train_wall_time_s": 1.0,
     "sample_ms_per_image": 0.001},
    # the sample metrics only, as compare.py writes a reference row
    {"name": "uniform noise (ceiling)", "kind": "reference", "fd": 250.0, "kid": 1.5, "precision": 0.0, "recall": 0.0,
     "density": 0.0, "coverage": 0.0, "class_entropy": 0.2, "memorization_ratio": 3.5},
    # the first model row has the NaNs: a NaN that reached min/max first would win every comparison
    {"name": NASTY, "kind": "model", "fd": 3.0, "kid": 0.02, "precision": 0.7, "recall": NAN, "density": 1.5,
     "coverage": 0.3, "class_entropy": 0.95, "memorization_ratio": NAN, "mse": 0.001, "psnr": 31.0, "ssim": 0.8,
     "bits_per_dim": 1.5, "bpd_estimator": "IWAE bound (k=5) <= -log p & more", "parameters": 2000,
     "train_wall_time_s": 100.0, "sample_ms_per_image": 5.0, "train_images_per_s": {"main": 1500.0},
     "peak_memory_mb": 12.0, "device": "cpu<1>", "network_calls_per_sample": {"decoder": 1},
     "stability": {"main": {"median_abs_rel_change": 0.01, "max_rel_jump": 0.2, "finite": True}},
     "family": {"latent": "vector <z>"}, "latent_shape": "4×4 <codes>", "curves": _curves(3.0, 2.0, 1.0),
     "images_png": {"samples": _png(10), "interpolations": _png(20)}},
    {"name": "ae", "kind": "model", "fd": 12.3456, "kid": 0.012345, "precision": 0.5, "recall": 0.25, "density": 0.875,
     "coverage": 0.3, "class_entropy": 0.9, "memorization_ratio": 1.25, "recon_fd": 4.5, "mse": 0.00123456,
     "psnr": 29.1, "ssim": 0.81, "bits_per_dim": None, "bpd_estimator": "undefined: no density",
     "parameters": 1234567, "train_wall_time_s": 12.6, "sample_ms_per_image": 0.0123,
     "train_images_per_s": {"main": 9000.0}, "peak_memory_mb": None, "device": "cpu",
     "network_calls_per_sample": {"decoder": 1}, "stability": {}, "family": {"latent": "vector"},
     "curves": _curves(1.0, 0.5, 0.25), "images_png": {"samples": _png(30), "reconstructions": _png(40),
                                                        "interpolations": _png(50)}},
    {"name": "ddpm", "kind": "model", "fd": 3.0, "kid": 0.005, "precision": 0.6, "recall": 0.4, "density": 0.5,
     "coverage": 0.2, "class_entropy": 0.5, "memorization_ratio": 0.9, "mse": None, "psnr": None, "ssim": None,
     "recon_fd": None, "bits_per_dim": 1.2, "bpd_estimator": "variational bound", "parameters": 50000,
     "train_wall_time_s": 400, "sample_ms_per_image": 20.0, "network_calls_per_sample": {"unet": 50},
     "images_png": {"samples": _png(60)}},
]
NAMES = [r["name"] for r in ROWS]

# every cell of the metrics table, formatted by hand from the values above (columns in report order)
HEADERS = ["FD ↓", "KID ↓", "Precision ↑", "Recall ↑", "Density", "Coverage ↑", "Class entropy ↑", "NN-dist ratio",
           "rFD ↓", "MSE ↓", "PSNR ↑", "SSIM ↑", "bits/dim ↓", "Params", "Train s ↓", "Sample ms/img ↓"]
KEYS = ["fd", "kid", "precision", "recall", "density", "coverage", "class_entropy", "memorization_ratio", "recon_fd",
        "mse", "psnr", "ssim", "bits_per_dim", "parameters", "train_wall_time_s", "sample_ms_per_image"]
CELLS = {
    "train set (floor)": ["0.50", "0.0001", "0.990", "0.990", "1.000", "0.990", "0.999", "1.00", "0.01", "0.00000",
                          "60.00", "0.999", "0.100", "n/a", "1", "0.00"],
    "uniform noise (ceiling)": ["250.00", "1.5000", "0.000", "0.000", "0.000", "0.000", "0.200", "3.50",
                                "n/a", "n/a", "n/a", "n/a", "n/a", "n/a", "n/a", "n/a"],
    NASTY: ["3.00", "0.0200", "0.700", "nan", "1.500", "0.300", "0.950", "nan", "n/a", "0.00100", "31.00", "0.800",
            "1.500", "2,000", "100", "5.00"],
    "ae": ["12.35", "0.0123", "0.500", "0.250", "0.875", "0.300", "0.900", "1.25", "4.50", "0.00123", "29.10", "0.810",
           "n/a", "1,234,567", "13", "0.01"],
    "ddpm": ["3.00", "0.0050", "0.600", "0.400", "0.500", "0.200", "0.500", "0.90", "n/a", "n/a", "n/a", "n/a",
             "1.200", "50,000", "400", "20.00"],
}
# the best model value per ranked column, by hand (ties all marked; NaN and missing never win)
BEST = {
    "fd": {NASTY, "ddpm"}, "kid": {"ddpm"}, "precision": {NASTY}, "recall": {"ddpm"}, "coverage": {NASTY, "ae"},
    "class_entropy": {NASTY}, "recon_fd": {"ae"}, "mse": {NASTY}, "psnr": {NASTY}, "ssim": {"ae"},
    "bits_per_dim": {"ddpm"}, "train_wall_time_s": {"ae"}, "sample_ms_per_image": {"ae"},
}


@pytest.fixture(scope="module")
def result():
    return {
        "protocol_version": 1, "dataset": {"name": "digits & co"}, "preset": "quick", "num_samples": 300,
        "eval_test_images": 100, "seed": 0,
        "feature_network": {"test_accuracy": 0.9861, "data_hash": "abc", "feature_dim": 128},
        "rows": ROWS, "wall_time_s": 42.4,
    }


class Doc(HTMLParser):
    """Tags, tables (by id: rows of cells with their attributes and text), h3 texts, images and the text."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags, self.tables, self.h3, self.imgs, self.text = [], {}, [], [], []
        self._table = self._row = self._cell = None
        self._in_h3 = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "table":
            self._table = self.tables.setdefault(a.get("id"), [])
        elif tag == "tr":
            self._row = {"attrs": a, "cells": []}
            self._table.append(self._row)
        elif tag in ("td", "th"):
            self._cell = {"tag": tag, "attrs": a, "text": ""}
            self._row["cells"].append(self._cell)
        elif tag == "h3":
            self.h3.append("")
            self._in_h3 = True
        elif tag == "img":
            self.imgs.append(a)

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._cell = None
        elif tag == "h3":
            self._in_h3 = False

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell["text"] += data
        if self._in_h3:
            self.h3[-1] += data


@pytest.fixture(scope="module")
def doc(result):
    return Doc(render_html(result))


def _metrics_body(doc):
    head, *body = doc.tables["metrics"]
    return head, body


def _md_table(md: str) -> list[list[str]]:
    lines = [line for line in md.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]


# ---------------------------------------------------------------------------------------------


def test_directions_as_the_metrics_define_them():
    assert [key for key, *_ in COLUMNS] == KEYS
    direction = {key: d for key, _, d, _ in COLUMNS}
    assert {k for k, d in direction.items() if d < 0} == LOWER
    assert {k for k, d in direction.items() if d > 0} == HIGHER
    assert {k for k, d in direction.items() if d == 0} == UNRANKED
    for key, header, d, _ in COLUMNS:  # an arrow in a header says the same as the ranking
        assert not ("↓" in header and d != -1) and not ("↑" in header and d != +1), key


def test_html_cells_are_the_formatted_values(doc):
    head, body = _metrics_body(doc)
    assert [c["text"] for c in head["cells"]] == ["model", *HEADERS]
    assert [r["attrs"]["class"] for r in body] == ["reference", "reference", "model", "model", "model"]
    got = {r["cells"][0]["text"]: [c["text"] for c in r["cells"][1:]] for r in body}
    assert list(got) == NAMES
    for name in NAMES:
        assert got[name] == CELLS[name], name


def test_missing_values_show_na_and_nan_shows_nan(doc):
    _, body = _metrics_body(doc)
    cell = {(r["cells"][0]["text"], KEYS[j]): c["text"] for r in body for j, c in enumerate(r["cells"][1:])}
    assert cell[("ae", "bits_per_dim")] == "n/a"  # None: undefined, never 0
    assert cell[(NASTY, "recon_fd")] == "n/a"  # key absent
    assert all(cell[("uniform noise (ceiling)", k)] == "n/a" for k in KEYS[8:])  # a reference has no reconstructions
    assert cell[(NASTY, "recall")] == "nan" and cell[(NASTY, "memorization_ratio")] == "nan"


def test_html_best_marks_per_column_direction(doc):
    _, body = _metrics_body(doc)
    marked = {}
    for r in body:
        for key, c in zip(KEYS, r["cells"][1:]):
            if c["attrs"].get("class") == "best":
                marked.setdefault(key, set()).add(r["cells"][0]["text"])
        assert r["cells"][0]["attrs"].get("class") is None  # the name cell is never marked
    assert marked == BEST
    assert not set(marked) & UNRANKED
    assert all(r["attrs"]["class"] == "model" for r in body for c in r["cells"] if c["attrs"].get("class") == "best")


def test_best_per_column_indices():
    best = best_per_column(ROWS)
    assert {k: {NAMES[i] for i in v} for k, v in best.items()} == BEST
    # only references: nothing to mark; an all-NaN or all-missing column: nothing either
    assert best_per_column([r for r in ROWS if r["kind"] == "reference"]) == {}
    assert "recall" not in best_per_column([{"name": "m", "kind": "model", "recall": NAN}, {"name": "n", "kind": "model"}])


def test_names_with_html_characters_are_escaped_everywhere(doc, result):
    html = render_html(result)
    assert NASTY not in html and "<b>" not in html and "x&y" not in html
    assert "b" not in doc.tags  # no element was injected
    # each place the name appears, read back as the name itself
    _, body = _metrics_body(doc)
    row = next(r for r in body if r["attrs"]["class"] == "model")
    assert row["attrs"]["data-model"] == NASTY and row["cells"][0]["text"] == NASTY
    assert NASTY in doc.h3
    alts = {a["alt"] for a in doc.imgs}
    assert {f"{NASTY} samples", f"{NASTY} interpolations"} <= alts and f"{NASTY} reconstructions" not in alts
    assert {f"ae {k}" for k in ("samples", "reconstructions", "interpolations")} | {"ddpm samples"} <= alts
    assert [r["cells"][0]["text"] for r in doc.tables["cost"][1:]] == [NASTY, "ae", "ddpm"]
    assert [r["cells"][-1]["text"] for r in doc.tables["cost"][1:]] == ["cpu<1>", "cpu", "None"]
    fam = {r["cells"][0]["text"]: [c["text"] for c in r["cells"]] for r in doc.tables["families"][1:]}
    assert list(fam) == [NASTY, "ae", "ddpm"] and fam[NASTY][1:3] == ["4×4 <codes>", "vector <z>"]
    text = "".join(doc.text)
    assert f"{NASTY}: IWAE bound (k=5) <= -log p & more" in text
    assert "genbench comparison on digits & co" in text


def test_markdown_table_matches(result):
    md = render_markdown(result)
    head, sep, *body = _md_table(md)
    assert head == ["model", *HEADERS] and len(sep) == len(HEADERS) + 1
    assert [r[0] for r in body] == NAMES  # report.md writes names as they are (markdown, not HTML)
    marked = {}
    for r in body:
        assert len(r) == len(HEADERS) + 1
        cells = []
        for key, c in zip(KEYS, r[1:]):
            if c.startswith("**") and c.endswith("**"):
                marked.setdefault(key, set()).add(r[0])
                c = c[2:-2]
            cells.append(c)
        assert cells == CELLS[r[0]], r[0]
    assert marked == BEST
    assert f"- {NASTY}: IWAE bound (k=5) <= -log p & more" in md.splitlines()
    assert "- ae: undefined: no density" in md.splitlines()


def test_write_reports_outputs_and_strict_json(result, tmp_path):
    paths = write_reports(tmp_path / "out", result)
    assert paths["html"].read_text() == render_html(result)
    assert paths["md"].read_text() == render_markdown(result)

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    m = json.loads(paths["json"].read_text(), parse_constant=refuse)  # no NaN / Infinity tokens
    assert [r["name"] for r in m["rows"]] == NAMES
    assert all("images_png" not in r for r in m["rows"])
    rows = {r["name"]: r for r in m["rows"]}
    assert rows[NASTY]["recall"] is None and rows[NASTY]["memorization_ratio"] is None  # NaN -> null
    assert rows["ae"]["bits_per_dim"] is None and rows["ae"]["fd"] == 12.3456
    assert rows["ae"]["curves"] == _curves(1.0, 0.5, 0.25)
    assert math.isnan(result["rows"][2]["recall"])  # the result itself is left as it was


# ---------------------------------------------------------------------------------------------
# a synthetic comparison of all six families, drawn by the report's own figure code


def six_family_result() -> dict:
    """A result as run_comparison returns it for the six models, with every image the protocol draws
    (made by the same functions from random data) and numbers as wide as real ones. The Chromium test
    of test_compare_report opens it as a reader would."""
    import torch

    from genbench.evaluation.figures import codebook_png, latent_space_png, latent_tiles, trajectory_png
    from genbench.evaluation.latents import pca_2d
    from genbench.evaluation.protocol import GRID_SIDE
    from genbench.images import make_grid
    from genbench.models.base import available_models, get_model_class

    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)

    def grid(n):
        return png_bytes(make_grid(torch.rand(n, 1, 8, 8, generator=g), nrow=8, min_side=GRID_SIDE))

    rows = [dict(ROWS[0], name="train set (floor)"), dict(ROWS[1])]
    for i, name in enumerate(available_models()):
        cls = get_model_class(name)
        r = {**ROWS[3], "name": name, "parameters": 1_257_410 + i, "bits_per_dim": 3.5 + i if i % 2 else None,
             "curves": _curves(3.0, 2.0, 1.0), "latent_shape": "1×4×4 continuous",
             "family": {"latent": "a sentence about the latent " * 4}, "images_png": {"samples": grid(64)}}
        if cls.has_reconstruction:
            r["images_png"]["reconstructions"] = grid(64)
        if cls.has_latent_space:
            r["images_png"]["interpolations"] = grid(32)
        if cls.has_posterior:
            r["latent_space"] = {"pca": pca_2d(torch.randn(300, 16, generator=g))[0], "pca_explained": [0.3, 0.2],
                                 "unit_variances": list(rng.random(16)), "active_units": 16, "latent_dims": 16,
                                 "active_threshold": 0.01}
            r["images_png"]["latent_space"] = latent_space_png(r["latent_space"], rng.integers(0, 10, 300))
        if cls.has_codebook:
            r["codebook"] = {"codebook_size": 64, "counts": list(range(64)), "perplexity": 50.0, "codes_used": 63,
                             "usage": 63 / 64, "training": {"step": [1, 2], "perplexity": [3.0, 50.0],
                                                            "unused_codes": [40, 0]}}
            r["images_png"]["codebook"] = codebook_png(r["codebook"])
        if cls.has_sampler:
            t = list(range(999, -1, -142))
            pics = [rng.random((8, 8)) for _ in t]
            tiles = [latent_tiles(rng.standard_normal((4, 4, 4))) for _ in t]
            latent = cls.has_latent_space
            r["trajectory"] = {"t": t, "space": "latent" if latent else "pixels"}
            r["sampler"] = "DPM-Solver++(2M), 10 steps (logsnr)"
            r["fd_by_sampler"] = [{"sampler": "ddim", "spacing": "trailing", "network_calls": c, "fd": 9.0 / c,
                                   "sample_ms_per_image": c * 1.5} for c in (5, 10, 20)]
            r["images_png"]["trajectory"] = trajectory_png(t, [(f"row {k}", tiles if latent and k % 4 < 2 else pics)
                                                               for k in range(8 if latent else 4)])
        rows.append(r)
    return {"protocol_version": 1, "dataset": {"name": "digits"}, "preset": "quick", "num_samples": 1000,
            "eval_test_images": 360, "seed": 0,
            "feature_network": {"test_accuracy": 0.9861, "data_hash": "abc", "feature_dim": 128},
            "rows": rows, "wall_time_s": 242.0}


def test_every_family_row_is_filled_from_the_model_and_the_summary_leads():
    doc = Doc(render_html(six_family_result()))
    head, *body = doc.tables["families"]
    assert len(body) == 6
    assert all(c["text"] and c["text"] != "n/a" for r in body for c in r["cells"][:4]), [
        [c["text"] for c in r["cells"]] for r in body]
    text = "".join(doc.text)
    assert text.index("At a glance") < text.index("Metrics") < text.index("The models, one by one")
