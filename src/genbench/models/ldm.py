"""Latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models").

The diffusion process of pixel DDPM (genbench.core.diffusion, the same U-Net of genbench.nets.unet)
run on the compact latents of a pretrained autoencoder instead of on pixels. Two stages, trained one after
the other by the shared trainer (each checkpointed and resumable):

1. "first_stage": an autoencoder E, D, one of genbench's own models (`first_stage`):
   - "vae" (the KL-regularized variant, Rombach sec. 3.1, with a small beta; the presets' choice):
     z ~ q(z|x) while training, the posterior mean when encoding. With arch "grid" the latent is a
     (latent_channels, S/f, S/f) Gaussian grid, as in the paper; an MLP/conv VAE's vector latent (D,) is
     laid out as a (D/k^2, k, k) grid with k the largest of 4, 3, 2, 1 such that k^2 divides D (only a
     layout: the U-Net's downsampling and attention mix all entries);
   - "vqvae" / "vqgan" (the VQ-regularized variant): the diffusion runs on the continuous
     pre-quantization latents z = E(x) (B, code_dim, S/f, S/f); a sampled z is quantized by the
     codebook only when decoded, x = D(q(z)) (Rombach sec. 3.1: a VQGAN "with the quantization layer
     absorbed by the decoder"), or decoded as it is with decode_quantized=false.
   Measured here (docs/benchmarks.md), a VQ encoder's pre-quantization latents cluster around the
   codes and are much harder to diffuse than the VAE's Gaussian latents at the same diffusion recipe.
   The first stage is either trained here (that model's own first stage, "autoencoder" for VQ
   models, with its own loss, optimizer groups and prepare_stage; a VQ model's transformer prior is
   not built: the diffusion model is the prior), or loaded from a finished run folder:

       genbench train ldm --dataset fashion-mnist --preset standard --set first_stage_run=runs/vqvae-fmnist

   Such a model has the single stage ("diffusion",) (train.stages.first_stage is then unused); the
   run's own config replaces the <first_stage> overrides and its weights are copied in when the
   diffusion stage starts. Either way the first stage is a submodule, so the exported
   model.safetensors holds it and the exported folder is self-contained (its config.json records
   the first stage's full config and `first_stage_run: null`; run.json keeps the path).
2. "diffusion": the first stage is frozen (eval mode, encoded under no_grad, not in the
   optimizer). The latent scale factor s = 1 / sigma_hat, sigma_hat^2 = 1/(N c h w) sum (z - mu_hat)^2
   over the encoded training set (Rombach sec. 4.3.2 estimate it on the first batch; here on up to
   `scale_images` random training images), makes the diffusion's data s * z unit-variance, matching
   the N(0, I) end of the forward process. s is kept in the buffer `latent_scale` (checkpointed)
   and, after training, in the exported config's `scale_factor`. The U-Net is trained on s z with
   the configured target and weighting (genbench.core.diffusion; the presets: v-prediction under the
   cosine schedule, Salimans & Ho 2022). Each batch is encoded on the fly: caching the
   latents would need indices of the trainer's batches, and the encoder pass is part of the honest
   training cost of an LDM.

Sampling: z_T ~ N(0, I) of the latent shape -> the configured sampler (genbench.core.samplers) in
latent space, with no x0 clipping (latents are unbounded, unlike [-1, 1] pixels) -> z / s -> (quantize) -> decoder -> [0, 1].
Without clipping, eps-prediction's x0 estimate x_t / sqrt(abar) - sqrt(1/abar - 1) eps_hat multiplies
the network's error by up to 1/sqrt(abar_T) (2e4 for the cosine schedule at T = 1000); v-prediction
has no such factor, which is why the presets use it.

Likelihood: not reported (bits_per_dim is None). The diffusion bound here is a bound on a density of
continuous, rescaled latents, not a probability of 8-bit pixels, and the VQ decoder is deterministic;
`evaluate` reports the reconstruction error, the latent statistics and the held-out diffusion loss.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from einops import rearrange
from torch import Tensor, nn

from ..config import check_at_least, from_dict, to_dict
from ..core import samplers
from ..core.diffusion import DiffusionConfig, GaussianDiffusion
from ..core.samplers import SamplerConfig, upgrade_sampler_fields
from ..errors import GenbenchError
from ..nets.unet import UNet, UNetConfig
from .base import (GenerativeModel, eval_mode, get_model_class, load_state, pretrained_folder, read_pretrained_config,
                   register)

UNUSED_SUBMODULES = ("prior",)  # a VQ model's autoregressive prior: the diffusion model replaces it



@dataclass
class LDMConfig:
    image_channels: int = 1
    image_size: int = 8
    first_stage: Literal["vqvae", "vqgan", "vae"] = "vqvae"
    # config overrides of each kind of first stage (only the chosen one is used); image_channels
    # and image_size come from the LDM's
    vqvae: dict[str, Any] = field(default_factory=dict)
    vqgan: dict[str, Any] = field(default_factory=dict)
    vae: dict[str, Any] = field(default_factory=lambda: {"beta": 0.01})
    first_stage_run: str | None = None  # a finished run folder of `first_stage` to load instead of training one
    scale_factor: float | None = None  # None: measure 1/std of the encoded training set (then stored here)
    scale_images: int = 10_000  # training images encoded to measure the scale factor
    # VQ first stages: snap latents (sampled or encoded) to their nearest codes before decoding (Rombach
    # sec. 3.1); false decodes them as they are
    decode_quantized: bool = True
    unet: UNetConfig = field(default_factory=lambda: UNetConfig(channel_mult=(1, 2), attention_levels=(1,)))
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    upgrade_fields = staticmethod(upgrade_sampler_fields)
    eval_images: int = 2000  # test images used by evaluate()

    def validate(self) -> None:
        check_at_least(self, "ldm config", 1, "image_channels", "image_size", "scale_images", "eval_images")
        if self.scale_factor is not None and not self.scale_factor > 0:
            raise GenbenchError(f"ldm config: scale_factor must be > 0 (or null to measure it), got {self.scale_factor}")
        try:
            self.unet.validate()
            self.diffusion.validate()
            self.sampler.validate(self.diffusion.num_timesteps)
        except GenbenchError as e:
            raise GenbenchError(f"ldm config: {e}") from None
        if self.first_stage_run is not None:
            self.run_first_stage_config()  # the run exists, holds the right kind, fits the images
        else:
            self.first_stage_config()

    def first_stage_config(self):
        """The first stage's config: its defaults <- the overrides of the chosen kind <- the image shape."""
        cls = get_model_class(self.first_stage)
        over = dict(getattr(self, self.first_stage))
        for name in ("image_channels", "image_size"):
            if name in over and over[name] != getattr(self, name):
                raise GenbenchError(
                    f"ldm config: {self.first_stage}.{name} = {over[name]} differs from the LDM's {name} "
                    f"{getattr(self, name)}; leave it out (it comes from the dataset)"
                )
        over.update(image_channels=self.image_channels, image_size=self.image_size)
        return from_dict(cls.Config, over, where=f"ldm config: {self.first_stage}")

    def run_first_stage_config(self):
        """(model folder, config) of the first stage in `first_stage_run`, checked against this LDM."""
        folder = first_stage_folder(self.first_stage_run)
        cls, cfg = read_pretrained_config(folder)
        if cls.name != self.first_stage:
            raise GenbenchError(
                f"ldm config: first_stage_run {self.first_stage_run!r} holds a {cls.name!r} model, "
                f"but first_stage is {self.first_stage!r} (set first_stage={cls.name} or point at a "
                f"{self.first_stage} run)"
            )
        theirs, ours = (cfg.image_channels, cfg.image_size), (self.image_channels, self.image_size)
        if theirs != ours:
            raise GenbenchError(
                f"ldm config: first_stage_run {self.first_stage_run!r} was trained on {theirs[0]}x{theirs[1]}x{theirs[1]} "
                f"images, this dataset has {ours[0]}x{ours[1]}x{ours[1]}"
            )
        return folder, cfg


