"""Every model's training budget for every dataset, side by side: the numbers that decide a comparison.

A preset is a partial config: {"model": {...}, "train": {...}} over the model's Config defaults and
genbench.training.config.TrainConfig. `resolve_configs` (genbench.training.run) stacks, in order:
the Config defaults <- PRESETS[model][preset] <- DATASET_PRESETS[model][(preset, dataset)] <- the
image shape of the dataset <- the user's `--set` items.

- "quick": 8x8 digits on a laptop CPU; `genbench compare --preset quick` (the README's demo) trains
  all six in a few minutes on 2 cores.
- "standard": Fashion-MNIST 28x28; an hour or more per model on 2 CPU cores, minutes on a GPU
  (docs/benchmarks.md).
- ("quick", "emoji"): 3x32x32 colour emoji; the six in about 22 minutes on 2 cores (EMOJI_QUICK).

Step costs quoted below were measured on one CPU thread (docs/benchmarks.md has the machines).
"""

from __future__ import annotations

from genbench.config import merge

# ---------------------------------------------------------------------------------------------
# The conv autoencoders of the standard AE, VAE and VQ-VAE presets train in bf16 autocast on
# channels-last (NHWC) weights and batches. The trainer honours bf16 only on CUDA or CPUs with native
# bf16 (genbench.utils.bf16_effective). A training step is then about 2x cheaper than fp32 NCHW on
# an AVX-512-BF16 CPU and 2.4-2.6x with AMX (oneDNN's NCHW kernels are slow at 16-48 channels), at
# about the same quality (docs/benchmarks.md, "bf16 and channels-last"). The U-Nets stay NCHW: their
# GroupNorm is 5-12x slower on NHWC bf16 tensors in torch 2.13, which undoes the gain.
_CONV_CPU = {"bf16": True, "channels_last": True}

# ---------------------------------------------------------------------------------------------
# AE and VAE: a vector latent; MLP nets for 8x8, conv nets for 28x28

AE = {
    "quick": {"model": {"arch": "mlp", "latent_dim": 16, "width": 256},
              "train": {"steps": 1500, "batch_size": 128, "lr": 2e-3, "lr_schedule": "cosine", "log_every": 50}},
    "standard": {"model": {"arch": "conv", "latent_dim": 32, "width": 16},
                 "train": {"steps": 4000, "batch_size": 128, "lr": 1e-3, "lr_schedule": "cosine",
                           "warmup_steps": 200, "log_every": 100, "ckpt_every": 1000, **_CONV_CPU}},
}

VAE = {
    "quick": {"model": {"arch": "mlp", "latent_dim": 16, "width": 256},
              "train": {"steps": 2000, "batch_size": 128, "lr": 2e-3, "lr_schedule": "cosine",
                        "warmup_steps": 100, "grad_clip": 100.0, "log_every": 50}},
    "standard": {"model": {"arch": "conv", "latent_dim": 32, "width": 16},
                 "train": {"steps": 4000, "batch_size": 128, "lr": 1e-3, "lr_schedule": "cosine",
                           "warmup_steps": 200, "grad_clip": 100.0, "log_every": 100, "ckpt_every": 1000,
                           **_CONV_CPU}},
}

# ---------------------------------------------------------------------------------------------
# VQ-VAE: stage "autoencoder" then stage "prior"

