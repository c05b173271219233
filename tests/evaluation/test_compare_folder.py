"""Your own images end to end: `genbench compare` on a labelled and on an unlabelled folder of tiny
generated colour images gives every metric column, in the features that suit each (the classifier
for class folders, the self-supervised network without labels)."""

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

import genbench.evaluation.contrastive as contrastive
import genbench.evaluation.features as features
from genbench.cli import main

SAMPLE_METRICS = ("fd", "kid", "precision", "recall", "density", "coverage", "class_entropy", "class_coverage",
                  "memorization_ratio")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220)}


def shape_png(path, colour, seed):
    """A 16x16 image: a filled ellipse of `colour` at a random place on a light background."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (16, 16), (235, 235, 235))
    x, y, r = *rng.integers(3, 13, 2), rng.integers(2, 5)
    ImageDraw.Draw(image).ellipse((x - r, y - r, x + r, y + r), fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


@pytest.fixture
def tiny_feature_nets(monkeypatch, tmp_path):
    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(features.TRAIN_PRESETS, "folder", features.FeatureTrainConfig(steps=20, batch_size=16))
    monkeypatch.setitem(contrastive.TRAIN_PRESETS, "folder", contrastive.ContrastiveTrainConfig(steps=20, batch_size=16))


def compare(folder, out, *extra):
    return main(["compare", "--dataset", "folder", "--data-dir", str(folder), "--image-size", "16", "--models", "ae,vae",
                 "--set", "ae:arch=mlp", "--set", "ae:train.steps=10", "--set", "vae:arch=mlp",
                 "--set", "vae:train.steps=10", "--num-samples", "40", "--jobs", "1", "--sampler-sweep", "",
                 "--fd-points", "2", "--no-progress", "--out", str(out), *extra])


@pytest.mark.parametrize("labelled", [True, False], ids=["class-folders", "unlabelled"])
def test_compare_on_a_folder_gives_every_metric(tmp_path, tiny_feature_nets, labelled, capsys):
    folder = tmp_path / "images"
    for i in range(60):
        name = list(COLOURS)[i % 3]
        shape_png(folder / (f"{name}/{i:03d}.png" if labelled else f"{i:03d}.png"), COLOURS[name], seed=i)
    assert compare(folder, tmp_path / "out") == 0
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    kind = "classifier" if labelled else "contrastive"
    assert result["feature_network"]["kind"] == kind
    for row in result["rows"]:
        missing = [k for k in SAMPLE_METRICS if row.get(k) is None or not np.isfinite(row[k])]
        assert not missing, (row["name"], missing)
    for row in (r for r in result["rows"] if r["kind"] == "model"):
        assert row["mse"] is not None and row["recon_fd"] is not None
        assert (row["bits_per_dim"] is not None) == (row["name"] == "vae")  # the AE has no likelihood
        probes = [p for p in json.loads("[" + ",".join((tmp_path / "out" / row["name"] / "log.jsonl").read_text()
                                                       .split("\n")[:-1]) + "]") if "fd" in p]
        assert probes and all(p["fd_features"] == kind for p in probes)
    html = (tmp_path / "out" / "report.html").read_text()
    assert ("self-supervised (SimCLR)" in html) == (not labelled)
    assert ("k-means modes" in html) == (not labelled)


def test_compare_refuses_the_classifier_without_labels_before_any_work(tmp_path, tiny_feature_nets, capsys):
    folder = tmp_path / "images"
    for i in range(12):
        shape_png(folder / f"{i:03d}.png", COLOURS["red"], seed=i)
    assert compare(folder, tmp_path / "out", "--features", "classifier") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no labels: the classifier feature network needs labelled" in err[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert compare(folder, tmp_path / "out", "--features", "inception") == 2
    assert "unknown feature network 'inception'" in capsys.readouterr().err
