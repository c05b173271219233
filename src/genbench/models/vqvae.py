"""VQ-VAE (van den Oord et al. 2017, "Neural Discrete Representation Learning") with a transformer prior.

Two stages, trained one after the other by the shared trainer (each checkpointed and resumable):

1. "autoencoder": a conv encoder maps x (B, C, S, S) to a grid z_e (B, D, S/f, S/f); every vector
   is replaced by its nearest code e_k of a K-entry codebook (genbench.models.quantizer); a conv
   decoder maps the codes back to an image. Loss (van den Oord 2017 eq. 3, with the reconstruction
   term as a per-pixel MSE divided by the training-data variance, as in the Sonnet/DeepMind example):

       L = ||x - dec(z_q)||^2 / Var(x)  +  ||sg[z_e] - e||^2 (gradient codebook only)  +  beta ||z_e - sg[e]||^2

   The codebook is updated by EMA, initialised by k-means++ on encoder outputs (prepare_stage) and
   kept alive by dead-code restarts; batch perplexity and usage are logged every step.
2. "prior": the autoencoder is frozen; each batch is encoded to code indices under no_grad and a
   causal transformer (genbench.models.transformer) learns p(z) = prod_t p(z_t | z_<t) over the
   raster-scanned grid (the paper used a PixelCNN here).

Sampling draws a code grid from the prior (temperature / top_k from the config) and decodes it.

Likelihood (evaluate): with the deterministic encoder as posterior q(z|x) = 1[z = z*(x)], the ELBO
is log p(x) >= log p(z*) + log P(x | z*) (van den Oord 2017 sec. 3.1: the KL term reduces to the
prior's NLL of the chosen codes). P(x|z) is a discretized Gaussian over the 256 8-bit levels (the
VAE's and DDPM's convention) centred at the decoder output, with one std per channel fitted by
maximum likelihood on training images in finish_training (the decoder itself was trained with
MSE, which fixes the mean but not the variance). Bits/dim = -ELBO / (C H W ln 2), an upper bound
on the model's negative log-likelihood; "bpd_assumptions" in the result says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..config import check_at_least
from ..core.gaussian import discretized_gaussian_log_likelihood
from ..core.quantizer import QuantizerConfig, VectorQuantizer, codebook_stats, histogram_stats
from ..errors import GenbenchError
from ..nets.autoencoders import GridDecoder, GridEncoder
from ..nets.transformer import TransformerConfig, TransformerPrior
from .base import GenerativeModel, register


@dataclass
class VQVAEConfig:
    kind: ClassVar[str] = "vqvae"  # names the config in its error messages
    image_channels: int = 1
    image_size: int = 8
    downsample: int = 2  # f: the code grid is (S/f) x (S/f); a power of 2 (1 = no downsampling)
    width: int = 64  # conv channels at the code grid; halved per 2x finer level (min 8)
    n_res_blocks: int = 2
    # quantizer (genbench.core.quantizer.QuantizerConfig)
    codebook_size: int = 512
    code_dim: int = 64
    beta: float = 0.25
    codebook_update: Literal["ema", "gradient"] = "ema"
    ema_decay: float = 0.99
    codebook_init: Literal["kmeans++", "random", "uniform"] = "kmeans++"
    dead_code_steps: int = 200
    init_images: int = 1024  # training images whose encoder outputs initialise the codebook
    # prior (genbench.nets.transformer.TransformerConfig)
    prior_layers: int = 4
    prior_heads: int = 4
    prior_embd: int = 128
    prior_dropout: float = 0.0
    temperature: float = 1.0  # sampling: logits / temperature (0 = greedy)
    top_k: int = 0  # sampling: keep the k most likely codes per step (0 = all)
    fit_images: int = 2000  # training images used to fit the decoder std in finish_training

    def validate(self) -> None:
        where = f"{self.kind} config"
        check_at_least(self, where, 1, "image_channels", "image_size", "downsample", "width", "codebook_size",
                       "code_dim", "init_images", "prior_layers", "prior_heads", "prior_embd", "fit_images")
        check_at_least(self, where, 0, "n_res_blocks", "top_k")
        if self.downsample & (self.downsample - 1):
            raise GenbenchError(f"{where}: downsample must be a power of 2, got {self.downsample}")
        if self.image_size % self.downsample:
            raise GenbenchError(f"{where}: image_size {self.image_size} is not divisible by downsample {self.downsample}")
        if self.top_k > self.codebook_size:
            raise GenbenchError(f"{where}: top_k {self.top_k} exceeds codebook_size {self.codebook_size}")
        if self.temperature < 0:
            raise GenbenchError(f"{where}: temperature must be >= 0, got {self.temperature}")
        try:
            self.quantizer_config().validate()
            self.prior_config().validate()
        except GenbenchError as e:
            raise GenbenchError(f"{where}: {e}") from None

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample

    def quantizer_config(self) -> QuantizerConfig:
        return QuantizerConfig(
            codebook_size=self.codebook_size, code_dim=self.code_dim, beta=self.beta, update=self.codebook_update,
            ema_decay=self.ema_decay, init=self.codebook_init, dead_code_steps=self.dead_code_steps,
        )

    def prior_config(self) -> TransformerConfig:
        return TransformerConfig(
            vocab_size=self.codebook_size, block_size=self.grid_size**2, n_layer=self.prior_layers,
            n_head=self.prior_heads, n_embd=self.prior_embd, dropout=self.prior_dropout,
        )


# ----------------------------------------------------------------------------- the model

@register("vqvae")
class VQVAE(GenerativeModel):
    Config = VQVAEConfig
    stages = ("autoencoder", "prior")
    FAMILY = {"latent": "discrete code grid (S/f x S/f indices into a K-entry codebook); transformer prior "
                        "over the raster-scanned codes"}
    has_reconstruction = True
    has_latent_space = True
    has_codebook = True

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        config.validate()
        self.config = config
        c = config
        self.encoder = GridEncoder(c.image_channels, c.width, c.code_dim, c.downsample, c.n_res_blocks)
        self.decoder = GridDecoder(c.code_dim, c.width, c.image_channels, c.downsample, c.n_res_blocks)
        self.quantizer = VectorQuantizer(c.quantizer_config())
        self.prior = TransformerPrior(c.prior_config())
        # Var(x) of the training pixels, the scale of the reconstruction term (set in prepare_stage)
        self.register_buffer("data_variance", torch.ones(()))
        # std of the discretized Gaussian P(x|z) per channel, fitted in finish_training
        self.register_buffer("decoder_log_scale", torch.zeros(c.image_channels, 1, 1))
        self.register_buffer("decoder_scale_fitted", torch.tensor(False))

    # ------------------------------------------------------------------ encode / decode

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def encode(self, x: Tensor) -> Tensor:
        """Images (B, C, S, S) -> code indices (B, S/f, S/f)."""
        return self.quantizer.lookup(self.encoder(x))

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Code indices (B, S/f, S/f) -> images (B, C, S, S) in [0, 1]."""
        g = self.config.grid_size
        if indices.dim() != 3 or indices.shape[1:] != (g, g):
            raise GenbenchError(f"vqvae: indices must be (B, {g}, {g}), got shape {tuple(indices.shape)}")
        return self.decoder(self.quantizer.indices_to_codes(indices)).float().clamp(0, 1)

    def decode(self, indices: Tensor) -> Tensor:
        """The latent of a VQ-VAE is its code grid: same as decode_indices."""
        return self.decode_indices(indices)

    def encode_latents(self, x: Tensor, sample: bool = False) -> Tensor:
        """The continuous pre-quantization latents z_e = E(x), (B, code_dim, S/f, S/f)."""
        return self.encoder(x)

    def decode_latents(self, z: Tensor, quantize: bool = True) -> Tensor:
        """Images from continuous latents: each vector is replaced by its nearest code, then decoded
        (what a reconstruction does after the encoder; Rombach et al. 2022 sec. 3.1); with
        quantize=False the decoder reads z as it is (it was trained only on codes)."""
        if not quantize:
            return self.decoder(z).float().clamp(0, 1)
        return self.decode_indices(self.quantizer.lookup(z))

    # ------------------------------------------------------------------ training

    def optimizer_groups(self, stage: str = "autoencoder") -> dict[str, list[nn.Parameter]]:
        self.check_stage(stage)
        if stage == "prior":
            return {"main": list(self.prior.parameters())}
        params = list(self.encoder.parameters()) + list(self.decoder.parameters())
        return {"main": params + list(self.quantizer.parameters())}  # the codebook, in gradient mode

    @torch.no_grad()
    def prepare_stage(self, stage: str, train_images: Tensor) -> None:
        """autoencoder: Var(x) of the training pixels, and the codebook initialised (k-means++ by
        default) from encoder outputs of `init_images` random training images (global RNG)."""
        self.check_stage(stage)
        if stage != "autoencoder":
            return
        self.data_variance.fill_(float(train_images.float().var()))
        pick = torch.randperm(train_images.shape[0], device=train_images.device)[: self.config.init_images]
        z = torch.cat([self.encoder(x).float() for x in train_images[pick].split(512)])
        self.quantizer.init_from_data(z)

    def loss(self, batch: Tensor, step: int = 0, stage: str = "autoencoder") -> dict[str, Tensor]:
        self.check_stage(stage)
        if stage == "prior":
            return self._prior_loss(batch)
        q = self.quantizer(self.encoder(batch))
        x_hat = self.decoder(q.quantized).float()
        mse = F.mse_loss(x_hat, batch)
        loss = mse / self.data_variance + q.loss
        return {
            "loss": loss, "rec_mse": mse.detach(), "commitment": q.commitment_loss, "codebook_loss": q.codebook_loss,
            "perplexity": q.perplexity, "usage": q.usage, "window_usage": q.window_usage,
        }

    def _prior_loss(self, batch: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():  # the autoencoder is frozen: lookup() never touches the quantizer's state
            indices = self.encode(batch)
        tokens = rearrange(indices, "b h w -> b (h w)")
        nll = self.prior.loss(tokens)
        perplexity, usage = histogram_stats(torch.bincount(tokens.reshape(-1), minlength=self.config.codebook_size))
        return {"loss": nll, "prior_nll_per_token": nll.detach(), "perplexity": perplexity, "usage": usage}

    @torch.no_grad()
    def finish_training(self, train_images: Tensor) -> None:
        """Fit the per-channel std of P(x|z) by maximum likelihood on the first `fit_images`
        training images (golden-section search over log std in [log 1e-3, 0])."""
        x = train_images[: self.config.fit_images]
        means = torch.cat([self.reconstruct(b) for b in x.split(500)])
        for c in range(self.config.image_channels):
            xc, mc = x[:, c : c + 1], means[:, c : c + 1]

            def log_likelihood(log_scale: float) -> float:
                return float(discretized_gaussian_log_likelihood(xc, mc, log_scale).sum())

            self.decoder_log_scale[c] = golden_section_max(log_likelihood, math.log(1e-3), 0.0)
        self.decoder_scale_fitted.fill_(True)

    # ------------------------------------------------------------------ sampling and evaluation

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n images in [0, 1]: a code grid from the prior (config temperature / top_k), decoded."""
        c, g = self.config, self.config.grid_size
        tokens = self.prior.generate(n, g * g, temperature=c.temperature, top_k=c.top_k or None, generator=generator)
        return self.decode_indices(rearrange(tokens, "b (h w) -> b h w", h=g))

    @torch.no_grad()
    def evaluate(self, test_images: Tensor, generator: torch.Generator | None = None, batch_size: int = 500) -> dict:
        """Reconstruction MSE, codebook health and the likelihood bound on `test_images`."""
        if not bool(self.decoder_scale_fitted):
            raise GenbenchError("vqvae: the decoder std is not fitted yet; call finish_training(train_images) first")
        was_training = self.training
        self.eval()
        sq_err, prior_nll, dec_nll, all_idx = 0.0, [], [], []
        for x in test_images.split(batch_size):
            idx = self.encode(x)
            x_hat = self.decode_indices(idx)
            sq_err += float((x_hat - x).pow(2).sum())
            prior_nll.append(self.prior.nll(rearrange(idx, "b h w -> b (h w)")))
            dec_nll.append(-discretized_gaussian_log_likelihood(x, x_hat, self.decoder_log_scale))
            all_idx.append(idx)
        self.train(was_training)
        prior_nll, dec_nll = torch.cat(prior_nll).double(), torch.cat(dec_nll).double()
        n_tokens, dims = self.config.grid_size**2, test_images[0].numel()
        stats = codebook_stats(torch.cat(all_idx), self.config.codebook_size)
        to_bpd = 1.0 / (dims * math.log(2))
        return {
            "recon_mse": sq_err / test_images.numel(),
            "codebook_usage": stats["usage"],
            "codebook_perplexity": stats["perplexity"],
            "prior_nll_nats": prior_nll.mean().item(),
            "prior_nll_nats_per_token": prior_nll.mean().item() / n_tokens,
            "uniform_prior_nats_per_token": math.log(self.config.codebook_size),
            "decoder_nll_nats": dec_nll.mean().item(),
            "decoder_std": [math.exp(s) for s in self.decoder_log_scale.flatten().tolist()],
            "prior_bits_per_dim": prior_nll.mean().item() * to_bpd,
            "bits_per_dim": (prior_nll + dec_nll).mean().item() * to_bpd,
            "bpd_estimator": "ELBO with the deterministic encoder as posterior: -log p(z*) - log P(x|z*)",
            "bpd_assumptions": (
                "upper bound on NLL: q(z|x) = 1[z = encoder code grid z*], so KL = -log p_prior(z*) "
                "(van den Oord 2017 sec. 3.1); P(x|z) = discretized Gaussian over 256 8-bit levels "
                "(as VAE/DDPM) centred at the clamped decoder output, per-channel std fitted by maximum "
                "likelihood on training images after training (decoder trained with MSE); "
                f"D = {dims} dims per image"
            ),
        }


def golden_section_max(f, lo: float, hi: float, iters: int = 30) -> float:
    """argmax of a unimodal f on [lo, hi] by golden-section search (interval shrinks by 0.618 per step)."""
    inv_phi = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc > fd:
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = f(d)
    return (a + b) / 2