VQVAE = {
    # digits 8x8, f=2: 4x4 grid of 16 codes from a codebook of 64
    "quick": {
        "model": {"downsample": 2, "width": 32, "n_res_blocks": 1, "codebook_size": 64, "code_dim": 16,
                  "dead_code_steps": 50, "prior_layers": 2, "prior_heads": 4, "prior_embd": 64,
                  "prior_dropout": 0.1},
        "train": {
            "batch_size": 128, "log_every": 50, "ckpt_every": 500, "lr_schedule": "cosine",
            "stages": {
                # no parameter EMA in the autoencoder stage: the codebook is a buffer (copied, not
                # averaged), so averaged encoder weights would no longer match it
                "autoencoder": {"steps": 800, "lr": 2e-3, "warmup_steps": 50},
                "prior": {"steps": 1000, "lr": 1e-3, "warmup_steps": 50, "weight_decay": 0.01, "grad_clip": 1.0},
            },
        },
    },
    # Fashion-MNIST 28x28, f=4: 7x7 grid of 49 codes from a codebook of 512 x 64; conv widths
    # 32/64/128 at 28/14/7 pixels. bf16 in both stages (the quantizer runs in float32 anyway), NHWC in
    # the autoencoder's (see _CONV_CPU); the transformer prior in bf16 is 1.7x cheaper than fp32 a step
    # since its attention takes the explicit form there (genbench.nets.attention)
    "standard": {
        "model": {"downsample": 4, "width": 128, "n_res_blocks": 2, "codebook_size": 512, "code_dim": 64,
                  "dead_code_steps": 50, "prior_layers": 4, "prior_heads": 4, "prior_embd": 128,
                  "prior_dropout": 0.0},
        "train": {
            "batch_size": 128, "log_every": 100, "ckpt_every": 500, "lr_schedule": "cosine", "bf16": True,
            "stages": {
                "autoencoder": {"steps": 1500, "lr": 1e-3, "warmup_steps": 100, **_CONV_CPU},
                "prior": {"steps": 1500, "batch_size": 64, "lr": 1e-3, "warmup_steps": 100, "weight_decay": 0.01,
                          "grad_clip": 1.0},
            },
        },
    },
}

# the code grid per dataset: 7x7 for 28x28 images, 4x4 for 8x8 digits
VQ_GRID = {
    ("quick", "fashion-mnist"): {"model": {"downsample": 4}},
    ("quick", "mnist"): {"model": {"downsample": 4}},
    ("standard", "digits"): {"model": {"downsample": 2}},
}

# ---------------------------------------------------------------------------------------------
# VQ-GAN: the VQ-VAE's autoencoder, prior and step counts (like for like), plus a PatchGAN and the
# perceptual term; taming's Adam betas for both optimizers of the autoencoder stage (a GAN needs
# short memory)

_GAN_BETAS = {"stages": {"autoencoder": {"beta1": 0.5, "beta2": 0.9}}}

VQGAN = {
    # a 2-layer PatchGAN (2x2 patch logits) switched on after 300 of 800 steps. One CPU thread, batch
    # 128: ~80 ms per step before the discriminator starts, ~150 ms after (the VQ-VAE: ~35 ms), + ~15 s
    # for the perceptual network
    "quick": {
        "model": merge(VQVAE["quick"]["model"], {"disc_width": 16, "disc_layers": 2, "disc_start": 300,
                                                 "perceptual_weight": 1.0}),
        "train": merge(VQVAE["quick"]["train"], _GAN_BETAS),
    },
    # a 2-layer PatchGAN of width 32 (5x5 patch logits) from step 1000 of 2000. One CPU thread, batch
    # 128: ~1.6 s per step before the discriminator starts, ~2.4 s after (the VQ-VAE: ~1.1 s); width
    # 64 costs 3.3 s
    # The autoencoder stage stays float32 NCHW (the prior trains in bf16, as the VQ-VAE's): in bf16 NHWC
    # it was 1.7x cheaper, but its final FD 2.14 and rFD 0.268 against 1.87 and 0.243, a larger gap
    # than the other autoencoders showed (docs/benchmarks.md, "bf16 and channels-last")
    "standard": {
        "model": merge(VQVAE["standard"]["model"], {"disc_width": 32, "disc_layers": 2, "disc_start": 1000,
                                                    "perceptual_weight": 1.0}),
        "train": merge(VQVAE["standard"]["train"],
                       merge(_GAN_BETAS, {"stages": {"autoencoder": {"bf16": False, "channels_last": False}}})),
    },
}

