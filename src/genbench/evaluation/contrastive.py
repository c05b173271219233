"""The feature network for datasets without labels: SimCLR (Chen et al. 2020) on the train split.

A classifier's features (genbench.evaluation.features) need labels; a folder of one's own images
has none. SimCLR needs none: two random views of each image in a batch are pulled together and
pushed away from the other 2B - 2 views by the NT-Xent loss (eq. 1 there), which forces the
network to keep whatever tells one image from all the others: shape, layout, colour, texture.

The augmentations decide what the features ignore, and an evaluation network must not ignore what
a generative model gets wrong. So the views differ only by what says nothing about quality: a shift
by a few whole pixels (edges repeated) and a mirror image. No blur, no noise, no colour distortion
(SimCLR's jitter and grey conversion), not even a mild change of brightness and contrast, and no
resized crop either, whose interpolation blurs: measured (docs/benchmarks.md), +-20 % brightness/
contrast jitter made the digits features blind to blur (FD 41, 34, 80 at blur sigma 1, 1.5, 2 px),
and with resized crops (60-100 % of the area) the emoji features scored test images blurred by
sigma 0.5 px better than the test images themselves (FD 1.04 vs 1.24), where shifts give 1.58 vs
1.29. The degradation ladder checks the features stay sensitive (genbench.evaluation.ladder).

This network is distinct from VQ-GAN's perceptual network (genbench.nets.perceptual, trained with
another objective, seed and architecture), so no model is trained on the features that judge it.

Its quality figure is the view-retrieval accuracy on the test split: for each of up to
RETRIEVAL_IMAGES test images, is the nearest (cosine) of the other images' second views its own
second view? 1/N for features that know nothing, close to 1 for features that tell images apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genbench.nets.classifier import ContrastiveCNN, ContrastiveNetConfig
from genbench.nets.local import train_seeded

from .augment import random_shift

STANDARDIZATION_IMAGES = 10_000  # the first train images, un-augmented, fix the feature mean/scale and modes
RETRIEVAL_IMAGES = 2000


@dataclass
class ContrastiveTrainConfig:
    steps: int = 1000
    batch_size: int = 256  # images; each gives two views, so the loss sees 2 * batch_size
    lr: float = 2e-3
    weight_decay: float = 1e-4  # AdamW
    temperature: float = 0.2  # tau of NT-Xent
    max_shift: int = 3  # views: integer shifts by up to this many pixels (and mirror images)
    seed: int = 0


# Per dataset: measured in docs/benchmarks.md ("A feature network for unlabelled data").
TRAIN_PRESETS: dict[str, ContrastiveTrainConfig] = {
    "digits": ContrastiveTrainConfig(steps=800, batch_size=128, max_shift=1),
}


def default_train_config(dataset_name: str) -> ContrastiveTrainConfig:
    return TRAIN_PRESETS.get(dataset_name, ContrastiveTrainConfig())


def random_views(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """One random view of each image of (B, C, H, W): shifted by its own integer (dy, dx) in
    [-max_shift, max_shift]^2, the edge pixels repeated, and mirrored with probability 1/2. No
    interpolation: every pixel of a view is a pixel of the image, so no view is blurred."""
    out = random_shift(x, max_shift, generator, padding="replicate")
    flip = torch.rand(len(x), generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), out.flip(-1), out)


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
        v1, v2 = (random_views(x, train_config.max_shift, generator) for _ in range(2))
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
    a = F.normalize(model.features(random_views(images, config.max_shift, generator)), dim=1)
    b = F.normalize(model.features(random_views(images, config.max_shift, generator)), dim=1)
    return float(((a @ b.T).argmax(1) == torch.arange(len(images))).double().mean())
