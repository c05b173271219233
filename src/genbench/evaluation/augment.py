"""Whole-pixel shifts: the one augmentation both evaluation networks train with (the classifier with
zero padding, genbench.evaluation.features; the contrastive network with edges repeated,
genbench.evaluation.contrastive). No interpolation: every pixel of a shifted image is one of the image's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator, padding: str = "constant") -> torch.Tensor:
    """Translate each image by its own integer (dy, dx) in [-max_shift, max_shift]^2, filling with
    zeros (``padding="constant"``: the background of digits and Fashion-MNIST) or with the edge
    pixels repeated (``"replicate"``)."""
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode=padding)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b, 1), generator=generator)
    rows = dy + torch.arange(h)  # (B, H): source rows in the padded image
    cols = dx + torch.arange(w)
    out = padded[torch.arange(b)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return rearrange(out, "b h w c -> b c h w").contiguous()