# ---------------------------------------------------------------------------------------------
# Diffusion samplers: DPM-Solver++(2M) (genbench.core.samplers), measured against DDIM-50 by the
# protocol's FD on the trained models (docs/benchmarks.md, "Diffusion samplers"): digits DDPM
# 20 calls FD 1.39 vs DDIM-50 1.49 (2.5x faster), LDM 10 calls 6.52 vs 6.60 (5x); Fashion-MNIST
# (5000 samples) DDPM 10 calls 3.14 vs 3.40 (4.9x), LDM 10 calls 7.66 vs 8.19 (4.5x).
# Sampling is no part of training: `--set sampler.steps=...` or `genbench sample --sampler` changes it.

# ---------------------------------------------------------------------------------------------
# DDPM. bf16 is requested; the trainer honours it only on CUDA or CPUs with native bf16
# (genbench.utils.bf16_effective)

DDPM = {
    # digits 8x8: 2 levels (8, 4), attention only in the 4x4 middle; cosine schedule suits tiny images
    "quick": {
        "model": {
            "unet": {"base_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1,
                     "attention_levels": [], "num_heads": 2, "dropout": 0.1},
            "diffusion": {"num_timesteps": 1000, "schedule": "cosine"},
            "sampler": {"name": "dpm++2m", "steps": 20}, "bpd_timesteps": 50, "bpd_images": 200,
        },
        "train": {"steps": 1500, "batch_size": 48, "lr": 1e-3, "warmup_steps": 100, "grad_clip": 1.0,
                  "ema_decay": 0.995, "bf16": True, "log_every": 50, "ckpt_every": 500},
    },
    # Fashion-MNIST 28x28: 3 levels (28, 14, 7) of 16/32/64 channels, attention at 7x7 and in the
    # middle. Narrow at full resolution on purpose: 0.44 GFLOP per training image (vs 6.6 for
    # UNetConfig()'s 64-channel (1, 2, 2) x 2-block default), so 2000 steps fit in about an hour on
    # 2 CPU cores (benchmarks/bench_unet.py). EMA 0.995 with warm-up (training.ema.EMA): the plain
    # EMA starts from the initial weights and still held 37 % of them after 200 steps (probe FD 66
    # there, 27 with warm-up; the same at 2000 steps). No dropout: on 2000 steps (two epochs) it only
    # slowed learning and each step (its RNG): FD 3.23 / 3.84 bits/dim against 3.29 / 3.90 with 0.1
    # (docs/benchmarks.md, "Time to quality ... recipes").
    "standard": {
        "model": {
            "unet": {"base_channels": 16, "channel_mult": [1, 2, 4], "num_res_blocks": 1,
                     "attention_levels": [2], "num_heads": 2, "dropout": 0.0},
            # v-prediction (Salimans & Ho 2022): with eps-prediction the cosine schedule's
            # x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) amplifies eps errors up to 2e4-fold
            # near t = T, and this preset's samples came out over-bright (FD 28.9 vs 4.2 with v,
            # 400 samples, same 2000 CPU steps; docs/benchmarks.md). Digits (quick) do well with eps.
            "diffusion": {"num_timesteps": 1000, "schedule": "cosine", "prediction": "v"},
            "sampler": {"name": "dpm++2m", "steps": 10}, "bpd_timesteps": 50, "bpd_images": 200,
        },
        "train": {"steps": 2000, "batch_size": 64, "lr": 1e-3, "warmup_steps": 200, "grad_clip": 1.0,
                  "ema_decay": 0.995, "ema_warmup": True, "bf16": True, "log_every": 50, "ckpt_every": 500},
    },
}

# ---------------------------------------------------------------------------------------------
# LDM: stage "first_stage" (an autoencoder of the kind `first_stage` names) then "diffusion"

_VQ_FIRST_STAGE_QUICK = {"downsample": 2, "width": 32, "n_res_blocks": 1, "codebook_size": 128, "code_dim": 4,
                         "dead_code_steps": 100, "init_images": 1024}
_VQ_FIRST_STAGE_STANDARD = {"downsample": 4, "width": 128, "n_res_blocks": 2, "codebook_size": 512, "code_dim": 4,
                            "dead_code_steps": 200, "init_images": 2048}
