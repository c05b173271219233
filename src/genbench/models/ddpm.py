"""Denoising diffusion probabilistic model (Ho et al. 2020) with DDIM sampling (Song et al. 2021).

Pixels in [0, 1] are mapped to x0 = 2 * pixel - 1 in [-1, 1]; a U-Net (genbench.nets.unet) is
trained on the simple loss E_{t, eps} ||eps - eps_theta(x_t, t)||^2 (Ho et al. eq. 14, or its x0/v and
min-SNR variants), with all the noise math in genbench.core.diffusion. Samples come from the sampler
the config names (genbench.core.samplers: DDIM by default, `sampler.steps` network calls, or ancestral
DDPM, T calls), with x0 predictions clipped to [-1, 1], mapped back to [0, 1].

`evaluate` reports the variational bound in bits/dim (Ho et al. eq. 5) of the 8-bit test images:
L_T + sum of the T-1 KL terms (estimated from a stratified subset of timesteps, unbiased) + the
discretized decoder L_0 (see GaussianDiffusion.bits_per_dim). It is an upper bound on the NLL,
comparable with the VAE's discretized-Gaussian bounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import check_at_least
from ..core import samplers
from ..core.diffusion import DiffusionConfig, GaussianDiffusion
from ..core.samplers import SamplerConfig, upgrade_sampler_fields
from ..errors import GenbenchError
from ..nets.unet import UNet, UNetConfig
from .base import GenerativeModel, eval_mode, register


@dataclass
class DDPMConfig:
    image_channels: int = 1
    image_size: int = 8
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    upgrade_fields = staticmethod(upgrade_sampler_fields)
    clip: bool = True  # clip predicted x0 to [-1, 1] while sampling
    bpd_timesteps: int = 100  # KL terms evaluated per image by evaluate() (stratified); 0 = all T-1
    bpd_images: int = 500  # test images used by evaluate()

    def validate(self) -> None:
        check_at_least(self, "ddpm config", 1, "image_channels", "image_size", "bpd_images")
        try:
            self.unet.validate()
            self.diffusion.validate()
            self.sampler.validate(self.diffusion.num_timesteps)
        except GenbenchError as e:
            raise GenbenchError(f"ddpm config: {e}") from None
        T = self.diffusion.num_timesteps
        if not 0 <= self.bpd_timesteps <= T - 1:
            raise GenbenchError(
                f"ddpm config: bpd_timesteps must be in [0, {T - 1}] (0 = all), got {self.bpd_timesteps}"
            )


@register("ddpm")
class DDPM(GenerativeModel):
    Config = DDPMConfig
    FAMILY = {"latent": "none: x_T ~ N(0, I) has the image's shape; T-step Gaussian denoising chain"}
    has_sampler = True

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
    def sample(self, n: int, generator: torch.Generator | None = None,
               callback: samplers.StepCallback | None = None) -> Tensor:
        """n images in [0, 1]; `callback(t, x_t, x0_hat)` sees each step in [-1, 1] pixel space."""
        c = self.config
        with eval_mode(self):
            x = samplers.sample(self.diffusion, self.unet, (n, *self.image_shape), c.sampler, generator=generator,
                                clip_x0=(-1.0, 1.0) if c.clip else None, device=self.unet.input_conv.weight.device,
                                callback=callback)
        return self.diffusion_to_images(x)

    def diffusion_to_images(self, x: Tensor) -> Tensor:
        """x in the diffusion's [-1, 1] pixel space -> images in [0, 1]."""
        return ((x + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def evaluate(self, test_images: Tensor, generator: torch.Generator | None = None, batch_size: int = 250) -> dict:
        c = self.config
        x = test_images[: c.bpd_images]
        k = c.bpd_timesteps or None
        parts: dict[str, list[Tensor]] = {}
        with eval_mode(self):
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
