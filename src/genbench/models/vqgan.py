"""VQ-GAN (Esser et al. 2021, "Taming Transformers for High-Resolution Image Synthesis").

A VQ-VAE (genbench.models.vqvae: same encoder, decoder, vector quantizer, transformer prior, two
stages, sampling and likelihood bound) whose autoencoder is trained to look right rather than to
average: the reconstruction term becomes L1 + a perceptual distance, and a PatchGAN
discriminator adds an adversarial term whose weight adapts to the reconstruction gradient.

Stage "autoencoder" (two optimizers, "main" = encoder + quantizer + decoder, "disc" = PatchGAN):

    L_rec  = |x - x^|_1 (or L2, mean per pixel) + w_p * d_perc(x, x^)         (taming's "nll")
    L_G    = L_rec + L_vq + lambda * f * g_loss(D(x^))                         (Esser 2021 eq. 5-6)
    L_D    = f * d_loss(D(x), D(sg[x^]))                                       (hinge by default)
    lambda = disc_weight * clamp(||grad_{G_L} L_rec|| / (||grad_{G_L} g_loss|| + 1e-4), 0, 1e4)  (eq. 7)
    f      = disc_factor from step `disc_start` on, 0 before

with G_L the weight of the decoder's last conv and L_vq the quantizer's codebook/commitment loss.
Before `disc_start` the discriminator is not run at all and "loss_disc" is a zero that reaches none
of its parameters, so their gradients stay None and AdamW leaves them (and its moments) untouched:
the discriminator starts from its initialisation, with a fresh Adam, at `disc_start`.

d_perc is genbench.core.losses.lpips_distance on genbench.nets.perceptual's small VGG, trained by
self-supervised rotation prediction on the training images (ImageNet VGG weights are not available
offline) - a different network and objective from the evaluation classifier (genbench.nets.classifier). It is
trained (or loaded from its cache) in prepare_stage and kept outside the module tree, so it is
neither trained nor saved with the model; buffers record which network was used (sha256 of its
weights and of the images it was trained on), and a resumed run reloads it from the cache and
checks that hash. `perceptual_weights_path` plugs in a user's weights instead (same architecture).

Stage "prior", sampling, finish_training and the bits/dim bound are the VQ-VAE's, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import check_at_least
from ..core.losses import adaptive_weight, discriminator_loss, generator_loss
from ..errors import GenbenchError
from ..nets.discriminator import PatchDiscriminator
from ..nets.perceptual import (PerceptualNetConfig, PerceptualNetwork, cache_entry, get_perceptual_network,
                               load_cached, load_perceptual_weights)
from .base import register
from .vqvae import VQVAE, VQVAEConfig


@dataclass
class VQGANConfig(VQVAEConfig):
    kind: ClassVar[str] = "vqgan"
    # PatchGAN discriminator (genbench.nets.discriminator)
    disc_width: int = 64
    disc_layers: int = 3
    disc_norm: Literal["group", "none"] = "group"
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    disc_start: int = 0  # autoencoder-stage step at which the adversarial terms switch on
    disc_weight: float = 0.8  # multiplies the adaptive weight (taming-transformers' configs use 0.8)
    disc_factor: float = 1.0  # f: scales L_D and the generator's adversarial term once switched on
    # reconstruction and perceptual terms
    rec_loss: Literal["l1", "l2"] = "l1"
    perceptual_weight: float = 1.0  # 0 disables the perceptual term (no perceptual network needed)
    perceptual_weights_path: str = ""  # plug-in safetensors weights for genbench.nets.perceptual.PerceptualVGG

    def validate(self) -> None:
        super().validate()
        check_at_least(self, "vqgan config", 1, "disc_width", "disc_layers")
        check_at_least(self, "vqgan config", 0, "disc_start", "disc_weight", "disc_factor", "perceptual_weight")


@register("vqgan")
class VQGAN(VQVAE):
    Config = VQGANConfig
    FAMILY = {
        "latent": "discrete code grid (S/f x S/f indices into a K-entry codebook) like VQ-VAE; decoder trained "
                  "with L1 + perceptual (self-supervised rotation-prediction VGG, not the evaluation network) "
                  "+ adaptive-weight PatchGAN hinge loss; transformer prior over the raster-scanned codes"
    }

    def __init__(self, config: VQGANConfig):
        super().__init__(config)
        c = config
        self.discriminator = PatchDiscriminator(c.image_channels, c.image_size, c.disc_width, c.disc_layers,
                                                c.disc_norm)
        # which perceptual network trained this model: raw sha256 digests (zeros: none yet) and its
        # held-out rotation accuracy (NaN for plug-in weights or none)
        self.register_buffer("perceptual_weights_sha256", torch.zeros(32, dtype=torch.uint8))
        self.register_buffer("perceptual_images_sha256", torch.zeros(32, dtype=torch.uint8))
        self.register_buffer("perceptual_accuracy", torch.tensor(float("nan")))
        self._perceptual: PerceptualNetwork | None = None  # not an nn.Module: outside state_dict

    # ------------------------------------------------------------------ perceptual network

    @property
    def last_layer(self) -> Tensor:
        """G_L of eq. 7: the weight of the decoder's output conv."""
        layer = self.decoder.net[-1]
        if not isinstance(layer, nn.Conv2d):
            raise GenbenchError(f"vqgan: expected the decoder to end in a Conv2d, found {type(layer).__name__}")
        return layer.weight

    def set_perceptual_network(self, net: PerceptualNetwork) -> None:
        """Use `net` for the perceptual term and record its identity in the buffers."""
        if net.model.config.in_channels != self.config.image_channels:
            raise GenbenchError(
                f"vqgan: the perceptual network takes {net.model.config.in_channels} channel(s), "
                f"the images have {self.config.image_channels}"
            )
        self.perceptual_weights_sha256.copy_(_digest(net.weights_sha256))
        self.perceptual_images_sha256.copy_(_digest(net.images_sha256))
        self.perceptual_accuracy.fill_(float("nan") if net.rotation_accuracy is None else net.rotation_accuracy)
        self._perceptual = net

    def perceptual_network(self) -> PerceptualNetwork:
        """The attached network; after a resume, reloaded (cache or plug-in file) and checked
        against the recorded sha256."""
        if self._perceptual is None:
            recorded = bytes(self.perceptual_weights_sha256.tolist()).hex()
            if not any(self.perceptual_weights_sha256.tolist()):
                raise GenbenchError(
                    "vqgan: no perceptual network attached: the autoencoder stage's prepare_stage trains or "
                    "loads it; or set perceptual_weights_path, or perceptual_weight=0 to train without it"
                )
            path = self.config.perceptual_weights_path
            if path:
                net = load_perceptual_weights(path, self.config.image_channels)
            else:
                images_sha = bytes(self.perceptual_images_sha256.tolist()).hex()
                directory = cache_entry(None, images_sha)
                net, why = load_cached(directory, images_sha, PerceptualNetConfig(self.config.image_channels))
                if net is None:
                    raise GenbenchError(
                        f"vqgan: the perceptual network this run was trained with is not in its cache {directory} "
                        f"({why}); restore the cache (GENBENCH_CACHE) or restart the run"
                    )
            if net.weights_sha256 != recorded:
                raise GenbenchError(
                    f"vqgan: perceptual network {net.directory} has weights sha256 {net.weights_sha256[:16]}, "
                    f"this run was trained with {recorded[:16]}; restore the original weights or restart the run"
                )
            self._perceptual = net
        return self._perceptual

    def perceptual_distance(self, x: Tensor, y: Tensor) -> Tensor:
        """d_perc(x, y) per image (B,); gradients flow to x and y, never into the frozen network."""
        net = self.perceptual_network()
        if net.model.head.weight.device != x.device:
            net.to(x.device)
        return net.distance(x, y)

    def perceptual_description(self) -> str:
        if self.config.perceptual_weight == 0:
            return "none (perceptual_weight = 0)"
        weights = bytes(self.perceptual_weights_sha256.tolist()).hex()
        if not any(self.perceptual_weights_sha256.tolist()):
            return "not set yet (the autoencoder stage has not started)"
        if self.config.perceptual_weights_path:
            return f"user weights {self.config.perceptual_weights_path} (sha256 {weights[:16]}), LPIPS-style distance"
        images = bytes(self.perceptual_images_sha256.tolist()).hex()
        return (
            f"genbench.nets.perceptual: VGG-style CNN trained by self-supervised rotation prediction on the "
            f"training images (sha256 {images[:16]}), weights sha256 {weights[:16]}, held-out rotation "
            f"accuracy {float(self.perceptual_accuracy):.3f}; LPIPS-style distance, uniform layer weights; "
            "not the evaluation feature network"
        )

    # ------------------------------------------------------------------ training

    def optimizer_groups(self, stage: str = "autoencoder") -> dict[str, list[nn.Parameter]]:
        groups = super().optimizer_groups(stage)
        if stage == "autoencoder":
            groups["disc"] = list(self.discriminator.parameters())
        return groups

    @torch.no_grad()
    def prepare_stage(self, stage: str, train_images: Tensor) -> None:
        """The VQ-VAE's (Var(x), codebook initialisation), then the perceptual network: plug-in
        weights, or rotation-prediction training on `train_images` (cached per image hash).
        Neither touches torch's global RNG after the codebook initialisation."""
        super().prepare_stage(stage, train_images)
        if stage != "autoencoder" or self.config.perceptual_weight == 0:
            return
        if self.config.perceptual_weights_path:
            net = load_perceptual_weights(self.config.perceptual_weights_path, self.config.image_channels)
        else:
            net = get_perceptual_network(train_images.cpu())
        self.set_perceptual_network(net)

    @classmethod
    def schedule_sets(cls, config, k: float) -> list[str]:
        """The discriminator starts at the same fraction of the (scaled) autoencoder stage."""
        return [f"disc_start={round(k * config.disc_start)}"] if config.disc_start else []

    def flops_phase(self, stage: str, step: int) -> int:
        """1 once the discriminator runs (autoencoder stage, from disc_start), else 0."""
        return int(stage == "autoencoder" and step >= self.config.disc_start and self.config.disc_factor > 0)

    def loss(self, batch: Tensor, step: int = 0, stage: str = "autoencoder") -> dict[str, Tensor]:
        self.check_stage(stage)
        if stage == "prior":
            return super().loss(batch, step, stage)
        c = self.config
        q = self.quantizer(self.encoder(batch))
        x_hat = self.decoder(q.quantized).float()
        rec = F.l1_loss(x_hat, batch) if c.rec_loss == "l1" else F.mse_loss(x_hat, batch)
        zero = torch.zeros((), device=batch.device)
        perceptual = self.perceptual_distance(batch, x_hat).mean() if c.perceptual_weight > 0 else zero
        nll = rec + c.perceptual_weight * perceptual
        factor = c.disc_factor if step >= c.disc_start else 0.0
        if factor > 0:
            g_loss = generator_loss(self.discriminator(x_hat), c.disc_loss)
            # eq. 7 needs both gradients at G_L: only when a graph exists (not under no_grad / eval)
            if torch.is_grad_enabled() and x_hat.requires_grad:
                weight = adaptive_weight(nll, g_loss, self.last_layer, c.disc_weight)
            else:
                weight = zero
            # one pass over real and (detached) fake: GroupNorm is per image, so batching is exact
            logits = self.discriminator(torch.cat([batch, x_hat.detach()]))
            logits_real, logits_fake = logits.chunk(2)
            disc_loss = factor * discriminator_loss(logits_real, logits_fake, c.disc_loss)
            stats = {"disc_logits_real": logits_real.detach().mean(), "disc_logits_fake": logits_fake.detach().mean()}
        else:
            g_loss = weight = zero
            # zero with a graph that reaches no discriminator parameter: the trainer's backward
            # leaves their gradients None, so AdamW skips them (no moments, no weight decay)
            disc_loss = x_hat.sum() * 0.0 + 0.0 if x_hat.requires_grad else zero  # + 0.0: never -0.0
            stats = {"disc_logits_real": zero, "disc_logits_fake": zero}
        loss = nll + q.loss + weight * factor * g_loss
        return {
            "loss": loss, "loss_disc": disc_loss,
            "rec_loss": rec.detach(), "rec_mse": F.mse_loss(x_hat.detach(), batch), "perceptual": perceptual.detach(),
            "g_loss": g_loss.detach(), "disc_loss": disc_loss.detach(), "adaptive_weight": weight,
            "disc_factor": torch.tensor(factor, device=batch.device), **stats,
            "commitment": q.commitment_loss, "codebook_loss": q.codebook_loss,
            "perplexity": q.perplexity, "usage": q.usage, "window_usage": q.window_usage,
        }

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, test_images: Tensor, generator: torch.Generator | None = None, batch_size: int = 500) -> dict:
        """The VQ-VAE's metrics (reconstruction MSE, codebook usage/perplexity, prior NLL, bits/dim
        bound with its assumptions) plus which perceptual network trained the decoder."""
        out = super().evaluate(test_images, generator, batch_size)
        accuracy = float(self.perceptual_accuracy)
        out.update(
            perceptual_network=self.perceptual_description(),
            perceptual_weights_sha256=bytes(self.perceptual_weights_sha256.tolist()).hex(),
            perceptual_rotation_accuracy=None if accuracy != accuracy else accuracy,  # NaN -> None (JSON)
            discriminator_patch_map=self.discriminator.output_size,
        )
        return out


def _digest(hex_sha256: str) -> Tensor:
    """A hex sha256 as 32 uint8 (all zeros for "")."""
    raw = bytes.fromhex(hex_sha256) if hex_sha256 else bytes(32)
    return torch.tensor(list(raw), dtype=torch.uint8)
