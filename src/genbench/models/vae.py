"""Variational Auto-Encoder (Kingma & Welling 2014).

Encoder q(z|x) = N(mu(x), diag sigma^2(x)) (it outputs mean and log-variance), prior p(z) = N(0, I),
Encoder and decoder (`arch`): an MLP or a small conv net with a vector latent z in R^latent_dim, or
"grid": the VQ models' convolutional GridEncoder/GridDecoder with a spatial latent z of shape
(latent_channels, S/f, S/f), the KL-regularised first stage of latent diffusion (Rombach et al. 2022
sec. 3.1, "KL-reg."): every entry of the grid is an independent Gaussian, so the prior, KL and bounds
below are unchanged (they sum over all latent entries); `latent_dim` is unused there.

Decoder p(x|z) one of:
- "discretized_gaussian" (default): a Gaussian over each pixel integrated over its 8-bit bin, a
  proper probability mass on the 256 pixel values, so the ELBO and IWAE bound are bounds on the
  log-likelihood of the 8-bit test images, comparable with DDPM's bound (same decoder as Ho et al.
  2020 sec. 3.3);
- "gaussian": a density on [0, 1] pixels (fixed or learned variance); its bits/dim are on the
  continuous scale and not comparable with the 8-bit ones;
- "bernoulli": the classic choice for near-binary images; intensities are used as soft targets,
  which is not a normalised likelihood for grey levels, so its bits/dim are reported but flagged.

Loss = -ELBO = E_q[-log p(x|z)] + beta * KL(q(z|x) || p(z))  (Kingma & Welling eq. 10; beta as in
Higgins et al. 2017). `evaluate` reports the test ELBO and the importance-weighted bound
log p(x) >= log 1/K sum_k p(x, z_k)/q(z_k|x) (Burda et al. 2016 eq. 8), in nats and bits/dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..config import check_at_least
from ..core.gaussian import (
    bernoulli_log_prob,
    diag_normal_log_prob,
    discretized_gaussian_log_likelihood,
    gaussian_log_likelihood,
    iwae_log_likelihood,
    kl_to_standard_normal,
    nats_to_bits_per_dim,
    reparameterize,
    standard_normal_log_prob,
    sum_except_batch,
)
from ..errors import GenbenchError
from ..nets.autoencoders import GridDecoder, GridEncoder, make_decoder, make_encoder
from .base import GenerativeModel, register


@dataclass
class VAEConfig:
    image_channels: int = 1
    image_size: int = 8
    latent_dim: int = 16
    arch: Literal["mlp", "conv", "grid"] = "conv"
    width: int = 32  # hidden width (mlp); base conv channels (conv); channels at the latent grid (grid)
    # grid arch only: the latent is (latent_channels, S/f, S/f) with f = downsample (latent_dim is derived)
    downsample: int = 2
    latent_channels: int = 4
    n_res_blocks: int = 1
    likelihood: Literal["discretized_gaussian", "gaussian", "bernoulli"] = "discretized_gaussian"
    learn_variance: bool = True  # Gaussian decoders: one learned log-variance per channel, else obs_std
    obs_std: float = 0.1
    beta: float = 1.0
    iwae_samples: int = 100  # K of the importance-weighted bound in evaluate()

    def validate(self) -> None:
        check_at_least(self, "vae config", 1, "image_channels", "image_size", "latent_dim", "width", "iwae_samples")
        if self.obs_std <= 0:
            raise GenbenchError(f"vae config: obs_std must be > 0, got {self.obs_std}")
        if self.beta < 0:
            raise GenbenchError(f"vae config: beta must be >= 0, got {self.beta}")
        if self.arch not in ("mlp", "conv", "grid"):
            raise GenbenchError(f"vae config: arch must be 'mlp', 'conv' or 'grid', got {self.arch!r}")
        if self.arch == "grid":
            check_at_least(self, "vae config", 1, "downsample", "latent_channels")
            check_at_least(self, "vae config", 0, "n_res_blocks")
            if self.downsample & (self.downsample - 1):
                raise GenbenchError(f"vae config: downsample must be a power of 2, got {self.downsample}")
            if self.image_size % self.downsample:
                raise GenbenchError(
                    f"vae config: image_size {self.image_size} is not divisible by downsample {self.downsample}")

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one latent: (latent_dim,), or (latent_channels, S/f, S/f) for the grid arch."""
        if self.arch == "grid":
            side = self.image_size // self.downsample
            return (self.latent_channels, side, side)
        return (self.latent_dim,)


