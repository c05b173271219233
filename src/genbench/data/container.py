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
from genbench.utils import default, exists

if TYPE_CHECKING:
    from . import DatasetSpec

PIXEL_DTYPES = (torch.uint8, torch.float32)
CONVERT_CHUNK = 2**22  # pixels converted to float32 at a time: bounds the temporaries (32 MB)

# p -> p / 255 as float32 division rounds it, computed once on the CPU. Looking pixels up in this table
# gives those floats bit for bit on any device: CUDA divides by a Python scalar as a multiplication by
# its reciprocal, which differs in the last bit for some p (and 1/255 * p is not p / 255 on the CPU
# either), while the loaders produced p / 255 before they kept uint8.
_UNIT_TABLE = torch.arange(256, dtype=torch.float32).div_(255.0)


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Train/test images with optional integer labels, stored compactly.

    ``train_pixels``/``test_pixels`` are (N, C, H, W) tensors: uint8, where a pixel p stands for
    p / 255 (every 8-bit source: 4x less memory than float32), or float32 in [0, 1] where the
    values are not multiples of 1/255 (``digits``' k/16, images resized in float, 16-bit greyscale
    folders). Consumers see float32 in [0, 1] only: ``float_images`` converts the images it is asked
    for, ``train``/``test`` the whole split (a new float32 tensor per access for uint8 storage,
    4 bytes a pixel: the trainer reads batches through ``float_images`` instead).

    Labels, when present, are int64 (N,) in [0, num_classes); ``class_names`` names them (a
    folder's class sub-folders). ``train_total``: set when ``train_pixels`` holds only one
    process's shard of the training split (``load_dataset(shard=...)``): the size of the whole
    split, whose rows ``shard_range`` gives. Shapes and dtypes are checked at construction.
    """

    name: str
    train_pixels: torch.Tensor
    test_pixels: torch.Tensor
    train_labels: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None
    num_classes: int | None = None
    spec: DatasetSpec | None = None  # how load_dataset loaded it (what a run records), when it did
    class_names: tuple[str, ...] | None = None
    train_total: int | None = None

    def __post_init__(self):
        for split, x in (("train", self.train_pixels), ("test", self.test_pixels)):
            if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.dtype not in PIXEL_DTYPES:
                raise GenbenchError(
                    f"ImageDataset {self.name!r}: {split} must be a float32 tensor (N, C, H, W) in [0, 1] "
                    f"or a uint8 one, got {_describe(x)}"
                )
        if self.train_pixels.shape[1:] != self.test_pixels.shape[1:]:
            raise GenbenchError(
                f"ImageDataset {self.name!r}: train images are {tuple(self.train_pixels.shape[1:])} but "
                f"test images are {tuple(self.test_pixels.shape[1:])}"
            )
        if exists(self.train_total) and self.train_total < len(self.train_pixels):
            raise GenbenchError(f"ImageDataset {self.name!r}: train_total {self.train_total} is less than the "
                                f"{len(self.train_pixels)} train images held")
        if exists(self.class_names) and len(self.class_names) != self.num_classes:
            raise GenbenchError(f"ImageDataset {self.name!r}: {len(self.class_names)} class names for "
                                f"{self.num_classes} classes")
        if exists(self.train_labels) != exists(self.test_labels):
            raise GenbenchError(f"ImageDataset {self.name!r}: give labels for both splits or neither")
        if exists(self.train_labels) != exists(self.num_classes):
            raise GenbenchError(f"ImageDataset {self.name!r}: labels and num_classes go together")
        if not exists(self.train_labels):
            return
        for split, x, y in (("train", self.train_pixels, self.train_labels),
                            ("test", self.test_pixels, self.test_labels)):
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

    def float_images(self, split: str, index: slice | torch.Tensor | None = None) -> torch.Tensor:
        """The ``split`` ("train" or "test") images at ``index`` (all when None) as float32 in
        [0, 1]; only those are converted."""
        if split not in ("train", "test"):
            raise GenbenchError(f"split must be 'train' or 'test', got {split!r}")
        pixels = self.train_pixels if split == "train" else self.test_pixels
        if isinstance(index, slice):
            return unit_float(pixels[index])
        return unit_float(pixels, index)

    @property
    def train(self) -> torch.Tensor:
        """Every train image held, float32 in [0, 1] (see the class docstring for the cost)."""
        return self.float_images("train")

    @property
    def test(self) -> torch.Tensor:
        """Every test image, float32 in [0, 1] (see the class docstring for the cost)."""
        return self.float_images("test")

    @property
    def num_train(self) -> int:
        """Images in the whole training split (more than are held when this is one process's shard)."""
        return default(self.train_total, len(self.train_pixels))

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.train_pixels.shape[1:])

    @property
    def num_pixels(self) -> int:
        """C * H * W: the dimension D used for bits/dim = NLL / (D ln 2)."""
        return math.prod(self.shape)

    def __repr__(self) -> str:
        shard = f" of {self.train_total}" if exists(self.train_total) else ""
        return (
            f"ImageDataset(name={self.name!r}, train={len(self.train_pixels)}{shard}, test={len(self.test_pixels)}, "
            f"shape={self.shape}, num_classes={self.num_classes}, dtype={str(self.train_pixels.dtype).removeprefix('torch.')})"
        )


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def unit_float(pixels: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """The images ``pixels[index]`` (all when None) as float32 in [0, 1] on their device. uint8
    pixels p give a new tensor of p / 255, exactly the floats the loaders made before they kept
    uint8 (``_UNIT_TABLE``), converted a chunk at a time, so that converting a large subset needs
    little more than its float32 result; float32 images are returned as they are (indexed: a copy)."""
    if pixels.dtype not in PIXEL_DTYPES:
        raise GenbenchError(f"images must be uint8 pixels or float32 in [0, 1], got {pixels.dtype}")
    if pixels.dtype == torch.float32:
        return pixels if index is None else pixels.index_select(0, index)
    n = len(pixels) if index is None else len(index)
    table = _UNIT_TABLE.to(pixels.device)
    out = torch.empty((n, *pixels.shape[1:]), dtype=torch.float32, device=pixels.device)
    rows = max(1, CONVERT_CHUNK // max(1, math.prod(pixels.shape[1:])))
    for i in range(0, n, rows):
        chunk = pixels[i: i + rows] if index is None else pixels.index_select(0, index[i: i + rows])
        out[i: i + rows] = table[chunk.int()]  # int32 indices: a uint8 index would be read as a mask
    return out


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [start, stop) of an n-image training split that process `rank` of `world` holds under
    torchrun: contiguous blocks, as equal as n allows (so each process reads one run of a file)."""
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise GenbenchError(f"shard: expected 0 <= rank < world, got rank {rank!r} of {world!r}")
    return n * rank // world, n * (rank + 1) // world


def shard_rows(n: int, shard: tuple[int, int] | None) -> slice:
    """The rows of an n-image training split that a loader keeps: all of them, or for a shard
    (rank, world) the block ``shard_range`` gives."""
    return slice(None) if shard is None else slice(*shard_range(n, *shard))


def check_positive_int(value, what: str):
    if exists(value) and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise GenbenchError(f"{what} must be a positive integer, got {value!r}")


def pixels_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(N, H, W) or (N, C, H, W) uint8 array -> a fresh uint8 (N, C, H, W) tensor (a copy: never
    aliases a memoized array)."""
    x = torch.from_numpy(np.array(pixels, dtype=np.uint8))
    return x.unsqueeze(1) if x.ndim == 3 else x


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