# The first stage is the KL-regularised VAE (Rombach et al. sec. 3.1, "KL-reg.", small KL weight):
# measured on both datasets against the VQ first stage (docs/benchmarks.md, "Latent diffusion that
# earns its place"), its smooth Gaussian latent is far easier to diffuse than a VQ encoder's clustered
# pre-quantization latent (digits FD 1.28 vs 2.96 with the same v-prediction diffusion). The VQ
# first stages stay available with --set first_stage=vqvae|vqgan.
_FIRST_STAGE_QUICK = {
    "first_stage": "vae",
    # digits 8x8: a 16-number latent (4x fewer numbers than pixels), laid out as 1x4x4 for the U-Net;
    # a 2x4x4 conv grid latent (2x fewer) reconstructed better (rFD 0.18 vs 0.41) but sampled no better
    "vae": {"arch": "mlp", "latent_dim": 16, "width": 256, "beta": 0.01},
    # f = 2: a 4x4x4 latent (as many numbers as the pixels), codebook of 128 four-dimensional codes
    "vqvae": _VQ_FIRST_STAGE_QUICK,
    # the same autoencoder plus the VQ-GAN quick preset's PatchGAN (train it with
    # --set train.stages.first_stage.beta1=0.5 --set train.stages.first_stage.beta2=0.9, taming's GAN betas)
    "vqgan": {**_VQ_FIRST_STAGE_QUICK, "disc_width": 32, "disc_layers": 2, "disc_start": 300},
}
_FIRST_STAGE_STANDARD = {
    "first_stage": "vae",
    # Fashion-MNIST 28x28, f = 4: a 4x7x7 Gaussian latent grid (196 numbers for 784 pixels, 4x fewer),
    # the VQ models' conv encoder/decoder at widths 16/32/64 (28/14/7 pixels): ~1,100 training
    # images/s on one thread, 10x the VQ first stage's width-128 nets
    "vae": {"arch": "grid", "downsample": 4, "latent_channels": 4, "width": 64, "n_res_blocks": 1, "beta": 0.01},
    "vqvae": _VQ_FIRST_STAGE_STANDARD,
    "vqgan": {**_VQ_FIRST_STAGE_STANDARD, "disc_width": 64, "disc_layers": 2, "disc_start": 1000},
}
# The U-Net: 32/64 channels at the latent side and half of it, two residual blocks per level,
# attention at the coarse level and in the middle. On a 4x7x7 latent (padded to 8x8) it costs
# 46 MFLOP per forward, a third of DDPM's standard pixel U-Net (147 MFLOP at 28x28), with
# 1.5x its parameters (benchmarks/bench_ldm_vs_ddpm.py).
_LDM_UNET = {"base_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 2, "attention_levels": [1],
             "num_heads": 4, "dropout": 0.1}
# v-prediction under the cosine schedule (Salimans & Ho 2022), as pixel DDPM's standard preset, with
# min-SNR-5 loss weighting (Hang et al. 2023). Measured (docs/benchmarks.md, same first stages):
# Fashion-MNIST FD 2.48 with min-SNR against 3.09 without; digits (5000 samples, two seeds) FD
# 1.49/1.28 and precision 0.90/0.93 against 1.40/1.32 and 0.86/0.89 without, eps + linear 1.75/1.68.
# No x0 clipping is needed: x0 = sqrt(abar) x_t - sqrt(1 - abar) v never amplifies the network's
# error, unlike eps's 1/sqrt(abar_T) (2e4 at the cosine schedule's end)
_LDM_DIFFUSION = {"num_timesteps": 1000, "schedule": "cosine", "prediction": "v", "loss_weighting": "min_snr",
                  "min_snr_gamma": 5.0}

