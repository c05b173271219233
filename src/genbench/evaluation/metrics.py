"""Evaluation metrics: pure functions of feature arrays and image tensors.

Sample quality (on features of a fixed network, see ``genbench.evaluation.features``):
- ``frechet_distance``: FD between Gaussians fitted to two feature sets (Heusel et al. 2017, FID).
- ``kernel_distance``: unbiased MMD^2 with a cubic polynomial kernel (Binkowski et al. 2018, KID).
- ``precision_recall_density_coverage``: k-NN manifold estimates (Kynkaenniemi et al. 2019;
  Naeem et al. 2020).
- ``class_histogram_stats``: how evenly a classifier spreads the samples over the classes.
- ``memorization``: are samples closer to training images than held-out test images are?

Reconstruction (images in [0, 1]): ``mse``, ``psnr``, ``ssim`` (Wang et al. 2004), each computed
per image and then averaged over the batch.

Inputs may be numpy arrays or torch tensors of any float/int dtype; everything is computed in
float64 on the CPU. Bad input (wrong ndim, mismatched dims, too few samples, NaN/inf) raises a
GenbenchError naming the argument and the problem.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from genbench.errors import GenbenchError

# Largest distance block (rows x cols, float64) held at once by the k-NN searches: 128 MiB.
MAX_BLOCK_ELEMENTS = 2**24

# ---------------------------------------------------------------------------------------------
# input checks


def _as_float64(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        x = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise GenbenchError(f"{name}: cannot convert {type(x).__name__} to a float array: {e}") from e
    if not np.isfinite(x).all():
        raise GenbenchError(f"{name}: contains NaN or inf values")
    return x


def _features(x, name: str, min_samples: int = 1) -> np.ndarray:
    """A (N, D) float64 feature array with N >= min_samples."""
    x = _as_float64(x, name)
    if x.ndim != 2:
        raise GenbenchError(f"{name}: expected a 2-D (N, D) feature array, got shape {x.shape}")
    if x.shape[0] < min_samples:
        raise GenbenchError(f"{name}: needs at least {min_samples} samples, got {x.shape[0]}")
    if x.shape[1] < 1:
        raise GenbenchError(f"{name}: has 0 feature dimensions")
    return x


def _feature_pair(a, b, names: tuple[str, str], min_samples: int = 1) -> tuple[np.ndarray, np.ndarray]:
    a, b = _features(a, names[0], min_samples), _features(b, names[1], min_samples)
    if a.shape[1] != b.shape[1]:
        raise GenbenchError(
            f"{names[0]} has {a.shape[1]} feature dims but {names[1]} has {b.shape[1]}"
        )
    return a, b


def _flat(x, name: str, min_samples: int = 1) -> np.ndarray:
    """(N, ...) images or features -> (N, D) float64: each sample flattened to one vector."""
    x = _as_float64(x, name)
    if x.ndim < 2:
        raise GenbenchError(f"{name}: expected (N, D) features or (N, C, H, W) images, got shape {x.shape}")
    return _features(x.reshape(len(x), -1), name, min_samples)


def _image_pair(x, y, names: tuple[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _as_float64(x, names[0]), _as_float64(y, names[1])
    for name, t in zip(names, (x, y)):
        if t.ndim != 4:
            raise GenbenchError(f"{name}: expected a 4-D (N, C, H, W) image batch, got shape {t.shape}")
        if t.shape[0] < 1:
            raise GenbenchError(f"{name}: holds no images")
    if x.shape != y.shape:
        raise GenbenchError(f"{names[0]} has shape {x.shape} but {names[1]} has shape {y.shape}")
    return torch.from_numpy(x), torch.from_numpy(y)


def _check_int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise GenbenchError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------------------------
# Frechet distance


def gaussian_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased sample covariance (D, D) (divisor N - 1) of (N, D) features."""
    x = _features(feats, "feats", min_samples=2)
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _sqrtm_psd(s: np.ndarray) -> np.ndarray:
    """Symmetric square root V diag(sqrt(max(w, 0))) V^T of a symmetric PSD matrix."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_stats(mu_a, sigma_a, mu_b, sigma_b) -> float:
    """Frechet (2-Wasserstein) distance between N(mu_a, sigma_a) and N(mu_b, sigma_b):

        FD = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})        (Heusel et al. 2017, eq. 6)

    The trace of the matrix square root is taken in the symmetric form: S_a S_b is similar to
    M = S_a^{1/2} S_b S_a^{1/2} (symmetric PSD), so Tr((S_a S_b)^{1/2}) = sum_i sqrt(lambda_i(M)),
    with eigenvalues from ``eigvalsh`` clipped at 0. Unlike ``scipy.linalg.sqrtm`` on the
    non-symmetric product this never produces complex parts for singular covariances (N < D).
    Round-off can push FD of identical inputs a hair below 0; the result is clipped at 0.
    """
    mu_a, mu_b = _as_float64(mu_a, "mu_a"), _as_float64(mu_b, "mu_b")
    sigma_a, sigma_b = _as_float64(sigma_a, "sigma_a"), _as_float64(sigma_b, "sigma_b")
    if mu_a.ndim != 1:
        raise GenbenchError(f"mu_a: expected a 1-D mean vector, got shape {mu_a.shape}")
    d = mu_a.shape[0]
    for name, t, shape in (("mu_b", mu_b, (d,)), ("sigma_a", sigma_a, (d, d)), ("sigma_b", sigma_b, (d, d))):
        if t.shape != shape:
            raise GenbenchError(f"{name}: expected shape {shape} to match mu_a's {d} dims, got {t.shape}")
    sqrt_a = _sqrtm_psd(sigma_a)
    m = sqrt_a @ sigma_b @ sqrt_a
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    diff = mu_a - mu_b
    fd = diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * tr_covmean
    return float(max(fd, 0.0))


def frechet_distance(feats_a, feats_b) -> float:
    """FD between Gaussians fitted (``gaussian_stats``) to two (N, D) feature sets; see
    ``frechet_distance_from_stats``. Each set needs at least 2 samples; FD is biased upward for
    small N (Chong & Forsyth 2020), so compare models only at equal sample counts."""
    a, b = _feature_pair(feats_a, feats_b, ("feats_a", "feats_b"), min_samples=2)
    return frechet_distance_from_stats(*gaussian_stats(a), *gaussian_stats(b))


# ---------------------------------------------------------------------------------------------
# Kernel distance


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x.y / d + 1)^3 for all pairs of rows (Binkowski et al. 2018, sec. 3)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 estimate (Gretton et al. 2012, eq. 3) for m samples x and n samples y:

        1/(m(m-1)) sum_{i != j} k(x_i, x_j) + 1/(n(n-1)) sum_{i != j} k(y_i, y_j) - 2/(mn) sum_{i,j} k(x_i, y_j)
    """
    m, n = len(x), len(y)
    k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    return float(
        (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
        + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
        - 2.0 * k_xy.mean()
    )


def kernel_distance(
    feats_a,
    feats_b,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int | np.random.Generator = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): unbiased MMD^2 with the cubic
    polynomial kernel k(x, y) = (x.y/d + 1)^3, averaged over ``num_subsets`` random subsets.

    Each subset draws min(subset_size, N_a, N_b) rows of each set without replacement
    (``seed``: an int or a numpy Generator). Returns (mean, std) of the per-subset estimates,
    std with divisor ``num_subsets`` (0 for one subset). Being unbiased, the estimate is
    centred on 0 for two samples of one distribution and can be slightly negative.
    """
    a, b = _feature_pair(feats_a, feats_b, ("feats_a", "feats_b"), min_samples=2)
    num_subsets = _check_int(num_subsets, "num_subsets", 1)
    m = min(_check_int(subset_size, "subset_size", 2), len(a), len(b))
    rng = np.random.default_rng(seed)
    estimates = np.array(
        [
            _mmd2_unbiased(a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)])
            for _ in range(num_subsets)
        ]
    )
    return float(estimates.mean()), float(estimates.std())


# ---------------------------------------------------------------------------------------------
# k-nearest-neighbour metrics


def _row_block(num_cols: int) -> int:
    return max(1, MAX_BLOCK_ELEMENTS // max(num_cols, 1))


def nearest_neighbours(queries, references, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distances (N_q, k) and indices (N_q, k) of each query's k nearest references,
    nearest first. Inputs are (N, D) features or (N, ...) images (flattened). Distances come
    from ``torch.cdist`` in float64, in row blocks of at most ``MAX_BLOCK_ELEMENTS`` entries.
    A point present in both sets is its own nearest neighbour at distance 0.
    """
    q = torch.from_numpy(_flat(queries, "queries"))
    r = torch.from_numpy(_flat(references, "references"))
    if q.shape[1] != r.shape[1]:
        raise GenbenchError(f"queries have {q.shape[1]} dims but references have {r.shape[1]}")
    k = _check_int(k, "k", 1)
    if k > len(r):
        raise GenbenchError(f"k={k} nearest neighbours requested but references hold only {len(r)} points")
    dists, idx = [], []
    step = _row_block(len(r))
    for start in range(0, len(q), step):
        top = torch.cdist(q[start : start + step], r).topk(k, dim=1, largest=False)
        dists.append(top.values)
        idx.append(top.indices)
    return torch.cat(dists).numpy(), torch.cat(idx).numpy()


def _knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from each point to its k-th nearest *other* point of the same set (the
    (k+1)-th nearest counting the point itself at distance 0)."""
    return nearest_neighbours(x, x, k + 1)[0][:, k]


def precision_recall_density_coverage(real, fake, k: int = 5) -> dict[str, float]:
    """Manifold estimates from k-NN balls, with B(x, r) the open ball and NND_k(x) the distance
    from x to its k-th nearest neighbour within its own set (Naeem et al. 2020, eqs. 1-4):

        precision = 1/M sum_j 1[exists i: Y_j in B(X_i, NND_k(X_i))]        (Kynkaenniemi et al. 2019)
        recall    = 1/N sum_i 1[exists j: X_i in B(Y_j, NND_k(Y_j))]
        density   = 1/(kM) sum_j sum_i 1[Y_j in B(X_i, NND_k(X_i))]
        coverage  = 1/N sum_i 1[exists j: Y_j in B(X_i, NND_k(X_i))]

    for N real points X_i and M fake points Y_j, (N, D) features (images are flattened).
    Precision/density: are fakes on the real manifold (density can exceed 1 where fakes crowd
    dense real regions)? Recall/coverage: is the real manifold covered? Both sets need more
    than k points. Distances are computed in blocks of real rows, so memory stays bounded.
    """
    real, fake = _flat(real, "real"), _flat(fake, "fake")
    if real.shape[1] != fake.shape[1]:
        raise GenbenchError(f"real has {real.shape[1]} feature dims but fake has {fake.shape[1]}")
    k = _check_int(k, "k", 1)
    for name, x in (("real", real), ("fake", fake)):
        if len(x) <= k:
            raise GenbenchError(f"{name}: needs more than k={k} samples for k-NN radii, got {len(x)}")
    real_radii = torch.from_numpy(_knn_radii(real, k))
    fake_radii = torch.from_numpy(_knn_radii(fake, k))
    real_t, fake_t = torch.from_numpy(real), torch.from_numpy(fake)

    in_real_ball_count = torch.zeros(len(fake), dtype=torch.float64)  # per fake: how many real balls hold it
    recalled = torch.zeros(len(real), dtype=torch.bool)  # per real: inside some fake ball
    covered = torch.zeros(len(real), dtype=torch.bool)  # per real: its ball holds some fake
    step = _row_block(len(fake))
    for start in range(0, len(real), step):
        stop = start + step
        d = torch.cdist(real_t[start:stop], fake_t)  # (block, M)
        inside = d < real_radii[start:stop, None]
        in_real_ball_count += inside.sum(0)
        covered[start:stop] = inside.any(1)
        recalled[start:stop] = (d < fake_radii[None, :]).any(1)
    return {
        "precision": float((in_real_ball_count > 0).double().mean()),
        "recall": float(recalled.double().mean()),
        "density": float(in_real_ball_count.mean() / k),
        "coverage": float(covered.double().mean()),
    }


# ---------------------------------------------------------------------------------------------
# class histogram


def class_histogram_stats(pred_labels, num_classes: int, coverage_ratio: float = 0.1) -> dict:
    """How a classifier's predicted labels for N samples spread over C classes.

    With p_c = count_c / N:
    - ``entropy_nats`` H = -sum_c p_c ln p_c (0 ln 0 = 0), ``entropy_bits`` = H / ln 2;
    - ``normalized_entropy`` = H / ln C in [0, 1]: 1 for a uniform histogram, 0 when every
      sample falls in one class (mode collapse); ``max_entropy_nats``/``_bits`` = ln C, log2 C;
    - ``class_coverage``: the fraction of classes whose share p_c is at least ``coverage_ratio``
      times the uniform share 1/C (default 0.1: with 10 classes, at least 1% of the samples).
      A class a model produces only by accident does not count as covered.
    """
    num_classes = _check_int(num_classes, "num_classes", 1)
    if not (isinstance(coverage_ratio, (int, float)) and 0.0 <= coverage_ratio <= 1.0):
        raise GenbenchError(f"coverage_ratio must be a number in [0, 1], got {coverage_ratio!r}")
    labels = pred_labels.detach().cpu().numpy() if isinstance(pred_labels, torch.Tensor) else np.asarray(pred_labels)
    if labels.ndim != 1:
        raise GenbenchError(f"pred_labels: expected a 1-D array of class indices, got shape {labels.shape}")
    if len(labels) == 0:
        raise GenbenchError("pred_labels: is empty")
    if not np.issubdtype(labels.dtype, np.integer):
        raise GenbenchError(f"pred_labels: expected integer class indices, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise GenbenchError(
            f"pred_labels: values must lie in [0, {num_classes}), found range [{labels.min()}, {labels.max()}]"
        )
    counts = np.bincount(labels, minlength=num_classes)
    p = counts / len(labels)
    nonzero = p[p > 0]
    entropy = float(-(nonzero * np.log(nonzero)).sum())
    max_entropy = math.log(num_classes)
    return {
        "histogram": counts.tolist(),
        "num_samples": int(len(labels)),
        "num_classes": num_classes,
        "entropy_nats": entropy,
        "entropy_bits": entropy / math.log(2),
        "normalized_entropy": entropy / max_entropy if num_classes > 1 else 1.0,
        "max_entropy_nats": max_entropy,
        "max_entropy_bits": max_entropy / math.log(2),
        "class_coverage": float((p >= coverage_ratio / num_classes).mean()),
    }


# ---------------------------------------------------------------------------------------------
# memorization


def memorization(samples, train, test, percentile: float = 1.0) -> dict[str, float]:
    """Do generated samples sit closer to the training set than unseen data does?

    For each sample s and each test image t, the Euclidean distance to the nearest training
    image, d(s) = min_x ||s - x|| and d(t) likewise. By default in pixel space: pass (N, C, H, W)
    images (flattened to C*H*W vectors); pass (N, D) features to work in a feature space instead.
    Returns
    - ``median_sample_nn``, ``median_test_nn`` and their ``ratio`` (about 1 for a model that
      generalises, -> 0 for one that copies training images; NaN if median_test_nn is 0);
    - ``threshold``: the ``percentile``-th percentile of the test distances d(t), and
      ``fraction_closer``: the fraction of samples with d(s) <= threshold. A model whose samples
      are as far from the train set as fresh data gives about ``expected_fraction`` =
      percentile/100; copies of training images (d = 0) all count.
    ``train``: the training images, or an iterable of consecutive chunks of them (each converted
    to float64 only when its turn comes: the running minimum over chunks is the minimum over all, so
    a large training set never has to be held as float64 at once).
    Cost: (N_samples + N_test) x N_train float64 distances, measured at about 8 CPU-seconds per
    1000 queries against Fashion-MNIST's 60k train images (so ~3 CPU-minutes for 10k + 10k).
    """
    if not (isinstance(percentile, (int, float)) and 0.0 < percentile < 100.0):
        raise GenbenchError(f"percentile must be a number in (0, 100), got {percentile!r}")
    samples, test = _flat(samples, "samples"), _flat(test, "test")
    queries = np.concatenate([samples, test]) if samples.shape[1] == test.shape[1] else None
    nearest, seen = np.full(len(samples) + len(test), np.inf), 0
    for chunk in ([train] if isinstance(train, (np.ndarray, torch.Tensor)) else train):
        chunk = _flat(chunk, "train")
        for name, x in (("samples", samples), ("test", test)):
            if x.shape[1] != chunk.shape[1]:
                raise GenbenchError(f"{name} has {x.shape[1]} dims per item but train has {chunk.shape[1]}")
        nearest = np.minimum(nearest, nearest_neighbours(queries, chunk)[0][:, 0])
        seen += len(chunk)
    if not seen:
        raise GenbenchError("train: holds no images")
    sample_nn, test_nn = nearest[: len(samples)], nearest[len(samples):]
    median_sample, median_test = float(np.median(sample_nn)), float(np.median(test_nn))
    threshold = float(np.percentile(test_nn, percentile))
    return {
        "median_sample_nn": median_sample,
        "median_test_nn": median_test,
        "ratio": median_sample / median_test if median_test > 0 else float("nan"),
        "threshold": threshold,
        "fraction_closer": float((sample_nn <= threshold).mean()),
        "expected_fraction": percentile / 100.0,
    }


# ---------------------------------------------------------------------------------------------
# reconstruction


def _mse_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x - y).pow(2).mean(dim=(1, 2, 3))


def mse(x, y) -> float:
    """Mean squared error over pixels of each image, averaged over the (N, C, H, W) batch."""
    x, y = _image_pair(x, y, ("x", "y"))
    return float(_mse_per_image(x, y).mean())


def psnr(x, y, data_range: float = 1.0, min_mse: float = 1e-10) -> float:
    """Peak signal-to-noise ratio, per image 10 log10(data_range^2 / MSE_i), averaged over the
    batch. MSE_i is clamped at ``min_mse`` so identical images give a finite 100 dB (not inf)."""
    x, y = _image_pair(x, y, ("x", "y"))
    return float((10.0 * torch.log10(data_range**2 / _mse_per_image(x, y).clamp_min(min_mse))).mean())


def ssim_window_size(height: int, width: int, window_size: int = 11) -> int:
    """The window actually used: min(window_size, H, W), made odd by subtracting 1 when even.
    8x8 digits get a 7x7 window (4 valid positions), 28x28 images the standard 11x11."""
    size = min(window_size, height, width)
    return size if size % 2 == 1 else size - 1


def gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian g_i prop. to exp(-(i - c)^2 / (2 sigma^2)), i = 0..size-1, c the centre."""
    i = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(i**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    x,
    y,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    data_range: float = 1.0,
) -> float:
    """Structural similarity (Wang et al. 2004, eq. 13), averaged over windows, channels and images:

        SSIM(x, y) = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2))

    with C1 = (k1 L)^2, C2 = (k2 L)^2, L = data_range, and local statistics weighted by a
    Gaussian window (sec. III-C: 11x11, sigma 1.5): mu_x = sum_w w x, sigma_x^2 = sum_w w x^2 - mu_x^2,
    sigma_xy = sum_w w x y - mu_x mu_y. As in the authors' reference code, only windows lying
    fully inside the image count ("valid" filtering, no padding). Images smaller than the
    window use ``ssim_window_size`` (e.g. 7x7 for 8x8 digits) with sigma unchanged.
    """
    x, y = _image_pair(x, y, ("x", "y"))
    channels, height, width = x.shape[1:]
    size = ssim_window_size(height, width, window_size)
    g = gaussian_window(size, sigma)
    kernel = rearrange(torch.outer(g, g), "h w -> 1 1 h w").expand(channels, 1, size, size)

    def local_mean(t):  # each channel filtered on its own
        return F.conv2d(t, kernel, groups=channels)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    cov_xy = local_mean(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean(dim=(1, 2, 3)).mean())
