"""Does a feature network's FD behave? Real test images, degraded step by step, scored against the train split.

A metric earns trust when it orders what we can order by construction: the held-out test split
should score about as well as train images themselves (the floor: two disjoint samples of one
distribution), and FD should rise at every rung of a ladder of ever worse degradations of the test
images (Heusel et al. 2017, sec. 4 and fig. 3, did this for FID with noise, blur, swirl, ...):

- ``blur``: a Gaussian blur of growing sigma (pixels), separable, reflect-padded;
- ``noise``: additive Gaussian noise of growing sigma (0.05 .. 0.3), clipped to [0, 1];
- ``modes``: only the images of the first k of K modes, resampled to the full count: fewer modes,
  the failure FD should catch and per-image measures cannot. Modes are the labels where the
  dataset has them, else k-means clusters of the pixels (never of the features under test).

``degradation_ladder`` scores every rung with one FeatureNetwork; ``is_increasing`` checks a rung list.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from genbench.utils import exists

from . import metrics

BLUR_SIGMAS = (0.5, 1.0, 1.5, 2.0)
# No rung below 0.05: noise of sigma 0.02 (5 grey levels; a third of one of the digits' 17 levels)
# moved FD by less than its sampling noise at the few hundred test images of digits and emoji, in
# either direction (digits, contrastive: 0.54 against 0.67 for the clean test split)
NOISE_SIGMAS = (0.05, 0.1, 0.2, 0.3)
MODES_KEPT = (8, 6, 4, 2)  # of 10
NUM_MODES = 10


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, C, H, W) -> the same, each channel convolved with a normalised Gaussian of std ``sigma``
    pixels, truncated at 3 sigma (reflect padding; the radius is capped below the image side)."""
    radius = min(max(1, math.ceil(3 * sigma)), min(images.shape[-2:]) - 1)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    out = F.pad(images, (radius, radius, 0, 0), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    out = F.pad(out, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(out, kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def add_noise(images: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return (images + sigma * noise).clamp(0, 1)


def pixel_modes(images: torch.Tensor, k: int = NUM_MODES, seed: int = 0) -> np.ndarray:
    """k-means (k-means++ init, seeded) cluster of each image's pixels: modes of unlabelled data."""
    from sklearn.cluster import KMeans

    flat = images.reshape(len(images), -1).double().numpy()
    return KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(flat)


def keep_modes(images: torch.Tensor, modes: np.ndarray, keep: int, seed: int = 0) -> torch.Tensor:
    """The images whose mode is among the ``keep`` most frequent, drawn with replacement (seeded)
    up to the input's count: as many images, fewer modes."""
    order = np.argsort(-np.bincount(modes), kind="stable")[:keep]
    pool = np.flatnonzero(np.isin(modes, order))
    rng = np.random.default_rng(seed)
    return images[torch.from_numpy(rng.choice(pool, size=len(images), replace=True))]


def degradation_ladder(feats, dataset, num_images: int = 2000, reference_images: int = 10_000, seed: int = 0) -> dict:
    """FD (in ``feats``' feature space) of up to ``num_images`` test images and their degradations
    against up to ``reference_images`` other train images; the floor is a disjoint sample of as many
    train images as test images, the ceiling uniform noise. FD's finite-sample bias grows as the
    samples shrink (Chong & Forsyth 2020), so the reference takes every train image it may: on a
    small dataset (the emoji: 250 test images) it is what separates the first rungs from noise.
    Returns {"floor", "test", "ceiling", "blur": [...], "noise": [...], "modes": [...], with the
    sigmas / modes kept and the sample sizes}."""
    n = min(num_images, len(dataset.test_pixels), len(dataset.train_pixels) // 2)
    perm = torch.randperm(len(dataset.train_pixels), generator=torch.Generator().manual_seed(seed))
    other_train = dataset.float_images("train", perm[:n])
    reference_rows = perm[n: n + reference_images]
    reference = np.concatenate([feats.features(dataset.float_images("train", reference_rows[i: i + 4096]))
                                for i in range(0, len(reference_rows), 4096)])
    test = dataset.float_images("test", slice(0, n))
    if exists(dataset.test_labels):
        modes, mode_source = dataset.test_labels[:n].numpy(), "labels"
    else:
        modes, mode_source = pixel_modes(test, seed=seed), "k-means of pixels"

    def fd(images: torch.Tensor) -> float:
        return metrics.frechet_distance(feats.features(images.clamp(0, 1)), reference)

    return {
        "feature_network": feats.kind, "num_images": n, "reference_images": len(reference), "mode_source": mode_source,
        "floor": fd(other_train), "test": fd(test),
        "ceiling": fd(torch.rand(test.shape, generator=torch.Generator().manual_seed(seed))),
        "blur_sigmas": list(BLUR_SIGMAS), "blur": [fd(gaussian_blur(test, s)) for s in BLUR_SIGMAS],
        "noise_sigmas": list(NOISE_SIGMAS), "noise": [fd(add_noise(test, s, seed)) for s in NOISE_SIGMAS],
        "modes_kept": list(MODES_KEPT), "modes": [fd(keep_modes(test, modes, k, seed)) for k in MODES_KEPT],
    }


def is_increasing(values: list[float]) -> bool:
    return all(b > a for a, b in zip(values, values[1:]))