LDM = {
    # digits: a 1x4x4 latent, U-Net levels 4x4 and 2x2
    "quick": {
        "model": {**_FIRST_STAGE_QUICK, "unet": _LDM_UNET, "diffusion": _LDM_DIFFUSION,
                  "sampler": {"name": "dpm++2m", "steps": 10}},
        "train": {
            "batch_size": 64, "log_every": 50, "ckpt_every": 500,
            "stages": {
                # the VQ-VAE quick autoencoder recipe (no parameter EMA: a VQ codebook is a buffer)
                "first_stage": {"steps": 800, "batch_size": 128, "lr": 2e-3, "warmup_steps": 50,
                                "lr_schedule": "cosine"},
                # DDPM's quick recipe
                "diffusion": {"steps": 1500, "batch_size": 48, "lr": 1e-3, "warmup_steps": 100,
                              "grad_clip": 1.0, "ema_decay": 0.995, "bf16": True},
            },
        },
    },
    # Fashion-MNIST: a 4x7x7 latent, U-Net levels 8x8 (padded) and 4x4
    "standard": {
        "model": {**_FIRST_STAGE_STANDARD, "unet": _LDM_UNET, "diffusion": _LDM_DIFFUSION,
                  "sampler": {"name": "dpm++2m", "steps": 10}},
        "train": {
            "batch_size": 64, "log_every": 50, "ckpt_every": 500,
            "stages": {
                # the VQ-VAE standard autoencoder recipe
                # float32 NCHW: in bf16 NHWC a tenth of the run's time was saved for 5 % worse rFD and MSE
                # (0.405 / 0.00428 against 0.385 / 0.00409; docs/benchmarks.md, "bf16 and channels-last")
                "first_stage": {"steps": 2000, "batch_size": 128, "lr": 1e-3, "warmup_steps": 100,
                                "lr_schedule": "cosine", "log_every": 100},
                # DDPM's standard recipe (batch 64, lr, EMA) for 4000 steps: the latent U-Net trains 2.7x
                # faster per image than DDPM's pixel U-Net (benchmarks/bench_ldm_vs_ddpm.py), so both
                # stages together take about DDPM's 2000 steps' time; FD 2.48 after 2000 steps, 1.66
                # after 6000 (docs/benchmarks.md)
                # EMA warm-up as DDPM's: it reaches 0.995 by step 1790, so only the early model changes
                # (probe FD 9.3 against 21.7 after 400 steps, in a run that also had a 1000-step first
                # stage and no dropout; on DDPM the warm-up alone did as much: 27.6 against 66.2 at 200)
                "diffusion": {"steps": 4000, "lr": 1e-3, "warmup_steps": 200, "grad_clip": 1.0,
                              "ema_decay": 0.995, "ema_warmup": True, "bf16": True},
            },
        },
    },
}

# ---------------------------------------------------------------------------------------------
# emoji (genbench.data.emoji): 1393 colour 3x32x32 training images, 48x the numbers of a digit. The
# quick presets' MLPs and 4x4 code grids are sized for 8x8 digits, so "quick" on emoji is its own
# entry per model: conv nets, an 8x8 code grid (f = 4), a narrow pixel U-Net, the standard presets'
# grid VAE under the LDM. The standard presets fit 3x32x32 as they are (conv nets, f = 4 grids).
#
# Sized so that `genbench compare --dataset emoji --preset quick` trains all six in about 22 minutes
# on 2 cores (two processes of one thread). CPU seconds per step below, measured with `genbench
# train MODEL --dataset emoji --preset quick` on one thread of a 2-core Xeon with AVX-512 and AMX
# (native bf16: DDPM and LDM diffusion ran in bf16), read from run.json's cpu_time_s (the wall time
# was up to 1.6x more: the core was shared). Per model (CPU s of training, without FD probes):
# AE 119, VAE 165, VQ-VAE 290, VQ-GAN ~830 (117 of them training its perceptual network, once per
# dataset), DDPM 500, LDM 355.

