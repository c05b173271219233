"""Metrics against independent references: closed forms, scipy.linalg.sqrtm, brute-force
loops written from the papers' formulas, and constructed point clouds with known answers."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from genbench.errors import GenbenchError
from genbench.evaluation.metrics import (
    class_histogram_stats,
    frechet_distance,
    frechet_distance_from_stats,
    gaussian_stats,
    kernel_distance,
    memorization,
    mse,
    nearest_neighbours,
    precision_recall_density_coverage,
    psnr,
    ssim,
    ssim_window_size,
)


def random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ---------------------------------------------------------------------------------------------
# Frechet distance


def test_gaussian_stats_match_numpy():
    x = np.random.default_rng(0).normal(size=(50, 4))
    mu, sigma = gaussian_stats(x)
    np.testing.assert_allclose(mu, x.mean(0))
    np.testing.assert_allclose(sigma, np.cov(x.T, ddof=1))


def test_fd_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(500, 32)) @ np.random.default_rng(1).normal(size=(32, 32))
    mu, sigma = gaussian_stats(x)
    assert frechet_distance(x, x) < 1e-6 * np.trace(sigma)
    assert frechet_distance(torch.from_numpy(x).float(), x.astype(np.float32)) < 1e-6 * np.trace(sigma)


def test_fd_of_a_mean_shift_is_the_squared_shift():
    # same sample shifted: covariances are identical, so FD = ||delta||^2 exactly
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8)) @ random_spd(rng, 8)
    delta = rng.normal(size=8)
    assert frechet_distance(x, x + delta) == pytest.approx(delta @ delta, rel=1e-8)
    # independent samples of N(0, S) and N(delta, S): FD -> ||delta||^2 as N grows
    s = random_spd(rng, 4)
    chol = np.linalg.cholesky(s)
    delta = np.array([1.0, -2.0, 0.5, 0.0])
    n = 50_000
    a = rng.normal(size=(n, 4)) @ chol.T
    b = rng.normal(size=(n, 4)) @ chol.T + delta
    # the sample means' error e ~ N(0, 2S/n) enters through 2 delta.e: allow 4 of its standard deviations
    tol = 4 * 2 * math.sqrt(2 * delta @ s @ delta / n)
    assert frechet_distance(a, b) == pytest.approx(delta @ delta, abs=tol)


def test_fd_from_stats_matches_closed_form_with_scipy_sqrtm():
    rng = np.random.default_rng(3)
    d = 6
    mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
    s_a, s_b = random_spd(rng, d), random_spd(rng, d)
    covmean = scipy.linalg.sqrtm(s_a @ s_b).real
    expected = (mu_a - mu_b) @ (mu_a - mu_b) + np.trace(s_a + s_b - 2 * covmean)
    assert frechet_distance_from_stats(mu_a, s_a, mu_b, s_b) == pytest.approx(expected, rel=1e-10)
    # 1-D: FD = (m1 - m2)^2 + (s1 - s2)^2 for standard deviations s1, s2
    assert frechet_distance_from_stats([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


def test_fd_handles_singular_covariances():
    # N < D: rank-deficient covariances, where sqrtm of the product goes complex/unstable
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(10, 64)), rng.normal(size=(10, 64))
    fd = frechet_distance(a, b)
    assert np.isfinite(fd) and fd > 0
    assert frechet_distance(a, a) < 1e-6 * np.trace(gaussian_stats(a)[1])


def test_fd_rejects_bad_input():
    x = np.zeros((10, 4))
    with pytest.raises(GenbenchError, match="feats_a has 4 feature dims but feats_b has 5"):
        frechet_distance(x, np.zeros((10, 5)))
    with pytest.raises(GenbenchError, match=r"feats_b: expected a 2-D \(N, D\) feature array"):
        frechet_distance(x, np.zeros((10, 2, 2)))
    with pytest.raises(GenbenchError, match="feats_a: needs at least 2 samples, got 1"):
        frechet_distance(np.zeros((1, 4)), x)
    with pytest.raises(GenbenchError, match="feats_a: contains NaN"):
        frechet_distance(np.full((10, 4), np.nan), x)
    with pytest.raises(GenbenchError, match=r"sigma_b: expected shape \(2, 2\)"):
        frechet_distance_from_stats(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3))


# ---------------------------------------------------------------------------------------------
# Kernel distance


def brute_force_mmd2_unbiased(x, y):
    d = x.shape[1]
    k = lambda u, v: (u @ v / d + 1.0) ** 3  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_with_whole_sets_matches_brute_force():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 3)), rng.normal(0.5, 1.0, size=(20, 3))
    mean, std = kernel_distance(x, y, num_subsets=1, subset_size=1000)  # subset capped at 20: whole sets
    assert mean == pytest.approx(brute_force_mmd2_unbiased(x, y), rel=1e-10)
    assert std == 0.0


def test_kid_is_unbiased_for_one_distribution_and_positive_for_a_shift():
    rng = np.random.default_rng(0)
    reps = 40
    same = np.array(
        [kernel_distance(rng.normal(size=(200, 8)), rng.normal(size=(200, 8)), 5, 100, seed=r)[0] for r in range(reps)]
    )
    # independent replicates: their mean is within 3 standard errors of 0 ...
    assert abs(same.mean()) < 3 * same.std(ddof=1) / math.sqrt(reps)
    # ... and individual estimates fall on both sides of 0 (a biased V-statistic never goes below 0)
    assert (same < 0).any() and (same > 0).any()
    mean, std = kernel_distance(rng.normal(size=(500, 8)), rng.normal(0.5, 1.0, size=(500, 8)), 20, 200, seed=1)
    assert mean > 10 * same.std(ddof=1) and mean > 3 * std


def test_kid_is_seeded_and_rejects_bad_input():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(100, 4)), rng.normal(size=(100, 4))
    assert kernel_distance(x, y, 10, 50, seed=7) == kernel_distance(x, y, 10, 50, seed=np.random.default_rng(7))
    with pytest.raises(GenbenchError, match="feats_a has 4 feature dims but feats_b has 3"):
        kernel_distance(x, y[:, :3])
    with pytest.raises(GenbenchError, match="num_subsets must be an integer >= 1"):
        kernel_distance(x, y, num_subsets=0)
    with pytest.raises(GenbenchError, match="subset_size must be an integer >= 2"):
        kernel_distance(x, y, subset_size=1)
    with pytest.raises(GenbenchError, match="feats_b: expected a 2-D"):
        kernel_distance(x, y[0])


# ---------------------------------------------------------------------------------------------
# precision / recall / density / coverage


def test_nearest_neighbours_match_brute_force():
    rng = np.random.default_rng(0)
    q, r = rng.normal(size=(30, 5)), rng.normal(size=(40, 5))
    dist, idx = nearest_neighbours(q, r, k=3)
    full = np.sqrt(((q[:, None] - r[None]) ** 2).sum(-1))
    np.testing.assert_array_equal(idx, np.argsort(full, axis=1)[:, :3])
    np.testing.assert_allclose(dist, np.sort(full, axis=1)[:, :3], atol=1e-10)


def test_prdc_identical_sets():
    x = np.random.default_rng(0).normal(size=(200, 4))
    out = precision_recall_density_coverage(x, x, k=5)
    assert out["precision"] == out["recall"] == out["coverage"] == 1.0
    # each point lies in its own ball plus, on average, about k others' -> density ~ 1
    assert 0.8 < out["density"] < 1.5


def test_prdc_disjoint_clouds():
    rng = np.random.default_rng(0)
    out = precision_recall_density_coverage(rng.normal(size=(100, 3)), rng.normal(100.0, 1.0, size=(100, 3)))
    assert out == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_prdc_fake_covering_half_the_modes():
    # real: 10 tight 2-D modes far apart; fake: the first 5 modes only, or all 10
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 2)) * 100.0
    real = (centres[:, None] + rng.normal(size=(10, 100, 2))).reshape(-1, 2)
    half = (centres[:5, None] + rng.normal(size=(5, 200, 2))).reshape(-1, 2)
    full = (centres[:, None] + rng.normal(size=(10, 100, 2))).reshape(-1, 2)
    out = precision_recall_density_coverage(real, half, k=5)
    assert out["precision"] > 0.95  # every fake is on the real manifold
    assert out["recall"] == pytest.approx(0.5, abs=0.03)
    assert out["coverage"] == pytest.approx(0.5, abs=0.03)
    # fakes crowd their modes as densely as real points do: density near 1 (Naeem et al.: E = 1 for equal laws)
    assert out["density"] == pytest.approx(1.0, abs=0.1)
    out = precision_recall_density_coverage(real, full, k=5)
    assert out["precision"] > 0.95 and out["recall"] > 0.95 and out["coverage"] > 0.95


def test_prdc_matches_brute_force_definitions_and_blocking(monkeypatch):
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(60, 3)), rng.normal(0.3, 1.2, size=(70, 3))
    k = 3
    d_rr = np.sqrt(((real[:, None] - real[None]) ** 2).sum(-1))
    d_ff = np.sqrt(((fake[:, None] - fake[None]) ** 2).sum(-1))
    d_rf = np.sqrt(((real[:, None] - fake[None]) ** 2).sum(-1))
    r_real, r_fake = np.sort(d_rr, 1)[:, k], np.sort(d_ff, 1)[:, k]
    inside = d_rf < r_real[:, None]
    expected = {
        "precision": inside.any(0).mean(),
        "recall": (d_rf < r_fake[None]).any(1).mean(),
        "density": inside.sum(0).mean() / k,
        "coverage": inside.any(1).mean(),
    }
    import genbench.evaluation.metrics as metrics

    monkeypatch.setattr(metrics, "MAX_BLOCK_ELEMENTS", 100)  # forces many small row blocks
    out = precision_recall_density_coverage(real, fake, k=k)
    assert out == pytest.approx(expected, abs=1e-12)


def test_prdc_rejects_bad_input():
    x = np.zeros((10, 3))
    with pytest.raises(GenbenchError, match="real has 3 feature dims but fake has 4"):
        precision_recall_density_coverage(x, np.zeros((10, 4)))
    with pytest.raises(GenbenchError, match="fake: needs more than k=5 samples for k-NN radii, got 5"):
        precision_recall_density_coverage(x, np.zeros((5, 3)), k=5)
    with pytest.raises(GenbenchError, match="k must be an integer >= 1"):
        precision_recall_density_coverage(x, x, k=0)
    with pytest.raises(GenbenchError, match="real: expected"):
        precision_recall_density_coverage(np.zeros(10), x)


# ---------------------------------------------------------------------------------------------
# class histogram


def test_class_histogram_uniform_vs_collapsed():
    uniform = class_histogram_stats(np.arange(1000) % 10, 10)
    assert uniform["histogram"] == [100] * 10
    assert uniform["entropy_nats"] == pytest.approx(math.log(10))
    assert uniform["entropy_bits"] == pytest.approx(math.log2(10))
    assert uniform["normalized_entropy"] == pytest.approx(1.0)
    assert uniform["max_entropy_bits"] == pytest.approx(math.log2(10))
    assert uniform["class_coverage"] == 1.0

    collapsed = class_histogram_stats(torch.full((500,), 3), 10)
    assert collapsed["entropy_nats"] == 0.0 and collapsed["normalized_entropy"] == 0.0
    assert collapsed["class_coverage"] == pytest.approx(0.1)
    assert collapsed["histogram"][3] == 500


def test_class_histogram_two_classes_and_coverage_threshold():
    # p = (0.5, 0.495, 0.005, 0, ...): entropy from the formula; class 2 (0.5% < 1%) is not covered
    labels = np.array([0] * 100 + [1] * 99 + [2] * 1)
    out = class_histogram_stats(labels, 10)
    p = np.array([100, 99, 1]) / 200
    assert out["entropy_nats"] == pytest.approx(-(p * np.log(p)).sum())
    assert out["class_coverage"] == pytest.approx(0.2)
    assert class_histogram_stats(labels, 10, coverage_ratio=0.01)["class_coverage"] == pytest.approx(0.3)


def test_class_histogram_rejects_bad_input():
    with pytest.raises(GenbenchError, match=r"pred_labels: values must lie in \[0, 10\), found range \[0, 10\]"):
        class_histogram_stats(np.array([0, 10]), 10)
    with pytest.raises(GenbenchError, match="pred_labels: expected integer class indices"):
        class_histogram_stats(np.array([0.0, 1.0]), 10)
    with pytest.raises(GenbenchError, match="pred_labels: expected a 1-D"):
        class_histogram_stats(np.zeros((2, 2), dtype=int), 10)
    with pytest.raises(GenbenchError, match="pred_labels: is empty"):
        class_histogram_stats(np.array([], dtype=int), 10)


# ---------------------------------------------------------------------------------------------
# memorization


def test_memorization_flags_copies_of_training_images():
    rng = np.random.default_rng(0)
    train = rng.random((300, 1, 8, 8))
    test = rng.random((100, 1, 8, 8))
    copies = memorization(train[:100], train, test)
    assert copies["ratio"] < 1e-6 and copies["fraction_closer"] == 1.0
    fresh = memorization(rng.random((100, 1, 8, 8)), train, test)  # same distribution as train/test
    assert 0.8 < fresh["ratio"] < 1.25
    assert fresh["fraction_closer"] < 0.1
    assert fresh["expected_fraction"] == 0.01
    # brute-force median of nearest-train distances
    d = np.sqrt(((test.reshape(100, 1, -1) - train.reshape(1, 300, -1)) ** 2).sum(-1)).min(1)
    assert fresh["median_test_nn"] == pytest.approx(np.median(d), rel=1e-10)
    assert fresh["threshold"] == pytest.approx(np.percentile(d, 1.0), rel=1e-10)


def test_memorization_over_chunks_of_the_train_set_equals_the_whole():
    rng = np.random.default_rng(1)
    train, test, samples = rng.random((300, 1, 8, 8)), rng.random((50, 1, 8, 8)), rng.random((40, 1, 8, 8))
    whole = memorization(samples, train, test)
    chunked = memorization(samples, (train[i: i + 70] for i in range(0, 300, 70)), test)  # 4 x 70 + 20
    assert chunked == pytest.approx(whole, rel=1e-12)
    with pytest.raises(GenbenchError, match="train: holds no images"):
        memorization(samples, [], test)


def test_memorization_rejects_bad_input():
    x = np.zeros((10, 1, 8, 8))
    with pytest.raises(GenbenchError, match="samples has 49 dims per item but train has 64"):
        memorization(np.zeros((10, 1, 7, 7)), x, x)
    with pytest.raises(GenbenchError, match="percentile must be a number in"):
        memorization(x, x, x, percentile=0)
    with pytest.raises(GenbenchError, match="test: expected"):
        memorization(x, x, np.zeros(3))


# ---------------------------------------------------------------------------------------------
# reconstruction


def numpy_ssim(x, y, size, sigma=1.5, k1=0.01, k2=0.03, L=1.0):
    """Wang et al. (2004) eq. 13 with a Gaussian-weighted window, one window position at a time."""
    i = np.arange(size) - (size - 1) / 2
    g = np.exp(-(i**2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (k1 * L) ** 2, (k2 * L) ** 2
    per_image = []
    for xi, yi in zip(x, y):
        vals = []
        for xc, yc in zip(xi, yi):
            for r in range(xc.shape[0] - size + 1):
                for c in range(xc.shape[1] - size + 1):
                    a, b = xc[r : r + size, c : c + size], yc[r : r + size, c : c + size]
                    mx, my = (w * a).sum(), (w * b).sum()
                    vx, vy = (w * (a - mx) ** 2).sum(), (w * (b - my) ** 2).sum()
                    cxy = (w * (a - mx) * (b - my)).sum()
                    vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
        per_image.append(np.mean(vals))
    return np.mean(per_image)


@pytest.mark.parametrize("shape, window", [((3, 1, 8, 8), 7), ((2, 2, 16, 13), 11), ((2, 1, 12, 12), 11)])
def test_ssim_matches_numpy_reference(shape, window):
    rng = np.random.default_rng(0)
    x = rng.random(shape)
    y = np.clip(x + rng.normal(0, 0.1, size=shape), 0, 1)
    assert ssim_window_size(*shape[2:]) == window
    assert ssim(x, y) == pytest.approx(numpy_ssim(x, y, window), rel=1e-10)


def test_ssim_properties():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((4, 1, 28, 28)))
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    y = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).clamp(0, 1)
    assert ssim(x, y) == pytest.approx(ssim(y, x), abs=1e-12)
    noisy = [ssim(x, (x + s * torch.randn_like(x)).clamp(0, 1)) for s in (0.02, 0.1, 0.3)]
    assert 1.0 > noisy[0] > noisy[1] > noisy[2]


def test_mse_and_psnr():
    x = torch.zeros(2, 1, 4, 4)
    y = torch.cat([torch.full((1, 1, 4, 4), 0.1), torch.full((1, 1, 4, 4), 0.01)])
    assert mse(x, y) == pytest.approx((0.01 + 0.0001) / 2, rel=1e-6)
    # per-image PSNR then mean: (20 dB + 40 dB) / 2, not the PSNR of the mean MSE
    assert psnr(x, y) == pytest.approx(30.0, rel=1e-6)
    assert psnr(x, x) == pytest.approx(100.0)


def test_reconstruction_metrics_reject_bad_input():
    x = np.zeros((2, 1, 8, 8))
    for fn in (mse, psnr, ssim):
        with pytest.raises(GenbenchError, match=r"x has shape \(2, 1, 8, 8\) but y has shape \(2, 1, 8, 7\)"):
            fn(x, np.zeros((2, 1, 8, 7)))
        with pytest.raises(GenbenchError, match=r"y: expected a 4-D \(N, C, H, W\) image batch"):
            fn(x, np.zeros((2, 8, 8)))
