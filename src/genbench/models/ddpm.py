"""Denoising diffusion probabilistic model (Ho et al. 2020) with DDIM sampling (Song et al. 2021).

Pixels in [0, 1] are mapped to x0 = 2 * pixel - 1 in [-1, 1]; a U-Net (models/unet.py) is trained on
the simple loss E_{t, eps} ||eps - eps_theta(x_t, t)||^2 (Ho et al. eq. 14, or its x0/v and min-SNR
variants), with all the noise math in genbench.diffusion. Samples come from DDIM (default, `sample_steps`
network calls) or ancestral DDPM (T calls), clipped x0 predictions to [-1, 1], mapped back to [0, 1].

`evaluate` reports the variational bound in bits/dim (Ho et al. eq. 5) of the 8-bit test images:
L_T + sum of the T-1 KL terms (estimated from a stratified subset of timesteps, unbiased) + the
discretized decoder L_0 (see GaussianDiffusion.bits_per_dim). It is an upper bound on the NLL,
comparable with the VAE's discretized-Gaussian bounds.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from ..diffusion import DiffusionConfig, GaussianDiffusion
from ..errors import GenbenchError
from ..registry import register
from .unet import UNet, UNetConfig


@dataclass
class DDPMConfig:
    image_channels: int = 1
    image_size: int = 8
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampler: Literal["ddim", "ddpm"] = "ddim"
    sample_steps: int = 50  # DDIM steps (the DDPM sampler always takes num_timesteps)
    eta: float = 0.0  # DDIM noise: 0 deterministic, 1 DDPM-like
    clip: bool = True  # clip predicted x0 to [-1, 1] while sampling
    bpd_timesteps: int = 100  # KL terms evaluated per image by evaluate() (stratified); 0 = all T-1
    bpd_images: int = 500  # test images used by evaluate()

    def validate(self) -> None:
        for name in ("image_channels", "image_size", "sample_steps", "bpd_images"):
            if getattr(self, name) < 1:
                raise GenbenchError(f"ddpm config: {name} must be >= 1, got {getattr(self, name)}")
        self.unet.validate()
        self.diffusion.validate()
        T = self.diffusion.num_timesteps
        if self.sample_steps > T:
            raise GenbenchError(
                f"ddpm config: sample_steps ({self.sample_steps}) must be <= diffusion.num_timesteps ({T})"
            )
        if self.eta < 0:
            raise GenbenchError(f"ddpm config: eta must be >= 0, got {self.eta}")
        if not 0 <= self.bpd_timesteps <= T - 1:
            raise GenbenchError(
                f"ddpm config: bpd_timesteps must be in [0, {T - 1}] (0 = all), got {self.bpd_timesteps}"
            )


@contextmanager
def _eval_mode(module: nn.Module):
    """Dropout off while sampling/evaluating; the previous mode is restored (training may resume)."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@register("ddpm")
class DDPM(nn.Module):
    Config = DDPMConfig
    FAMILY = {"latent": "none: x_T ~ N(0, I) has the image's shape; T-step Gaussian denoising chain"}
    # bf16 is requested; the trainer honours it only on CUDA or CPUs with native bf16 (utils.bf16_effective)
    PRESETS = {
        # digits 8x8: 2 levels (8, 4), attention only in the 4x4 middle; cosine schedule suits tiny images
        "quick": {
            "model": {
                "unet": {"base_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1,
                         "attention_levels": [], "num_heads": 2, "dropout": 0.1},
                "diffusion": {"num_timesteps": 1000, "schedule": "cosine"},
                "sample_steps": 50, "bpd_timesteps": 50, "bpd_images": 200,
            },
            "train": {"steps": 1500, "batch_size": 48, "lr": 1e-3, "warmup_steps": 100, "grad_clip": 1.0,
                      "ema_decay": 0.995, "bf16": True, "log_every": 50, "ckpt_every": 500},
        },
        # Fashion-MNIST 28x28: 3 levels (28, 14, 7) of 16/32/64 channels, attention at 7x7 and in the middle.
        # Narrow at full resolution on purpose: 0.44 GFLOP per training image (vs 6.6 for UNetConfig()'s
        # 64-channel (1, 2, 2) x 2-block default), so 2000 steps fit in about an hour on
        # 2 CPU cores (benchmarks/bench_unet.py). EMA 0.995: the trainer's EMA starts from the initial
        # weights, and 0.999^2000 would still hold 14% of them.
        "standard": {
            "model": {
                "unet": {"base_channels": 16, "channel_mult": [1, 2, 4], "num_res_blocks": 1,
                         "attention_levels": [2], "num_heads": 2, "dropout": 0.1},
                # v-prediction (Salimans & Ho 2022): with eps-prediction the cosine schedule's
                # x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) amplifies eps errors up to 2e4-fold
                # near t = T, and this preset's samples came out over-bright (FD 28.9 vs 4.2 with v,
                # 400 samples, same 2000 CPU steps; docs/benchmarks.md). Digits (quick) do well with eps.
                "diffusion": {"num_timesteps": 1000, "schedule": "cosine", "prediction": "v"},
                "sample_steps": 50, "bpd_timesteps": 50, "bpd_images": 200,
            },
            "train": {"steps": 2000, "batch_size": 64, "lr": 1e-3, "warmup_steps": 200, "grad_clip": 1.0,
                      "ema_decay": 0.995, "bf16": True, "log_every": 50, "ckpt_every": 500},
        },
    }

    def __init__(self, config: DDPMConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.unet = UNet(config.unet, config.image_channels)
        self.diffusion = GaussianDiffusion(config.diffusion)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c = self.config
        return c.image_channels, c.image_size, c.image_size

    def loss(self, batch: Tensor, step: int = 0, stage: str = "main") -> dict[str, Tensor]:
        return {"loss": self.diffusion.training_loss(self.unet, batch * 2 - 1)}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        c = self.config
        kw = dict(generator=generator, clip_x0=(-1.0, 1.0) if c.clip else None, progress=False,
                  device=self.unet.input_conv.weight.device)
        with _eval_mode(self):
            if c.sampler == "ddim":
                x = self.diffusion.ddim_sample(self.unet, (n, *self.image_shape), steps=c.sample_steps, eta=c.eta, **kw)
            else:
                x = self.diffusion.ddpm_sample(self.unet, (n, *self.image_shape), **kw)
        return ((x + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def evaluate(self, test_images: Tensor, generator: torch.Generator | None = None, batch_size: int = 250) -> dict:
        c = self.config
        x = test_images[: c.bpd_images]
        k = c.bpd_timesteps or None
        parts: dict[str, list[Tensor]] = {}
        with _eval_mode(self):
            for xb in x.split(batch_size):
                out = self.diffusion.bits_per_dim(self.unet, xb * 2 - 1, num_timesteps=k, generator=generator)
                for name, v in out.items():
                    parts.setdefault(name, []).append(v)
        mean = {name: torch.cat(v).mean().item() for name, v in parts.items()}
        n_terms = c.diffusion.num_timesteps - 1 if k is None else k
        return {
            "bits_per_dim": mean["bpd"],
            "bpd_estimator": (
                f"variational bound (Ho et al. 2020 eq. 5), {n_terms} of {c.diffusion.num_timesteps - 1} KL "
                f"timesteps (stratified, unbiased) + L_T (closed form) + L_0 (discretized decoder), "
                f"{len(x)} test images"
            ),
            "prior_bpd": mean["prior_bpd"],
            "diffusion_bpd": mean["diffusion_bpd"],
            "decoder_bpd": mean["decoder_bpd"],
        }