# 8x8 grid of 256 codes of 32 numbers, conv widths 16/32/64 at 32/16/8 pixels. 1000 autoencoder steps:
# at 600 the reconstructions lost their colours (reds and greens came out orange, training MSE 0.024
# against 0.015 at 1000). The prior: 64 tokens, 3 layers of 96, batch 64. CPU per step: autoencoder 0.14 s
# (VQ-GAN: 0.42 s before its discriminator starts, 0.65 s after), prior 0.19 s
_EMOJI_VQ = {"downsample": 4, "width": 64, "codebook_size": 256, "code_dim": 32, "prior_layers": 3,
             "prior_embd": 96}
_EMOJI_VQ_TRAIN = {"stages": {"autoencoder": {"steps": 1000}, "prior": {"steps": 800, "batch_size": 64}}}
EMOJI_QUICK = {
    # conv widths 16/32/64, a 64-number latent: 0.12 s (AE) and 0.17 s (VAE) a step of 128 images
    "ae": {"model": {"arch": "conv", "latent_dim": 64, "width": 16}, "train": {"steps": 1000}},
    "vae": {"model": {"arch": "conv", "latent_dim": 64, "width": 16}, "train": {"steps": 1000}},
    "vqvae": {"model": _EMOJI_VQ, "train": _EMOJI_VQ_TRAIN},
    # the VQ-VAE's recipe (like for like), the discriminator from step 400 of 1000
    "vqgan": {"model": {**_EMOJI_VQ, "disc_start": 400}, "train": _EMOJI_VQ_TRAIN},
    # 16/32/64 channels at 32/16/8 pixels (the Fashion-MNIST standard U-Net's widths), attention only in
    # the middle: 0.33 s a step of 64 images; self-attention at 8x8 as well cost 0.2 s more a step in
    # bf16 (0.05 s in fp32), 32/64/64 channels 2x. v-prediction, as the standard preset (see there)
    "ddpm": {"model": {"unet": {"base_channels": 16, "channel_mult": [1, 2, 4], "attention_levels": []},
                       "diffusion": {"prediction": "v"}},
             "train": {"steps": 1500, "batch_size": 64}},
    # the standard presets' grid VAE (f = 4: a 4x8x8 latent, 12x fewer numbers than the pixels), 0.17 s a
    # step of 128 images; the latent U-Net, 0.11 s a step of 48. The VQ first stages (--set
    # first_stage=...) get the VQ models' 8x8 grid
    "ldm": {"model": {"vae": {"arch": "grid", "downsample": 4, "latent_channels": 4, "width": 64, "n_res_blocks": 1,
                              "beta": 0.01}, "vqvae": {"downsample": 4}, "vqgan": {"downsample": 4}},
            "train": {"stages": {"first_stage": {"steps": 800, "lr": 1e-3}, "diffusion": {"steps": 2000}}}},
}

# ---------------------------------------------------------------------------------------------
# the tables resolve_configs reads

PRESETS: dict[str, dict[str, dict]] = {"ae": AE, "vae": VAE, "vqvae": VQVAE, "vqgan": VQGAN, "ddpm": DDPM, "ldm": LDM}

_DATASET_PRESETS: dict[str, dict[tuple[str, str], dict]] = {
    "vqvae": VQ_GRID,
    "vqgan": VQ_GRID,  # the same grid per dataset as the VQ-VAE
    # the VQ first stages' grid per dataset, as for the VQ models
    "ldm": merge(
        {key: {"model": {"vqvae": over["model"], "vqgan": over["model"]}} for key, over in VQ_GRID.items()},
        # the standard grid VAE on 8x8 digits: f = 2 (a 4x4x4 latent) rather than a 2x2 grid
        {("standard", "digits"): {"model": {"vae": {"downsample": 2}}}},
    ),
}
DATASET_PRESETS: dict[str, dict[tuple[str, str], dict]] = {
    m: {**_DATASET_PRESETS.get(m, {}), ("quick", "emoji"): EMOJI_QUICK[m]} for m in PRESETS}  # every model

# models by training cost under their presets, most expensive first (measured: digits quick,
# docs/benchmarks.md); `genbench compare` starts the most expensive first so the last to start are short
TRAIN_COST_RANK = ("ldm", "ddpm", "vqgan", "vqvae", "vae", "ae")