def first_stage_folder(run: str) -> Path:
    """The exported model folder of a finished run (`<run>/model`), or `run` itself if it is one."""
    folder = pretrained_folder(run)
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    raise GenbenchError(
        f"ldm config: first_stage_run {run!r} is not a finished run folder: it holds no exported model "
        "(config.json and model.safetensors, directly or in model/); finish its training with "
        "`genbench train ... --resume`"
    )


def vector_grid(dim: int) -> tuple[int, int, int]:
    """Layout (dim / k^2, k, k) of a vector latent, k the largest of 4, 3, 2, 1 with k^2 | dim."""
    k = next(k for k in (4, 3, 2, 1) if dim % (k * k) == 0)
    return dim // (k * k), k, k


@register("ldm")
class LDM(GenerativeModel):
    Config = LDMConfig
    FAMILY = {"latent": "continuous latent grid of a frozen autoencoder (a KL-regularised VAE, or VQ "
                        "pre-quantization), scaled to unit std; T-step Gaussian denoising chain there, decoded once"}
    stages = ("first_stage", "diffusion")
    has_reconstruction = True
    has_latent_space = True
    has_sampler = True

    def __init__(self, config: LDMConfig):
        super().__init__()
        config = copy.deepcopy(config)  # a loaded first stage fills in its config below
        config.validate()
        self._first_stage_source: Path | None = None
        if config.first_stage_run is not None:
            # the run's architecture becomes this model's own record of its first stage, so the
            # exported model needs nothing outside its folder (run.json keeps the path)
            self._first_stage_source, fs_cfg = config.run_first_stage_config()
            setattr(config, config.first_stage, to_dict(fs_cfg))
            config.first_stage_run = None
            self.stages = ("diffusion",)  # the trainer reads the instance's stages: nothing to train first
        else:
            fs_cfg = config.first_stage_config()
        self.config = config
        self.first_stage = get_model_class(config.first_stage)(fs_cfg)
        for name in UNUSED_SUBMODULES:
            if isinstance(getattr(self.first_stage, name, None), nn.Module):
                setattr(self.first_stage, name, None)
        if not self.first_stage.has_latent_space:
            raise GenbenchError(f"ldm config: first_stage {config.first_stage!r} has no continuous latent space")
        self.first_stage_train_stage = self.first_stage.stages[0]  # its autoencoder stage
        with torch.no_grad(), eval_mode(self.first_stage):
            probe = torch.zeros(1, config.image_channels, config.image_size, config.image_size)
            self.first_stage_latent_ndim = self.first_stage.encode_latents(probe).ndim - 1
            self.latent_shape: tuple[int, ...] = tuple(self.first_stage_encode(probe).shape[1:])
        self.unet = UNet(config.unet, self.latent_shape[0])
        self.unet._padding(*self.latent_shape[1:])  # a latent too small for the U-Net's levels: fail now
        self.diffusion = GaussianDiffusion(config.diffusion)
        scale = config.scale_factor
        self.register_buffer("latent_scale", torch.tensor(1.0 if scale is None else float(scale)))
        self.register_buffer("latent_scale_set", torch.tensor(scale is not None))

    # ------------------------------------------------------------------ the first stage's latents

    def first_stage_encode(self, x: Tensor, sample: bool = False) -> Tensor:
        """Unscaled latents (B, *latent_shape) of images x in [0, 1]: the first stage's continuous
        latents (encode_latents: a VQ model's pre-quantization E(x), the VAE's posterior mean or, with
        `sample`, a draw z ~ q(z|x)); a vector latent is laid out as a grid (see vector_grid)."""
        z = self.first_stage.encode_latents(x, sample=sample)
        if z.ndim == 2:
            c, h, w = vector_grid(z.shape[1])
            z = rearrange(z, "b (c h w) -> b c h w", c=c, h=h, w=w)
        return z

    def first_stage_decode(self, z: Tensor) -> Tensor:
        """Images in [0, 1] from unscaled latents: the first stage's decode_latents (for VQ models the
        nearest codes, then the decoder, exactly their own reconstruction path)."""
        if self.first_stage_latent_ndim == 1:
            z = rearrange(z, "b c h w -> b (c h w)")
        if self.config.first_stage in ("vqvae", "vqgan") and not self.config.decode_quantized:
            return self.first_stage.decode_latents(z, quantize=False)
        return self.first_stage.decode_latents(z)

    def _require_scale(self) -> None:
        if not bool(self.latent_scale_set):
            raise GenbenchError(
                "ldm: the latent scale factor is not measured yet; train the model (or call "
                "prepare_stage('diffusion', train_images)), or set scale_factor in the config"
            )

    def encode(self, x: Tensor) -> Tensor:
        """Images (B, C, S, S) -> the diffusion's latents s * E(x) (deterministic)."""
        self._require_scale()
        return self.first_stage_encode(x).float() * self.latent_scale

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents -> images in [0, 1]: the scale is inverted, then the first stage decodes."""
        self._require_scale()
        return self.first_stage_decode(z / self.latent_scale)

    def encode_latents(self, x: Tensor, sample: bool = False) -> Tensor:
        """The LDM's latent space is the scaled first-stage latent the diffusion runs in."""
        return self.encode(x)

    def decode_latents(self, z: Tensor) -> Tensor:
        return self.decode(z)

    # ------------------------------------------------------------------ training

    def check_stage(self, stage: str) -> None:
        if stage == "first_stage" and self._first_stage_source is not None:
            raise GenbenchError(f"ldm: unknown stage {stage!r}; stages are {list(self.stages)} "
                                f"(the first stage is loaded from {self._first_stage_source}, not trained)")
        super().check_stage(stage)

    def optimizer_groups(self, stage: str = "diffusion") -> dict[str, list[nn.Parameter]]:
        self.check_stage(stage)
        if stage == "diffusion":
            return {"main": list(self.unet.parameters())}
        return self.first_stage.optimizer_groups(self.first_stage_train_stage)

    @torch.no_grad()
    def prepare_stage(self, stage: str, train_images: Tensor) -> None:
        """first_stage: the first stage's own preparation (e.g. the VQ codebook's k-means++
        initialisation). diffusion: copy the weights of `first_stage_run` if it was given, then
        measure the latent scale factor s = 1 / std of the latents of up to `scale_images` random
        training images (global RNG)."""
        self.check_stage(stage)
        if stage == "first_stage":
            self.first_stage.prepare_stage(self.first_stage_train_stage, train_images)
            return
        if self._first_stage_source is not None:
            self._load_first_stage(self._first_stage_source)
        self.first_stage.eval()
        if self.config.scale_factor is not None:
            return  # fixed in the config (or measured before and recorded there)
        pick = torch.randperm(train_images.shape[0], device=train_images.device)[: self.config.scale_images]
        z = torch.cat([self.first_stage_encode(x, sample=True).float() for x in train_images[pick].split(500)])
        std = z.std(correction=0)  # Rombach sec. 4.3.2: sigma_hat^2 = 1/(bchw) sum (z - mu_hat)^2
        if not torch.isfinite(std) or std < 1e-8:
            raise GenbenchError(
                f"ldm: the first stage's latents of the training images have std {float(std):.3g}; "
                "the encoder is degenerate (train the first stage longer or check its run)"
            )
        self.latent_scale.fill_(1.0 / std)
        self.latent_scale_set.fill_(True)
        self.config.scale_factor = float(self.latent_scale)

    def _load_first_stage(self, folder: Path) -> None:
        """Copy the first stage's weights from an exported model folder (hash-checked by from_pretrained)."""
        loaded = GenerativeModel.from_pretrained(folder)
        state = {k: v for k, v in loaded.state_dict().items() if k.split(".")[0] not in UNUSED_SUBMODULES}
        load_state(self.first_stage, state, folder / "model.safetensors")

    @classmethod
    def schedule_sets(cls, config, k: float) -> list[str]:
        """A first stage trained here keeps its own schedule, stretched like its steps."""
        if config.first_stage_run is not None:
            return []
        fs = config.first_stage_config()
        return [f"{config.first_stage}.{item}" for item in get_model_class(config.first_stage).schedule_sets(fs, k)]

    def flops_phase(self, stage: str, step: int) -> int:
        if stage == "first_stage":
            return self.first_stage.flops_phase(self.first_stage_train_stage, step)
        return 0

    def loss(self, batch: Tensor, step: int = 0, stage: str = "diffusion") -> dict[str, Tensor]:
        self.check_stage(stage)
        if stage == "first_stage":
            return self.first_stage.loss(batch, step=step, stage=self.first_stage_train_stage)
        with torch.no_grad():  # the first stage is frozen
            if self.first_stage.training:
                self.first_stage.eval()
            z = self.first_stage_encode(batch, sample=True).float() * self.latent_scale
        return {"loss": self.diffusion.training_loss(self.unet, z), "latent_std": z.std().detach()}

    @torch.no_grad()
    def finish_training(self, train_images: Tensor) -> None:
        """Record the measured scale factor in the config too (a resumed run measured it in an
        earlier process: the buffer, restored from the checkpoint, is the source of truth)."""
        if bool(self.latent_scale_set):
            self.config.scale_factor = float(self.latent_scale)

    # ------------------------------------------------------------------ sampling and evaluation

    @torch.no_grad()
    def sample_latents(self, n: int, generator: torch.Generator | None = None,
                       callback: samplers.StepCallback | None = None) -> Tensor:
        """n scaled latents from the reverse process (config sampler), no x0 clipping; `callback(t, z_t,
        z0_hat)` sees each step."""
        self._require_scale()
        with eval_mode(self):
            return samplers.sample(self.diffusion, self.unet, (n, *self.latent_shape), self.config.sampler,
                                   generator=generator, clip_x0=None, device=self.latent_scale.device,
                                   callback=callback)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None,
               callback: samplers.StepCallback | None = None) -> Tensor:
        """n images in [0, 1]: latents from the reverse process, unscaled, (quantized,) decoded."""
        return self.diffusion_to_images(self.sample_latents(n, generator, callback))

    @torch.no_grad()
    def diffusion_to_images(self, z: Tensor) -> Tensor:
        """Scaled latents (the diffusion's space) -> decoded images in [0, 1]."""
        with eval_mode(self):
            return self.decode(z)

    @torch.no_grad()
    def evaluate(self, test_images: Tensor, generator: torch.Generator | None = None, batch_size: int = 500) -> dict:
        """Reconstruction error through the first stage, latent statistics, held-out diffusion loss."""
        c = self.config
        x = test_images[: c.eval_images]
        sq_err, zs, losses = 0.0, [], []
        with eval_mode(self):
            for xb in x.split(batch_size):
                z = self.encode(xb)
                sq_err += float((self.decode(z) - xb).pow(2).sum())
                losses.append(self.diffusion.training_loss(self.unet, z, generator=generator) * len(xb))
                zs.append(z)
        z = torch.cat(zs)
        latent_dims = math.prod(self.latent_shape)
        return {
            "bits_per_dim": None,
            "bpd_estimator": (
                "not defined: the diffusion bound is on continuous rescaled latents, not a probability of 8-bit "
                "pixels, and the first stage's decoder is deterministic"
            ),
            "first_stage": c.first_stage,
            "first_stage_recon_mse": sq_err / x.numel(),
            "latent_shape": "x".join(map(str, self.latent_shape)),
            "latent_dims_per_pixel": latent_dims / test_images[0].numel(),
            "latent_scale": float(self.latent_scale),
            "test_latent_mean": float(z.mean()),
            "test_latent_std": float(z.std()),
            "test_diffusion_loss": float(sum(losses) / len(x)),
            "sampler": f"{c.sampler.describe(c.diffusion.num_timesteps)}, in latent space, no clipping",
        }
