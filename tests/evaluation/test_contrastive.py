"""The self-supervised feature network: NT-Xent against a brute-force transcription of eq. 1, the
views, the trained digits network (retrieval, standardisation, modes, cache) and its FD ladder."""

import json
import math

import numpy as np
import pytest
import torch

import genbench.evaluation.contrastive as contrastive
import genbench.evaluation.features as features
from genbench.data import ImageDataset, load_dataset
from genbench.evaluation.contrastive import ContrastiveTrainConfig, nt_xent_loss, random_views
from genbench.evaluation.features import dataset_hash, get_feature_network
from genbench.evaluation.ladder import (
    add_noise,
    degradation_ladder,
    gaussian_blur,
    is_increasing,
    keep_modes,
)


def nt_xent_by_the_paper(z1, z2, tau):
    """Chen et al. 2020, eq. 1, one anchor at a time, summed over all 2N anchors and divided by 2N."""
    z = torch.cat([z1, z2]).double()
    n2 = len(z)
    sim = [[float(z[i] @ z[k] / (z[i].norm() * z[k].norm())) for k in range(n2)] for i in range(n2)]
    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        denom = sum(math.exp(sim[i][k] / tau) for k in range(n2) if k != i)
        total += -math.log(math.exp(sim[i][j] / tau) / denom)
    return total / n2


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_nt_xent_matches_the_papers_equation(tau):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    assert float(nt_xent_loss(z1, z2, tau)) == pytest.approx(nt_xent_by_the_paper(z1, z2, tau), rel=1e-5)


def test_nt_xent_limits():
    eye = torch.eye(8)
    # each pair aligned and orthogonal to the others: the loss vanishes as tau -> 0
    assert float(nt_xent_loss(eye, eye, 0.01)) < 1e-6
    # all 2N embeddings identical: every other view is as likely, loss = log(2N - 1)
    same = torch.ones(8, 3)
    assert float(nt_xent_loss(same, same, 0.3)) == pytest.approx(math.log(15), rel=1e-6)


def test_random_views_are_seeded_whole_pixel_shifts_and_mirrors():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 3, 9, 7, generator=g)
    a = random_views(x, 2, torch.Generator().manual_seed(1))
    assert torch.equal(a, random_views(x, 2, torch.Generator().manual_seed(1))) and a.shape == x.shape
    assert not torch.equal(a, random_views(x, 2, torch.Generator().manual_seed(2)))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    seen = set()
    for i in range(len(x)):  # brute force: the one window (or its mirror) of the padded image it equals
        windows = [(dy, dx, padded[i, :, dy: dy + 9, dx: dx + 7]) for dy in range(5) for dx in range(5)]
        hits = [(dy, dx, m) for dy, dx, w in windows for m in (False, True)
                if torch.equal(a[i], w.flip(-1) if m else w)]
        assert hits, i
        seen.add(hits[0][2])
    assert seen == {False, True}  # both orientations occur


def test_gaussian_blur_keeps_the_mean_and_matches_a_direct_convolution():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g)
    out = gaussian_blur(x, 1.0)
    r = 3
    k1 = torch.exp(-0.5 * torch.arange(-r, r + 1.0) ** 2)
    k2 = torch.outer(k1, k1) / k1.sum() ** 2
    padded = torch.nn.functional.pad(x, (r, r, r, r), mode="reflect")
    direct = torch.nn.functional.conv2d(padded, k2.view(1, 1, 7, 7).repeat(3, 1, 1, 1), groups=3)
    torch.testing.assert_close(out, direct, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gaussian_blur(torch.full((1, 1, 8, 8), 0.7), 2.0), torch.full((1, 1, 8, 8), 0.7))
    noisy = add_noise(x, 0.1, seed=3)
    assert torch.equal(noisy, add_noise(x, 0.1, seed=3)) and noisy.min() >= 0 and noisy.max() <= 1


def test_keep_modes_keeps_the_most_frequent_modes_and_the_count():
    images = torch.arange(100.0).view(100, 1, 1, 1)
    modes = np.repeat(np.arange(10), [20, 15, 12, 10, 9, 9, 8, 7, 6, 4])
    kept = keep_modes(images, modes, 3)
    assert len(kept) == 100 and set(modes[kept.view(-1).long().numpy()]) == {0, 1, 2}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """The digits contrastive network (its real preset, ~10 CPU s), trained into a fresh cache."""
    cache = tmp_path_factory.mktemp("features")
    return get_feature_network(digits, cache_dir=cache, kind="contrastive"), cache


