"""The report's figures (evaluation/figures.py): each returns PNG bytes that decode, at a size that fits
a laptop page; the latent tiles map values and lay out channels as documented (checked pixel by pixel)."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from genbench.evaluation.figures import (codebook_png, cost_png, curves_png, latent_space_png, latent_tiles,
                                         sampler_png, trajectory_png)
from genbench.evaluation.latents import pca_2d

PAGE = 1000  # px: every figure fits beside the page margins of a 1280 px laptop window


def _size(png: bytes) -> tuple[int, int]:
    img = Image.open(io.BytesIO(png))
    img.load()  # decodes the whole image, not only the header
    return img.size


def test_training_curves_of_six_models_fit_a_laptop_page():
    rows = [{"name": f"m{i}", "kind": "model", "curves": {"main": {"step": [1, 2, 3], "loss": [3.0, 2.0, 1.0]}}}
            for i in range(6)]
    width, height = _size(curves_png(rows))
    assert width <= PAGE and height > 400  # wrapped into rows, each panel still full size


def test_sampler_and_cost_figures_decode_and_fit():
    rows = [{"name": "ddpm", "kind": "model", "train_wall_time_s": 90.0, "sample_ms_per_image": 7.0, "parameters": 7e5,
             "fd_by_sampler": [{"sampler": "ddim", "network_calls": c, "fd": 10.0 / c} for c in (5, 10, 20)]},
            {"name": "vae", "kind": "model", "train_wall_time_s": 8.0, "sample_ms_per_image": 0.002, "parameters": 2e5}]
    for png in (sampler_png(rows), cost_png(rows)):
        w, h = _size(png)
        assert 300 < w <= PAGE + 100 and 150 < h < 600
    assert sampler_png(rows[1:]) is None and curves_png(rows) is None and cost_png([]) is None


def test_latent_space_figure(digits):
    means = torch.randn(300, 16)
    summary = {"pca": pca_2d(means)[0], "pca_explained": [0.2, 0.1], "unit_variances": [1.0] * 12 + [1e-4] * 4,
               "active_units": 12, "latent_dims": 16, "active_threshold": 0.01}
    for labels in (digits.test_labels[:300].numpy(), None):
        w, h = _size(latent_space_png(summary, labels))
        assert 600 < w <= PAGE and 250 < h < 450


def test_codebook_figure_with_and_without_training_records():
    usage = {"codebook_size": 64, "counts": list(range(64)), "perplexity": 50.2, "codes_used": 63, "usage": 63 / 64,
             "training": {"step": [50, 100, 150], "perplexity": [3.0, 40.0, 50.0], "unused_codes": [60, 2, 0]}}
    for training in (usage["training"], {"step": [], "perplexity": [], "unused_codes": []}):
        w, h = _size(codebook_png({**usage, "training": training}))
        assert 600 < w <= PAGE and 200 < h < 400


def test_latent_tiles_map_values_and_lay_channels_out_in_a_square():
    z = np.stack([np.full((2, 3), v) for v in (-3.0, 0.0, 3.0, 6.0, -1.5)])  # 5 channels of 2x3
    img = latent_tiles(z)
    assert img.shape == (2 * 2 + 1, 3 * 3 + 2)  # 3 tiles a row (ceil sqrt 5), 2 rows, 1-px grey lines
    assert img[0, 0] == 0.0 and img[0, 4] == 0.5 and img[0, 8] == 1.0  # -3 black, 0 grey, +3 white
    assert img[3, 0] == 1.0 and img[3, 4] == 0.25  # 6 clipped to white; -1.5 a quarter
    assert (img[2, :] == 0.5).all() and (img[:, 3] == 0.5).all()  # the lines between tiles
    assert (img[3:, 8:] == 0.5).all()  # the empty sixth slot
    assert latent_tiles(np.zeros(16)).shape == (1, 16)  # a vector: one row


@pytest.mark.parametrize("rows,latent", [(4, False), (8, True)])
def test_trajectory_figure(rows, latent):
    pics = [np.random.rand(8, 8) for _ in range(8)]
    tiles = [latent_tiles(np.random.randn(4, 4, 4)) for _ in range(8)]
    grid = [(f"row {i}", tiles if latent and i % 4 < 2 else pics) for i in range(rows)]
    w, h = _size(trajectory_png(list(range(700, -1, -100)), grid))
    assert 450 < w <= PAGE and 50 * rows < h < 80 * rows + 60  # about 62 px a picture
    rgb = [(f"row {i}", [np.random.rand(8, 8, 3)] * 8) for i in range(2)]
    assert _size(trajectory_png(list(range(8)), rgb))[0] <= PAGE
