"""The evaluation networks: the networks whose features FD / KID / PRDC are computed in.

FID's Inception-v3 can't be downloaded here and was never trained on 8x8 digits or
Fashion-MNIST anyway, so genbench trains this small CNN per dataset (genbench.evaluation.features):

    image (C, H, W) in [0, 1]
      -> 3 blocks [conv3x3 -> GroupNorm -> ReLU] (widths 16, 32, 64), 2x2 average pooling
         after the first two (ceil mode: 28 -> 14 -> 7, 8 -> 4 -> 2)
      -> average pooling to at most 7x7 (a no-op for 8x8 and 28x28 images), flatten
      -> linear -> 128-d features                  (the role of Inception's pool3)
      -> ReLU -> linear head -> class logits       (for accuracy and class histograms)

The features are the penultimate layer before its ReLU (dense, no dead dimensions), centred
and scaled by one number fitted on the training set (``FeatureCNN.features``). The map
is flattened rather than pooled further because where a part sits matters on these centred
datasets (in 400-step Fashion-MNIST trials, pooling to 4x4 / 2x2 cost 3 / 8 points).
GroupNorm rather than BatchNorm: an image's features never depend on which other images
share its batch, nor on train/eval mode.

``ContrastiveCNN`` is the same trunk for datasets without labels (trained self-supervised by
genbench.evaluation.contrastive): the head is SimCLR's projection MLP (Chen et al. 2020, sec. 2.1:
the loss is taken after it, the representation used is before it), and ``mode_centroids`` hold
k-means centres of the training set's features, so that ``predict`` can say which of K modes of the
data an image falls in: the class histogram of a labelled dataset, for an unlabelled one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass
class FeatureNetConfig:
    image_shape: tuple[int, int, int]  # (C, H, W) of the images it takes
    num_classes: int
    widths: tuple[int, ...] = (16, 32, 64)  # one conv block each, 2x2 average pooling between blocks
    groups: int = 8  # GroupNorm groups (each width must be divisible by it)
    max_pool_size: int = 7  # the last block's map is average-pooled to at most this side, then flattened
    feature_dim: int = 128

    @property
    def pooled_size(self) -> tuple[int, int]:
        """Side lengths of the flattened map: 8x8 -> 2x2, 28x28 -> 7x7, 64x64 -> 7x7."""
        shrink = 2 ** (len(self.widths) - 1)
        return tuple(min(self.max_pool_size, math.ceil(side / shrink)) for side in self.image_shape[1:])


class FeatureCNN(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        blocks, channels = [], config.image_shape[0]
        for i, width in enumerate(config.widths):
            blocks += [nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(config.groups, width), nn.ReLU()]
            if i < len(config.widths) - 1:
                blocks.append(nn.AvgPool2d(2, ceil_mode=True))
            channels = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(config.pooled_size)  # identity for 8x8 and 28x28 images
        self.to_features = nn.Linear(channels * math.prod(config.pooled_size), config.feature_dim)
        self.head = self.build_head(config)
        # set by fit_feature_standardization after training; saved with the weights
        self.register_buffer("feature_mean", torch.zeros(config.feature_dim))
        self.register_buffer("feature_scale", torch.ones(()))

    def build_head(self, config) -> nn.Module:
        return nn.Linear(config.feature_dim, config.num_classes)

    def raw_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, feature_dim): the penultimate layer, before its ReLU."""
        h = rearrange(self.pool(self.blocks(x)), "b c h w -> b (c h w)")
        return self.to_features(h)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Raw features centred on the training set's mean and divided by one scalar, the RMS
        of their per-dimension standard deviations: one global scale, so Euclidean geometry
        (PRDC) is unchanged, while x.y/d is O(1) as KID's kernel (x.y/d + 1)^3 assumes."""
        return (self.raw_features(x) - self.feature_mean) / self.feature_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.raw_features(x)))

    @torch.no_grad()
    def fit_feature_standardization(self, images: torch.Tensor, batch_size: int = 512) -> None:
        self.eval()
        raw = torch.cat([self.raw_features(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
        self.feature_mean.copy_(raw.mean(0))
        self.feature_scale.copy_(raw.var(0).mean().sqrt())


@dataclass
class ContrastiveNetConfig:
    """FeatureNetConfig's trunk with a projection head instead of a classifier."""

    image_shape: tuple[int, int, int]
    widths: tuple[int, ...] = (16, 32, 64)
    groups: int = 8
    max_pool_size: int = 7
    feature_dim: int = 128
    projection_dim: int = 64  # where the contrastive loss is taken
    num_modes: int = 10  # k-means centres of the train features (the unlabelled "class histogram")

    @property
    def pooled_size(self) -> tuple[int, int]:
        return FeatureNetConfig.pooled_size.fget(self)


class ContrastiveCNN(FeatureCNN):
    """FeatureCNN's trunk -> 128-d features (used by the metrics) -> ReLU -> linear -> ReLU ->
    linear -> projection (used by the loss only)."""

    def __init__(self, config: ContrastiveNetConfig):
        super().__init__(config)
        self.register_buffer("mode_centroids", torch.zeros(config.num_modes, config.feature_dim))

    def build_head(self, config: ContrastiveNetConfig) -> nn.Module:
        return nn.Sequential(nn.Linear(config.feature_dim, config.feature_dim), nn.ReLU(),
                             nn.Linear(config.feature_dim, config.projection_dim))

    def predict_modes(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B,) index of the nearest mode centroid in the standardised feature space."""
        return torch.cdist(self.features(x), self.mode_centroids).argmin(1)
