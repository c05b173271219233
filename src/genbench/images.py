"""Image grids as PNG (Pillow), and raw samples as .npz — no torchvision."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import GenbenchError
from .files import atomic_write_bytes


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1, min_side: int = 28) -> np.ndarray:
    """(N,C,H,W) in [0,1] -> uint8 (H', W', C) grid; tiny images are upscaled (nearest) to >= min_side."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise GenbenchError(f"images must be (N, 1|3, H, W), got shape {tuple(images.shape)}")
    x = images.detach().float().clamp(0, 1).cpu()
    n, c, h, w = x.shape
    scale = max(1, math.ceil(min_side / max(h, w)))
    if scale > 1:
        x = x.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
        h, w = h * scale, w * scale
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol_rows = math.ceil(n / nrow)
    grid = torch.full((c, ncol_rows * (h + pad) + pad, nrow * (w + pad) + pad), 0.5)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = x[i]
    arr = (grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    return arr


def png_bytes(arr: np.ndarray) -> bytes:
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    path = Path(path)
    _write(path, png_bytes(make_grid(images, nrow)))
    return path


def _write(path: Path, data: bytes) -> None:
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        raise GenbenchError(f"{path}: cannot write ({e.strerror or e})") from None


def save_images(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """`.png` -> a grid; `.npz` -> key `images`, float32 (N, C, H, W) in [0, 1]."""
    path = Path(path)
    if path.suffix.lower() == ".npz":
        buf = io.BytesIO()
        np.savez_compressed(buf, images=images.detach().float().clamp(0, 1).cpu().numpy().astype(np.float32))
        _write(path, buf.getvalue())
        return path
    if path.suffix.lower() == ".png":
        return save_grid(images, path, nrow)
    raise GenbenchError(f"{path}: output must end in .png (image grid) or .npz (raw samples)")
