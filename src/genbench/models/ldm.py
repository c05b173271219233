"""Latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models").

The diffusion process of pixel DDPM (genbench.diffusion, the same U-Net of models/unet.py) run on
the compact latents of a pretrained autoencoder instead of on pixels. Two stages, trained one after
the other by the shared trainer (each checkpointed and resumable):

1. "first_stage": an autoencoder E, D, one of genbench's own models (`first_stage`):
   - "vqvae" / "vqgan" (the VQ-regularized variant, Rombach sec. 3.1): the diffusion runs on the
     continuous pre-quantization latents z = E(x) (B, code_dim, S/f, S/f); a sampled z is quantized
     by the codebook only when decoded, x = D(q(z)) (Rombach sec. 3.1: a VQGAN "with the
     quantization layer absorbed by the decoder");
   - "vae" (the KL-regularized variant, with a small beta): z ~ q(z|x) while training, the posterior
     mean when encoding. genbench's VAE has a vector latent (D,); it is laid out as a (D/k^2, k, k)
     grid with k the largest of 4, 3, 2, 1 such that k^2 divides D. The grid is only a layout: the
     U-Net's downsampling and attention mix all entries.
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
   and, after training, in the exported config's `scale_factor`. The U-Net eps_theta(s z_t, t) is
   trained with L_simple (Ho et al. 2020 eq. 14). Each batch is encoded on the fly: caching the
   latents would need indices of the trainer's batches, and the encoder pass is part of the honest
   training cost of an LDM.

Sampling: z_T ~ N(0, I) of the latent shape -> DDIM (default) or DDPM in latent space, with no x0
clipping (latents are unbounded, unlike [-1, 1] pixels) -> z / s -> (quantize) -> decoder -> [0, 1].

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

from ..checkpoint import load_pretrained, load_state, read_json
from ..config import from_dict, to_dict
from ..diffusion import DiffusionConfig, GaussianDiffusion
from ..errors import GenbenchError
from ..gaussian import reparameterize
from ..registry import get_model_class, register
from .ddpm import _eval_mode
from .unet import UNet, UNetConfig

VQ_KINDS = ("vqvae", "vqgan")
UNUSED_SUBMODULES = ("prior",)  # a VQ model's autoregressive prior: the diffusion model replaces it

# Largest sqrt(1 / alpha_bar_T) accepted with eps-prediction. The x0 estimate
# x0 = x_t / sqrt(abar) - sqrt(1/abar - 1) eps_hat multiplies the network's error by ~1/sqrt(abar_T)
# at the first sampling step. Pixel DDPM clips x0 to [-1, 1]; unbounded latents cannot be clipped, and
# with the cosine schedule (abar_T = 2.4e-9 at T = 1000, gain 2e4) the samples of a trained LDM
# diverged to std ~3500. The linear schedule's gain is 152.
MAX_X0_GAIN = 1000.0


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
    unet: UNetConfig = field(default_factory=lambda: UNetConfig(channel_mult=(1, 2), attention_levels=(1,)))
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampler: Literal["ddim", "ddpm"] = "ddim"
    sample_steps: int = 50  # DDIM steps (the DDPM sampler always takes num_timesteps)
    eta: float = 0.0  # DDIM noise: 0 deterministic, 1 DDPM-like
    eval_images: int = 2000  # test images used by evaluate()

    def validate(self) -> None:
        for name in ("image_channels", "image_size", "scale_images", "sample_steps", "eval_images"):
            if getattr(self, name) < 1:
                raise GenbenchError(f"ldm config: {name} must be >= 1, got {getattr(self, name)}")
        if self.scale_factor is not None and not self.scale_factor > 0:
            raise GenbenchError(f"ldm config: scale_factor must be > 0 (or null to measure it), got {self.scale_factor}")
        if self.eta < 0:
            raise GenbenchError(f"ldm config: eta must be >= 0, got {self.eta}")
        try:
            self.unet.validate()
            self.diffusion.validate()
        except GenbenchError as e:
            raise GenbenchError(f"ldm config: {e}") from None
        T = self.diffusion.num_timesteps
        gain = float(GaussianDiffusion(self.diffusion).sqrt_recip_alphas_cumprod[-1])
        if self.diffusion.prediction == "eps" and gain > MAX_X0_GAIN:
            raise GenbenchError(
                f"ldm config: with eps-prediction this schedule's first sampling step amplifies the network's "
                f"error by 1/sqrt(alpha_bar_T) = {gain:.3g} (> {MAX_X0_GAIN:g}), and latents are not clipped "
                "like pixels; use diffusion.schedule=linear or diffusion.prediction=v"
            )
        if self.sample_steps > T:
            raise GenbenchError(f"ldm config: sample_steps ({self.sample_steps}) must be <= diffusion.num_timesteps ({T})")
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
        meta = read_json(folder / "config.json")
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
            raise GenbenchError(f"ldm config: first_stage_run: {folder / 'config.json'} is not a genbench model config")
        if meta.get("model") != self.first_stage:
            raise GenbenchError(
                f"ldm config: first_stage_run {self.first_stage_run!r} holds a {meta.get('model')!r} model, "
                f"but first_stage is {self.first_stage!r} (set first_stage={meta.get('model')} or point at a "
                f"{self.first_stage} run)"
            )
        cfg = from_dict(get_model_class(self.first_stage).Config, meta["config"], where=f"{folder / 'config.json'}: config")
        theirs, ours = (cfg.image_channels, cfg.image_size), (self.image_channels, self.image_size)
        if theirs != ours:
            raise GenbenchError(
                f"ldm config: first_stage_run {self.first_stage_run!r} was trained on {theirs[0]}x{theirs[1]}x{theirs[1]} "
                f"images, this dataset has {ours[0]}x{ours[1]}x{ours[1]}"
            )
        return folder, cfg


def first_stage_folder(run: str) -> Path:
    """The exported model folder of a finished run (`<run>/model`), or `run` itself if it is one."""
    path = Path(run)
    for folder in (path / "model", path):
        if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
            return folder
    hint = " (the run has not finished: complete it with `genbench train ... --resume`)" if (path / "run.json").exists() else ""
    raise GenbenchError(
        f"ldm config: first_stage_run {run!r} is not a finished run folder: no {path / 'model' / 'config.json'} "
        f"and model.safetensors{hint}"
    )


def vector_grid(dim: int) -> tuple[int, int, int]:
    """Layout (dim / k^2, k, k) of a vector latent, k the largest of 4, 3, 2, 1 with k^2 | dim."""
    k = next(k for k in (4, 3, 2, 1) if dim % (k * k) == 0)
    return dim // (k * k), k, k


# ----------------------------------------------------------------------------- the model

_VQ_QUICK = {"downsample": 2, "width": 32, "n_res_blocks": 1, "codebook_size": 128, "code_dim": 4,
             "dead_code_steps": 100, "init_images": 1024}
_VQ_STANDARD = {"downsample": 4, "width": 128, "n_res_blocks": 2, "codebook_size": 512, "code_dim": 4,
                "dead_code_steps": 200, "init_images": 2048}
_FIRST_STAGE_QUICK = {
    # digits 8x8, f = 2: a 4x4x4 latent (64 numbers, as many as the pixels; the compression shows on
    # larger images), codebook of 128 four-dimensional codes
    "vqvae": _VQ_QUICK,
    # the same autoencoder plus the VQ-GAN quick preset's PatchGAN (train it with
    # --set train.stages.first_stage.beta1=0.5 --set train.stages.first_stage.beta2=0.9, taming's GAN betas)
    "vqgan": {**_VQ_QUICK, "disc_width": 32, "disc_layers": 2, "disc_start": 300},
    "vae": {"arch": "mlp", "latent_dim": 16, "width": 256, "beta": 0.01},
}
_FIRST_STAGE_STANDARD = {
    # Fashion-MNIST 28x28, f = 4: a 4x7x7 latent (196 numbers for 784 pixels)
    "vqvae": _VQ_STANDARD,
    "vqgan": {**_VQ_STANDARD, "disc_width": 64, "disc_layers": 2, "disc_start": 1000},
    "vae": {"arch": "conv", "latent_dim": 64, "width": 32, "beta": 0.01},
}


# The U-Net: 32/64 channels at the latent side and half of it, two residual blocks per level,
# attention at the coarse level and in the middle. On a 4x7x7 latent (padded to 8x8) it costs
# 46 MFLOP per forward, a third of DDPM's standard pixel U-Net (147 MFLOP at 28x28), with
# 1.5x its parameters (benchmarks/bench_ldm_vs_ddpm.py).
_UNET = {"base_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 2, "attention_levels": [1],
         "num_heads": 4, "dropout": 0.1}

# Ho et al.'s linear schedule (beta 1e-4 .. 0.02, T = 1000; Rombach et al. use linear schedules too),
# not DDPM's cosine: see MAX_X0_GAIN
_DIFFUSION = {"num_timesteps": 1000, "schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}


@register("ldm")
class LDM(nn.Module):
    Config = LDMConfig
    FAMILY = {"latent": "continuous latent grid of a frozen autoencoder (VQ pre-quantization or VAE), "
                        "scaled to unit std; T-step Gaussian denoising chain there, decoded once"}
    stages = ("first_stage", "diffusion")
    PRESETS = {
        # digits: a 4x4x4 latent, U-Net levels 4x4 and 2x2
        "quick": {
            "model": {**_FIRST_STAGE_QUICK, "unet": _UNET, "diffusion": _DIFFUSION, "sample_steps": 50},
            "train": {
                "batch_size": 64, "log_every": 50, "ckpt_every": 500,
                "stages": {
                    # the VQ-VAE quick autoencoder recipe (no parameter EMA: the codebook is a buffer)
                    "first_stage": {"steps": 800, "batch_size": 128, "lr": 2e-3, "warmup_steps": 50,
                                    "lr_schedule": "cosine"},
                    # DDPM's quick recipe
                    "diffusion": {"steps": 1500, "batch_size": 48, "lr": 1e-3, "warmup_steps": 100,
                                  "grad_clip": 1.0, "ema_decay": 0.995, "bf16": True},
                },
            },
        },
        # Fashion-MNIST: a 4x7x7 latent, U-Net levels 8x8 (padded) and 4x4; the diffusion stage uses
        # DDPM's standard training recipe (steps, batch, lr, EMA); the schedule is linear (see MAX_X0_GAIN)
        "standard": {
            "model": {**_FIRST_STAGE_STANDARD, "unet": _UNET, "diffusion": _DIFFUSION, "sample_steps": 50},
            "train": {
                "batch_size": 64, "log_every": 50, "ckpt_every": 500,
                "stages": {
                    # the VQ-VAE standard autoencoder recipe
                    "first_stage": {"steps": 2000, "batch_size": 128, "lr": 1e-3, "warmup_steps": 100,
                                    "lr_schedule": "cosine", "log_every": 100},
                    "diffusion": {"steps": 2000, "lr": 1e-3, "warmup_steps": 200, "grad_clip": 1.0,
                                  "ema_decay": 0.995, "bf16": True},
                },
            },
        },
    }
    # the VQ models' grid per dataset: 7x7 for 28x28 images, 4x4 for 8x8 digits
    DATASET_PRESETS = {
        ("quick", "fashion-mnist"): {"model": {"vqvae": {"downsample": 4}, "vqgan": {"downsample": 4}}},
        ("quick", "mnist"): {"model": {"vqvae": {"downsample": 4}, "vqgan": {"downsample": 4}}},
        ("standard", "digits"): {"model": {"vqvae": {"downsample": 2}, "vqgan": {"downsample": 2}}},
    }

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
        fs_stages = tuple(getattr(self.first_stage, "stages", ("main",)))
        self.first_stage_train_stage = fs_stages[0]  # its autoencoder stage
        with torch.no_grad(), _eval_mode(self.first_stage):
            probe = torch.zeros(1, config.image_channels, config.image_size, config.image_size)
            self.latent_shape: tuple[int, ...] = tuple(self.first_stage_encode(probe).shape[1:])
        self.unet = UNet(config.unet, self.latent_shape[0])
        self.unet._padding(*self.latent_shape[1:])  # a latent too small for the U-Net's levels: fail now
        self.diffusion = GaussianDiffusion(config.diffusion)
        scale = config.scale_factor
        self.register_buffer("latent_scale", torch.tensor(1.0 if scale is None else float(scale)))
        self.register_buffer("latent_scale_set", torch.tensor(scale is not None))

    # ------------------------------------------------------------------ the first stage's latents

    def first_stage_encode(self, x: Tensor, sample: bool = False) -> Tensor:
        """Unscaled latents (B, *latent_shape) of images x in [0, 1]: the VQ models' pre-quantization
        E(x), or the VAE's posterior mean (a draw z ~ q(z|x) with `sample`), laid out as a grid."""
        fs = self.first_stage
        if self.config.first_stage in VQ_KINDS:
            encode = getattr(fs, "encode_latents", None)
            return encode(x) if callable(encode) else fs.encoder(x)
        mean, log_var = fs.posterior(x)
        z = reparameterize(mean, log_var) if sample else mean
        c, h, w = vector_grid(z.shape[1])
        return rearrange(z, "b (c h w) -> b c h w", c=c, h=h, w=w)

    def first_stage_decode(self, z: Tensor) -> Tensor:
        """Images in [0, 1] from unscaled latents: D(q(z)) for VQ models (nearest codes, then the
        decoder, exactly the VQ model's own reconstruction path), D(z) for the VAE."""
        fs = self.first_stage
        if self.config.first_stage in VQ_KINDS:
            decode = getattr(fs, "decode_latents", None)
            if callable(decode):
                return decode(z)
            return fs.decoder(fs.quantizer.indices_to_codes(fs.quantizer.lookup(z))).float().clamp(0, 1)
        return fs.decode(rearrange(z, "b c h w -> b (c h w)"))

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

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    # ------------------------------------------------------------------ training

    def _check_stage(self, stage: str) -> None:
        if stage not in self.stages:
            loaded = f" (the first stage is loaded from {self._first_stage_source}, not trained)" \
                if stage == "first_stage" and self._first_stage_source is not None else ""
            raise GenbenchError(f"ldm: unknown stage {stage!r}; stages are {list(self.stages)}{loaded}")

    def optimizer_groups(self, stage: str = "diffusion") -> dict[str, list[nn.Parameter]]:
        self._check_stage(stage)
        if stage == "diffusion":
            return {"main": list(self.unet.parameters())}
        groups = getattr(self.first_stage, "optimizer_groups", None)
        if callable(groups):
            return groups(self.first_stage_train_stage)
        return {"main": [p for p in self.first_stage.parameters() if p.requires_grad]}

    @torch.no_grad()
    def prepare_stage(self, stage: str, train_images: Tensor) -> None:
        """first_stage: the first stage's own preparation (e.g. the VQ codebook's k-means++
        initialisation). diffusion: copy the weights of `first_stage_run` if it was given, then
        measure the latent scale factor s = 1 / std of the latents of up to `scale_images` random
        training images (global RNG)."""
        self._check_stage(stage)
        if stage == "first_stage":
            prepare = getattr(self.first_stage, "prepare_stage", None)
            if callable(prepare):
                prepare(self.first_stage_train_stage, train_images)
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
        """Copy the first stage's weights from an exported model folder (hash-checked by load_pretrained)."""
        loaded = load_pretrained(folder)
        state = {k: v for k, v in loaded.state_dict().items() if k.split(".")[0] not in UNUSED_SUBMODULES}
        load_state(self.first_stage, state, folder / "model.safetensors")

    def loss(self, batch: Tensor, step: int = 0, stage: str = "diffusion") -> dict[str, Tensor]:
        self._check_stage(stage)
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
    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n scaled latents from the reverse process (config sampler), no x0 clipping."""
        self._require_scale()
        c = self.config
        kw = dict(generator=generator, clip_x0=None, progress=False, device=self.latent_scale.device)
        shape = (n, *self.latent_shape)
        with _eval_mode(self):
            if c.sampler == "ddim":
                return self.diffusion.ddim_sample(self.unet, shape, steps=c.sample_steps, eta=c.eta, **kw)
            return self.diffusion.ddpm_sample(self.unet, shape, **kw)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n images in [0, 1]: latents from the reverse process, unscaled, (quantized,) decoded."""
        z = self.sample_latents(n, generator)
        with _eval_mode(self):
            return self.decode(z)

    @torch.no_grad()
    def evaluate(self, test_images: Tensor, generator: torch.Generator | None = None, batch_size: int = 500) -> dict:
        """Reconstruction error through the first stage, latent statistics, held-out diffusion loss."""
        c = self.config
        x = test_images[: c.eval_images]
        sq_err, zs, losses = 0.0, [], []
        with _eval_mode(self):
            for xb in x.split(batch_size):
                z = self.encode(xb)
                sq_err += float((self.decode(z) - xb).pow(2).sum())
                losses.append(self.diffusion.training_loss(self.unet, z, generator=generator) * len(xb))
                zs.append(z)
        z = torch.cat(zs)
        latent_dims = math.prod(self.latent_shape)
        sampler = f"DDIM, {c.sample_steps} steps, eta {c.eta}" if c.sampler == "ddim" else \
            f"DDPM ancestral, {c.diffusion.num_timesteps} steps"
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
            "sampler": f"{sampler}, in latent space, no clipping",
        }
