"""Encoders and decoders of the autoencoder family.

A vector latent (AE, VAE): an MLP (enough for 8x8 digits) or a small conv net (two stride-2
stages); image sides that are not a multiple of 4 are padded on the way in and cropped on the way
out (``make_encoder`` / ``make_decoder``).

A grid latent (VQ-VAE, VQ-GAN, and LDM's VQ first stage): ``GridEncoder`` maps (B, C, S, S) to
(B, D, S/f, S/f) through log2(f) stride-2 convs and residual blocks, ``GridDecoder`` mirrors it
(van den Oord et al. 2017 sec. 4.1).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def _padded_side(size: int, factor: int = 4) -> int:
    return math.ceil(size / factor) * factor


class ConvEncoder(nn.Module):
    """x (B,C,S,S) -> (B, out_dim): conv 3x3 -> [conv 4x4/2] x2 -> linear."""

    def __init__(self, in_channels: int, image_size: int, out_dim: int, width: int = 32):
        super().__init__()
        self.image_size = image_size
        self.padded = _padded_side(image_size)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 4 * width, 4, stride=2, padding=1), nn.SiLU(),
        )
        side = self.padded // 4
        self.head = nn.Linear(4 * width * side * side, out_dim)

    def forward(self, x):
        pad = self.padded - self.image_size
        if pad:
            x = F.pad(x, (0, pad, 0, pad))
        return self.head(rearrange(self.body(x), "b c h w -> b (c h w)"))


class ConvDecoder(nn.Module):
    """z (B, latent_dim) -> (B, out_channels, S, S) unnormalised outputs (logits or means)."""

    def __init__(self, latent_dim: int, out_channels: int, image_size: int, width: int = 32):
        super().__init__()
        self.image_size = image_size
        self.padded = _padded_side(image_size)
        self.side = self.padded // 4
        self.width = width
        self.head = nn.Linear(latent_dim, 4 * width * self.side * self.side)
        self.body = nn.Sequential(
            nn.SiLU(),
            nn.ConvTranspose2d(4 * width, 2 * width, 4, stride=2, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, out_channels, 3, padding=1),
        )

    def forward(self, z):
        h = rearrange(self.head(z), "b (c h w) -> b c h w", h=self.side, w=self.side)
        x = self.body(h)
        return x[..., : self.image_size, : self.image_size]


class MLPEncoder(nn.Module):
    def __init__(self, in_channels: int, image_size: int, out_dim: int, width: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_channels * image_size * image_size, width), nn.SiLU(),
            nn.Linear(width, width), nn.SiLU(),
            nn.Linear(width, out_dim),
        )

    def forward(self, x):
        return self.net(rearrange(x, "b c h w -> b (c h w)"))


class MLPDecoder(nn.Module):
    def __init__(self, latent_dim: int, out_channels: int, image_size: int, width: int = 256):
        super().__init__()
        self.shape = (out_channels, image_size, image_size)
        self.net = nn.Sequential(
            nn.Linear(latent_dim, width), nn.SiLU(),
            nn.Linear(width, width), nn.SiLU(),
            nn.Linear(width, out_channels * image_size * image_size),
        )

    def forward(self, z):
        c, h, w = self.shape
        return rearrange(self.net(z), "b (c h w) -> b c h w", c=c, h=h, w=w)


def make_encoder(arch: str, in_channels: int, image_size: int, out_dim: int, width: int) -> nn.Module:
    return (MLPEncoder if arch == "mlp" else ConvEncoder)(in_channels, image_size, out_dim, width)


def make_decoder(arch: str, latent_dim: int, out_channels: int, image_size: int, width: int) -> nn.Module:
    return (MLPDecoder if arch == "mlp" else ConvDecoder)(latent_dim, out_channels, image_size, width)


# ----------------------------------------------------------------------------- grid latents (VQ models)


class ResBlock(nn.Module):
    """x + conv1x1(ReLU(conv3x3(ReLU(x)))) (van den Oord 2017 sec. 4.1)."""

    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.ReLU(), nn.Conv2d(width, width // 2, 3, padding=1),
            nn.ReLU(), nn.Conv2d(width // 2, width, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


def level_widths(width: int, downsample: int) -> list[int]:
    """Channels per resolution level, finest first: `width` at the code grid, halved at each 2x
    finer level (the full-resolution convs dominate the cost, so they are the narrow ones)."""
    levels = int(math.log2(downsample))
    return [max(width >> (levels - i), 8) for i in range(levels + 1)]


class GridEncoder(nn.Module):
    """(B, C, S, S) -> (B, code_dim, S/f, S/f): conv3x3, log2(f) x [ReLU, conv4x4 stride 2], res blocks, conv1x1."""

    def __init__(self, in_channels: int, width: int, code_dim: int, downsample: int, n_res_blocks: int):
        super().__init__()
        ch = level_widths(width, downsample)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ch[0], 3, padding=1)]
        for c_in, c_out in zip(ch, ch[1:]):
            layers += [nn.ReLU(), nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)]
        layers += [ResBlock(ch[-1]) for _ in range(n_res_blocks)]
        layers += [nn.ReLU(), nn.Conv2d(ch[-1], code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class GridDecoder(nn.Module):
    """(B, code_dim, S/f, S/f) -> (B, C, S, S) unbounded image means: the mirror of GridEncoder."""

    def __init__(self, code_dim: int, width: int, out_channels: int, downsample: int, n_res_blocks: int):
        super().__init__()
        ch = level_widths(width, downsample)[::-1]
        layers: list[nn.Module] = [nn.Conv2d(code_dim, ch[0], 3, padding=1)]
        layers += [ResBlock(ch[0]) for _ in range(n_res_blocks)]
        for c_in, c_out in zip(ch, ch[1:]):
            layers += [nn.ReLU(), nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)]
        layers += [nn.ReLU(), nn.Conv2d(ch[-1], out_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)
