"""PatchGAN discriminator (the network; its losses are in genbench.core.losses).

PatchGAN (Isola et al. 2017, "Image-to-Image Translation with Conditional Adversarial Networks",
sec. 3.2.2; the NLayerDiscriminator of taming-transformers): instead of one real/fake logit per
image, a fully convolutional net gives one logit per overlapping patch, so the adversarial loss
judges local texture and sharpness while L1/perceptual terms take care of global structure:

    conv4x4 s2 -> LeakyReLU(0.2)
    (n_layers - 1) x [conv4x4 s2 -> norm -> LeakyReLU(0.2)]     width x min(2^i, 8) channels
    conv4x4 s1 -> norm -> LeakyReLU(0.2)
    conv4x4 s1 -> 1 channel                                      (B, 1, h, w) patch logits

Tiny images: every conv4x4 with padding 1 shrinks the map (stride 2 halves it, stride 1 takes 1
off), which leaves nothing of an 8x8 digit after four layers. So a layer whose output would fall
below 2x2 is replaced by a size-preserving conv3x3 stride 1 (padding 1): the depth (n_layers) and
widths stay as configured, only the downsampling stops. 8x8 with n_layers=2: 8 -> 4 -> 2 -> 2 -> 2
(2x2 patch logits); 28x28 with n_layers=2: 28 -> 14 -> 7 -> 6 -> 5 (5x5 patch logits).

Normalisation: GroupNorm (default) or none. BatchNorm, taming's default, is not offered: its
statistics mix real and fake images within a batch (a cue the discriminator can exploit), its
running statistics would be updated by every discriminator pass, including those made only for
the generator's loss, and with a handful of 2x2 maps its batch statistics are noisy.

The losses that train it (hinge / vanilla) and VQ-GAN's adaptive weight are in genbench.core.losses.
"""

from __future__ import annotations

import math
from typing import Literal

from torch import Tensor, nn

from genbench.errors import GenbenchError

DISC_NORMS = ("group", "none")
MIN_PATCH_MAP = 2  # smallest side a layer may shrink the map to


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    return nn.GroupNorm(math.gcd(32, channels), channels)  # 32 groups (Wu & He 2018) when they divide


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class PatchDiscriminator(nn.Module):
    """Patch logits (B, 1, h, w) for images (B, C, S, S) in [0, 1] (centred to [-1, 1] inside)."""

    def __init__(self, in_channels: int, image_size: int, width: int = 64, n_layers: int = 3,
                 norm: Literal["group", "none"] = "group"):
        super().__init__()
        if in_channels < 1 or image_size < 1 or width < 1 or n_layers < 1:
            raise GenbenchError(
                f"PatchDiscriminator: in_channels, image_size, width and n_layers must be >= 1, got "
                f"{in_channels}, {image_size}, {width}, {n_layers}"
            )
        if norm not in DISC_NORMS:
            raise GenbenchError(f"PatchDiscriminator: norm must be one of {DISC_NORMS}, got {norm!r}")
        size = image_size
        self.strides: list[int] = []  # per conv, for the docs/tests: 2, 1 (conv4x4) or 0 (conv3x3 s1)

        def conv(c_in: int, c_out: int, stride: int, bias: bool) -> nn.Conv2d:
            nonlocal size
            out = _conv_out(size, 4, stride, 1)
            if out >= min(MIN_PATCH_MAP, size):
                size = out
                self.strides.append(stride)
                return nn.Conv2d(c_in, c_out, 4, stride=stride, padding=1, bias=bias)
            self.strides.append(0)  # too small to shrink further: size-preserving conv3x3
            return nn.Conv2d(c_in, c_out, 3, stride=1, padding=1, bias=bias)

        # the conv before a norm layer has no bias: the norm's shift replaces it
        bias = norm == "none"
        layers: list[nn.Module] = [conv(in_channels, width, 2, True), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [conv(width * prev, width * mult, 2, bias), _norm(norm, width * mult), nn.LeakyReLU(0.2)]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [conv(width * prev, width * mult, 1, bias), _norm(norm, width * mult), nn.LeakyReLU(0.2)]
        layers.append(conv(width * mult, 1, 1, True))
        self.net = nn.Sequential(*layers)
        self.output_size = size
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x * 2 - 1)


def _init_weights(m: nn.Module) -> None:
    """DCGAN / taming init: conv weights N(0, 0.02), norm scales N(1, 0.02), zero shifts."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.GroupNorm):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