def test_the_trained_network_tells_images_apart_and_is_standardised(trained, digits):
    net, _ = trained
    assert net.kind == "contrastive" and net.score_name == "test view-retrieval accuracy"
    assert net.test_accuracy > 0.25  # 1/360 by chance; 0.40 measured
    f = net.features(digits.train).astype(np.float64)
    np.testing.assert_allclose(f.mean(0), 0.0, atol=1e-4)
    assert f.var(0, ddof=1).mean() == pytest.approx(1.0, rel=1e-4)
    modes = net.predict(digits.train)
    assert modes.dtype == np.int64 and net.num_classes == 10
    counts = np.bincount(modes, minlength=10)
    assert (counts > 0).all() and counts.max() < 0.5 * len(modes)  # ten real clusters, none swallowing all
    # the modes are k-means centres of the train features: each image is nearest to its own
    centroids = net.model.mode_centroids.double().numpy()
    assert np.array_equal(((f[:, None] - centroids[None]) ** 2).sum(-1).argmin(1), modes)


def test_contrastive_cache_is_its_own_entry_and_round_trips(trained, digits, monkeypatch):
    net, cache = trained
    assert net.directory == cache / f"digits-contrastive-{dataset_hash(digits)[:16]}"
    config = json.loads((net.directory / "config.json").read_text())
    assert config["kind"] == "contrastive" and config["test_accuracy"] == net.test_accuracy

    def no_training(*args, **kwargs):
        raise AssertionError("the cached network should have been loaded, not retrained")

    monkeypatch.setattr(features, "train_feature_network", no_training)
    loaded = get_feature_network(digits, cache_dir=cache, kind="contrastive")
    np.testing.assert_array_equal(loaded.features(digits.test), net.features(digits.test))
    np.testing.assert_array_equal(loaded.predict(digits.test), net.predict(digits.test))
    # an entry of the other kind in the same folder is refused, not loaded as this kind
    (cache / f"digits-{dataset_hash(digits)[:16]}").symlink_to(net.directory)
    monkeypatch.undo()
    monkeypatch.setitem(features.TRAIN_PRESETS, "digits", features.FeatureTrainConfig(steps=3, batch_size=16))
    with pytest.warns(UserWarning, match="records other net_config"):
        get_feature_network(digits, cache_dir=cache)


def test_training_is_deterministic(digits, tmp_path, monkeypatch):
    monkeypatch.setitem(contrastive.TRAIN_PRESETS, "digits", ContrastiveTrainConfig(steps=4, batch_size=16))
    a = features.train_feature_network(digits, kind="contrastive")
    b = features.train_feature_network(digits, kind="contrastive")
    np.testing.assert_array_equal(a.features(digits.test), b.features(digits.test))


def test_fd_ladder_rises_at_every_rung(trained, digits):
    """The issue's check: the test split near the floor, FD rising along blur, noise and fewer modes."""
    lad = degradation_ladder(trained[0], digits)
    assert lad["test"] < 2 * lad["floor"] and lad["ceiling"] > 20 * lad["floor"]
    for rung in ("blur", "noise", "modes"):
        assert is_increasing([lad["test"], *lad[rung]]), (rung, lad)
    assert lad["mode_source"] == "labels"


def test_unlabelled_data_get_the_contrastive_network_with_modes_from_pixels(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    ds = ImageDataset("folder", torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=g),
                      torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=g))
    monkeypatch.setitem(contrastive.TRAIN_PRESETS, "folder", ContrastiveTrainConfig(steps=3, batch_size=16))
    net = get_feature_network(ds, cache_dir=tmp_path)
    assert net.kind == "contrastive" and net.directory.name.startswith("folder-contrastive-")
    lad = degradation_ladder(net, ds, num_images=30)
    assert lad["mode_source"] == "k-means of pixels" and lad["num_images"] == 30


def test_features_train_command(tmp_path, monkeypatch, capsys):
    from genbench.cli import main

    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path))
    monkeypatch.setitem(contrastive.TRAIN_PRESETS, "digits", ContrastiveTrainConfig(steps=3, batch_size=16))
    assert main(["features", "train", "--dataset", "digits", "--kind", "contrastive"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("contrastive feature network for digits: test view-retrieval accuracy 0.")
    assert str(tmp_path / "features" / "digits-contrastive-") in out
    assert main(["features", "train", "--dataset", "digits", "--kind", "vgg"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown feature network 'vgg'" in err[0]
