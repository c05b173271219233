"""The feature network for datasets without labels: SimCLR (Chen et al. 2020) on the train split.

A classifier's features (genbench.evaluation.features) need labels; a folder of one's own images
has none. SimCLR needs none: two random views of each image in a batch are pulled together and
pushed away from the other 2B - 2 views by the NT-Xent loss (eq. 1 there), which forces the
network to keep whatever tells one image from all the others: shape, layout, colour, texture.

The augmentations decide what the features ignore, and an evaluation network must not ignore what
a generative model gets wrong. So the views differ only by what says nothing about quality: a
random resized crop (area 60-100%, aspect 3/4-4/3) and a horizontal flip. No blur, no noise, no
colour distortion (SimCLR's jitter and grey conversion), not even a mild change of brightness and
contrast: measured on digits, +-20% of it made the features blind to blur (FD 82, 186, 246 along
sigma 1, 1.5, 2 without it; 41, 34, 80 with it). The degradation ladder checks the features stay
sensitive (genbench.evaluation.ladder, docs/benchmarks.md).

This network is distinct from VQ-GAN's perceptual network (genbench.nets.perceptual, trained with
another objective, seed and architecture), so no model is trained on the features that judge it.

Its quality figure is the view-retrieval accuracy on the test split: for each of up to
RETRIEVAL_IMAGES test images, is the nearest (cosine) of the other images' second views its own
second view? 1/N for features that know nothing, close to 1 for features that tell images apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genbench.nets.classifier import ContrastiveCNN, ContrastiveNetConfig
from genbench.nets.local import train_seeded

STANDARDIZATION_IMAGES = 10_000  # the first train images, un-augmented, fix the feature mean/scale and modes
RETRIEVAL_IMAGES = 2000


@dataclass
class ContrastiveTrainConfig:
    steps: int = 1000
    batch_size: int = 256  # images; each gives two views, so the loss sees 2 * batch_size
    lr: float = 2e-3
    weight_decay: float = 1e-4  # AdamW
    temperature: float = 0.2  # tau of NT-Xent
    min_crop_area: float = 0.6  # random resized crop: fraction of the image's area kept
    seed: int = 0


# Per dataset: measured in docs/benchmarks.md ("A feature network for unlabelled data").
TRAIN_PRESETS: dict[str, ContrastiveTrainConfig] = {
    "digits": ContrastiveTrainConfig(steps=800, batch_size=128),
}


def default_train_config(dataset_name: str) -> ContrastiveTrainConfig:
    return TRAIN_PRESETS.get(dataset_name, ContrastiveTrainConfig())


def random_views(x: torch.Tensor, config: ContrastiveTrainConfig, generator: torch.Generator) -> torch.Tensor:
    """One random view of each image of (B, C, H, W) in [0, 1]: a random resized crop and flip.

    The crop is an affine resampling (bilinear, the crop's corners mapped to the image's): area
    fraction a ~ U(min_crop_area, 1), aspect r ~ log-U(3/4, 4/3), width sqrt(a r), height sqrt(a / r)
    (each at most 1), centre uniform where the crop fits; a flip negates the x scale."""
    b = x.shape[0]
    u = torch.rand(b, 5, generator=generator)
    area = config.min_crop_area + (1 - config.min_crop_area) * u[:, 0]
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, 1]
    sx = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    sy = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    tx, ty = (1 - sx) * (2 * u[:, 2] - 1), (1 - sy) * (2 * u[:, 3] - 1)
    flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx * flip, tx, sy, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (Chen et al. 2020, eq. 1), averaged over all 2B anchors: for anchor i with positive
    j(i), -log exp(sim(i, j) / tau) / sum_{k != i} exp(sim(i, k) / tau), sim the cosine similarity."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    b = z1.shape[0]
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * b, dtype=torch.bool), float("-inf"))
    positives = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)])
    return F.cross_entropy(logits, positives)


def train_contrastive_cnn(dataset, net_config: ContrastiveNetConfig, train_config: ContrastiveTrainConfig,
                          log_every: int = 0) -> ContrastiveCNN:
    """Train a ContrastiveCNN on the train split's images (converted a batch at a time), then fit
    its feature standardization and its k-means mode centroids on the first STANDARDIZATION_IMAGES
    un-augmented train images."""
    generator = torch.Generator().manual_seed(train_config.seed)

    def batch_loss(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        x = dataset.float_images("train", idx)
        v1, v2 = random_views(x, train_config, generator), random_views(x, train_config, generator)
        return nt_xent_loss(model(v1), model(v2), train_config.temperature)

    model = train_seeded(
        lambda: ContrastiveCNN(net_config), batch_loss, len(dataset.train_pixels), steps=train_config.steps,
        batch_size=train_config.batch_size, lr=train_config.lr, weight_decay=train_config.weight_decay,
        seed=train_config.seed, generator=generator, log_every=log_every, what="contrastive feature net",
    )
    images = dataset.float_images("train", slice(0, STANDARDIZATION_IMAGES))
    model.fit_feature_standardization(images)
    fit_mode_centroids(model, images, seed=train_config.seed)
    return model


@torch.no_grad()
def fit_mode_centroids(model: ContrastiveCNN, images: torch.Tensor, seed: int = 0, batch_size: int = 512) -> None:
    """k-means (scikit-learn, k-means++ init, seeded) of the images' standardised features."""
    from sklearn.cluster import KMeans

    feats = torch.cat([model.features(images[i: i + batch_size]) for i in range(0, len(images), batch_size)])
    k = model.config.num_modes
    if len(feats) < k:  # a tiny dataset: every image its own mode, the rest repeat the first
        centroids = feats[torch.arange(k) % max(1, len(feats))] if len(feats) else torch.zeros_like(model.mode_centroids)
    else:
        km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(feats.double().numpy())
        centroids = torch.from_numpy(km.cluster_centers_.astype(np.float32))
    model.mode_centroids.copy_(centroids)


@torch.no_grad()
def view_retrieval_accuracy(model: ContrastiveCNN, images: torch.Tensor, config: ContrastiveTrainConfig,
                            seed: int = 1) -> float:
    """Fraction of (up to RETRIEVAL_IMAGES) images whose first view's nearest second view (cosine
    similarity of the features the metrics use) is its own: how well the features tell images apart."""
    model.eval()
    images = images[:RETRIEVAL_IMAGES]
    if len(images) == 0:
        return float("nan")
    generator = torch.Generator().manual_seed(seed)
    a = F.normalize(model.features(random_views(images, config, generator)), dim=1)
    b = F.normalize(model.features(random_views(images, config, generator)), dim=1)
    return float(((a @ b.T).argmax(1) == torch.arange(len(images))).double().mean())