@register("vae")
class VAE(GenerativeModel):
    Config = VAEConfig
    FAMILY = {"latent": "continuous vector (or spatial grid), Gaussian posterior q(z|x), prior N(0, I)"}
    has_reconstruction = True
    has_latent_space = True
    has_posterior = True

    def __init__(self, config: VAEConfig):
        super().__init__()
        config.validate()
        self.config = config
        c = config
        if c.arch == "grid":
            self.encoder = GridEncoder(c.image_channels, c.width, 2 * c.latent_channels, c.downsample, c.n_res_blocks)
            self.decoder = GridDecoder(c.latent_channels, c.width, c.image_channels, c.downsample, c.n_res_blocks)
        else:
            self.encoder = make_encoder(c.arch, c.image_channels, c.image_size, 2 * c.latent_dim, c.width)
            self.decoder = make_decoder(c.arch, c.latent_dim, c.image_channels, c.image_size, c.width)
        init = 2 * math.log(c.obs_std)
        self.decoder_log_var = nn.Parameter(torch.full((c.image_channels, 1, 1), init),
                                            requires_grad=c.learn_variance and c.likelihood != "bernoulli")

    # ---- the probabilistic pieces

    def posterior(self, x):
        """q(z|x): (mean, log_var), each (B, *latent_shape)."""
        # back to the input precision: under bf16 autocast the likelihood math stays in fp32
        mean, log_var = self.encoder(x).to(x.dtype).chunk(2, dim=1)
        return mean, log_var.clamp(-30.0, 20.0)

    def decoder_log_likelihood(self, x, z):
        """log p(x|z) summed over pixels, (B,)."""
        out = self.decoder(z).to(x.dtype)
        lik = self.config.likelihood
        if lik == "bernoulli":
            return bernoulli_log_prob(x, out)
        if lik == "gaussian":
            return gaussian_log_likelihood(x, out, self.decoder_log_var)
        return discretized_gaussian_log_likelihood(x, out, 0.5 * self.decoder_log_var)

    def decode(self, z):
        """The decoder's mean image in [0, 1] (what samples and reconstructions show)."""
        out = self.decoder(z).to(z.dtype)
        return torch.sigmoid(out) if self.config.likelihood == "bernoulli" else out.clamp(0, 1)

    def encode(self, x):
        """The posterior mean: the deterministic code of x."""
        return self.posterior(x)[0]

    def encode_latents(self, x, sample: bool = False):
        """The posterior mean, or with `sample` a draw z ~ q(z|x) (reparameterized, global RNG)."""
        if not sample:
            return self.encode(x)
        return reparameterize(*self.posterior(x))

    def decode_latents(self, z):
        return self.decode(z)

    # ---- training and evaluation

    def loss(self, batch, step: int = 0, stage: str = "main"):
        mean, log_var = self.posterior(batch)
        z = reparameterize(mean, log_var)
        rec = -self.decoder_log_likelihood(batch, z)
        kl = kl_to_standard_normal(mean, log_var)
        loss = (rec + self.config.beta * kl).mean()
        return {"loss": loss, "rec_nll": rec.mean().detach(), "kl": kl.mean().detach(),
                "elbo": -(rec + kl).mean().detach()}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None):
        device = self.decoder_log_var.device
        z = torch.randn(n, *self.config.latent_shape, generator=generator, device=device)
        return self.decode(z)

    @torch.no_grad()
    def log_likelihood_bounds(self, x, k: int, generator: torch.Generator | None = None):
        """(ELBO, IWAE_k) per image in nats, (B,) each, from the same K posterior samples.

        The ELBO is averaged over the K samples (a lower-variance estimate of the same bound)."""
        mean, log_var = self.posterior(x)
        log_w = []
        for _ in range(k):
            z = reparameterize(mean, log_var, generator=generator)
            log_p_xz = self.decoder_log_likelihood(x, z) + sum_except_batch(standard_normal_log_prob(z))
            log_q = diag_normal_log_prob(z, mean, log_var, event_dims=z.ndim - 1)
            log_w.append(log_p_xz - log_q)
        log_w = torch.stack(log_w)  # (K, B)
        return log_w.mean(0), iwae_log_likelihood(log_w, torch.zeros_like(log_w))

    @torch.no_grad()
    def evaluate(self, test_images, generator: torch.Generator | None = None, batch_size: int = 500) -> dict:
        k = self.config.iwae_samples
        elbos, iwaes = [], []
        for x in test_images.split(batch_size):
            e, i = self.log_likelihood_bounds(x, k, generator)
            elbos.append(e)
            iwaes.append(i)
        elbo, iwae = torch.cat(elbos).mean().item(), torch.cat(iwaes).mean().item()
        dims = test_images[0].numel()
        lik = self.config.likelihood
        note = {
            "discretized_gaussian": "8-bit discrete likelihood (256 bins per pixel), comparable with DDPM's bound",
            "gaussian": "continuous density on [0,1] pixels; not comparable with 8-bit bits/dim",
            "bernoulli": "Bernoulli with grey levels as soft targets: not a normalised likelihood of 8-bit images",
        }[lik]
        return {
            "test_elbo_nats": elbo,
            f"test_iwae{k}_nats": iwae,
            "test_elbo_bits_per_dim": nats_to_bits_per_dim(-elbo, dims),
            "bits_per_dim": nats_to_bits_per_dim(-iwae, dims),
            "bpd_estimator": f"IWAE bound, K={k} (Burda et al. 2016)",
            "likelihood_note": note,
        }
