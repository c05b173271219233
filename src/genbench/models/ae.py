"""Auto-Encoder: x -> z -> x_hat, trained with L2 reconstruction.

An auto-encoder learns a representation, not a distribution: it has no prior over z, so it cannot
generate by itself. To put it in the comparison anyway, `sample` uses a *heuristic*: after
training, a full-covariance Gaussian is fitted to the latents of the training set and new codes are
drawn from it (z = mu + L eps) and decoded. Its likelihood is undefined and reported as such.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..config import check_at_least
from ..core.gaussian import mvn_rsample
from ..nets.autoencoders import make_decoder, make_encoder
from .base import GenerativeModel, register


@dataclass
class AEConfig:
    image_channels: int = 1
    image_size: int = 8
    latent_dim: int = 16
    arch: Literal["mlp", "conv"] = "conv"
    width: int = 32

    def validate(self) -> None:
        check_at_least(self, "ae config", 1, "image_channels", "image_size", "latent_dim", "width")


@register("ae")
class AE(GenerativeModel):
    Config = AEConfig
    FAMILY = {"latent": "continuous vector (deterministic encoder; Gaussian fitted after training for sampling)"}
    has_reconstruction = True
    has_latent_space = True

    def __init__(self, config: AEConfig):
        super().__init__()
        self.config = config
        c = config
        self.encoder = make_encoder(c.arch, c.image_channels, c.image_size, c.latent_dim, c.width)
        self.decoder = make_decoder(c.arch, c.latent_dim, c.image_channels, c.image_size, c.width)
        # the sampling heuristic: N(latent_mean, L L^T) fitted to training latents in finish_training
        self.register_buffer("latent_mean", torch.zeros(c.latent_dim))
        self.register_buffer("latent_scale_tril", torch.eye(c.latent_dim))

    def encode(self, x):
        return self.encoder(x)

    def decode(self, z):
        return torch.sigmoid(self.decoder(z))

    def encode_latents(self, x, sample: bool = False):
        return self.encode(x)

    def decode_latents(self, z):
        return self.decode(z)

    def loss(self, batch, step: int = 0, stage: str = "main"):
        x_hat = self.decode(self.encode(batch))
        mse = F.mse_loss(x_hat.float(), batch, reduction="none").flatten(1).sum(1).mean()
        return {"loss": mse, "mse_per_pixel": mse.detach() / batch[0].numel()}

    @torch.no_grad()
    def finish_training(self, train_images):
        z = torch.cat([self.encode(x).float() for x in train_images.split(1024)])
        cov = torch.cov(z.T) + 1e-5 * torch.eye(z.shape[1], device=z.device)
        self.latent_mean.copy_(z.mean(0))
        self.latent_scale_tril.copy_(torch.linalg.cholesky(cov))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None):
        z = mvn_rsample(self.latent_mean, self.latent_scale_tril, n, generator=generator)
        return self.decode(z)

    def evaluate(self, test_images, generator=None) -> dict:
        return {"bits_per_dim": None, "bpd_estimator": "undefined: an auto-encoder has no density model"}
