"""The dataset container every loader returns, and the conversions they share."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from dataclasses import dataclass
from typing import TYPE_CHECKING

from genbench.errors import GenbenchError
from genbench.limits import check_memory
from genbench.utils import exists

if TYPE_CHECKING:
    from . import DatasetSpec


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Train/test images in [0, 1] with optional integer labels.

    ``train``/``test`` are float32 (N, C, H, W); labels, when present, are int64 (N,) in
    [0, num_classes). Shapes and dtypes are checked at construction.
    """

    name: str
    train: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None
    num_classes: int | None = None
    spec: DatasetSpec | None = None  # how load_dataset loaded it (what a run records), when it did

    def __post_init__(self):
        for split, x in (("train", self.train), ("test", self.test)):
            if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.dtype != torch.float32:
                raise GenbenchError(
                    f"ImageDataset {self.name!r}: {split} must be a float32 tensor (N, C, H, W), "
                    f"got {_describe(x)}"
                )
        if self.train.shape[1:] != self.test.shape[1:]:
            raise GenbenchError(
                f"ImageDataset {self.name!r}: train images are {tuple(self.train.shape[1:])} but "
                f"test images are {tuple(self.test.shape[1:])}"
            )
        if exists(self.train_labels) != exists(self.test_labels):
            raise GenbenchError(f"ImageDataset {self.name!r}: give labels for both splits or neither")
        if exists(self.train_labels) != exists(self.num_classes):
            raise GenbenchError(f"ImageDataset {self.name!r}: labels and num_classes go together")
        if not exists(self.train_labels):
            return
        for split, x, y in (("train", self.train, self.train_labels), ("test", self.test, self.test_labels)):
            if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise GenbenchError(
                    f"ImageDataset {self.name!r}: {split}_labels must be an int64 tensor of shape "
                    f"({x.shape[0]},), got {_describe(y)}"
                )
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise GenbenchError(
                    f"ImageDataset {self.name!r}: {split}_labels must lie in [0, {self.num_classes}), "
                    f"found range [{int(y.min())}, {int(y.max())}]"
                )

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.train.shape[1:])

    @property
    def num_pixels(self) -> int:
        """C * H * W: the dimension D used for bits/dim = NLL / (D ln 2)."""
        return math.prod(self.shape)

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, train={len(self.train)}, test={len(self.test)}, "
            f"shape={self.shape}, num_classes={self.num_classes})"
        )


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def check_positive_int(value, what: str):
    if exists(value) and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise GenbenchError(f"{what} must be a positive integer, got {value!r}")


def to_unit_tensor(pixels: np.ndarray, scale: float) -> torch.Tensor:
    """(N, H, W) or (N, C, H, W) array -> fresh float32 (N, C, H, W) tensor, divided by ``scale``."""
    x = torch.from_numpy(np.array(pixels, dtype=np.float32))  # np.array copies: never alias the memo
    if x.ndim == 3:
        x = x.unsqueeze(1)
    return x.div_(scale)


def resize(x: torch.Tensor, image_size: int | None) -> torch.Tensor:
    """Bilinear resize with antialiasing (a box-like prefilter when downsampling), clamped back
    into [0, 1]; a no-op at the native size."""
    if not exists(image_size) or x.shape[-2:] == (image_size, image_size):
        return x
    check_memory(4.0 * x.shape[0] * x.shape[1] * image_size * image_size,
                 f"image_size {image_size}: {x.shape[0]} images of {x.shape[1]}x{image_size}x{image_size} float32")
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp_(0.0, 1.0)


def labels_tensor(y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(y, dtype=np.int64))
