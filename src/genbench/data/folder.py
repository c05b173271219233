"""``folder``: every PNG/JPEG under a directory, center-cropped to a square and resized with
Pillow's bicubic filter; every 10th image (sorted order) is held out as test."""

from __future__ import annotations

import functools
import os
import struct
from pathlib import Path

import numpy as np
import torch

from genbench.errors import GenbenchError
from genbench.limits import check_memory
from genbench.utils import default, exists

from .container import ImageDataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
FOLDER_DEFAULT_SIZE = 32
FOLDER_TEST_EVERY = 10  # index % 10 == 0 -> test

# Pillow modes that hold one grey channel; a folder made only of these loads as C=1.
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N"})
WIDE_GRAY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})  # 16-bit PNGs open as these


def _list_images(root: Path) -> list[Path]:
    """PNG/JPEG files under ``root``, recursively, sorted by relative path; hidden files and
    folders (``.DS_Store``, macOS ``._x.png`` resource forks, ``.git``) are skipped."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        files += [
            Path(dirpath) / f
            for f in filenames
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
        ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _open_image(path: Path):
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:  # closed on a decoding error too
            image.load()
            return ImageOps.exif_transpose(image)  # camera JPEGs store rotation in EXIF (a copy: safe to close)
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError) as e:
        raise GenbenchError(f"{path}: cannot decode image: {e}") from e


def _image_mode(path: Path) -> str:
    from PIL import Image

    try:
        with Image.open(path) as image:  # header only: cheap
            return image.mode
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError) as e:
        raise GenbenchError(f"{path}: cannot decode image: {e}") from e


def _square_pixels(path: Path, size: int, gray: bool) -> np.ndarray:
    """One image -> (C, size, size) float32 in [0, 1]: center crop to the short side, then
    Pillow bicubic resize (which widens its kernel when downsampling, i.e. antialiases)."""
    from PIL import Image

    image = _open_image(path)
    if gray and image.mode in WIDE_GRAY_MODES:
        # 16-bit greyscale: Pillow's convert("L") clips instead of scaling, so rescale ourselves
        image, scale = Image.fromarray(np.asarray(image, dtype=np.float32) / 65535.0, mode="F"), 1.0
    else:
        image, scale = image.convert("L" if gray else "RGB"), 255.0
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    image = image.resize((size, size), Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32) / scale
    pixels = pixels[None] if gray else pixels.transpose(2, 0, 1)
    return np.clip(pixels, 0.0, 1.0)


@functools.lru_cache(maxsize=4)
def _load_folder_cached(paths: tuple[Path, ...], signature: tuple, size: int, gray: bool) -> np.ndarray:
    # signature = (size, mtime) per file, so edited images are decoded again
    pixels = np.stack([_square_pixels(p, size, gray) for p in paths])
    pixels.flags.writeable = False
    return pixels


def load_folder(data_dir, image_size: int | None, limit: int | None) -> ImageDataset:
    if not exists(data_dir):
        raise GenbenchError("dataset 'folder' needs data_dir: a directory of PNG/JPEG images")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise GenbenchError(f"folder dataset: {root} is not a directory")
    paths = _list_images(root)
    if len(paths) == 0:
        raise GenbenchError(f"folder dataset: no .png/.jpg/.jpeg images found under {root}")
    if len(paths) < 2:
        raise GenbenchError(
            f"folder dataset: {root} holds only {len(paths)} image; need at least 2 (one train, one test)"
        )
    # C=1 only when the whole folder is greyscale, so the channel count never depends on limit
    gray = all(_image_mode(p) in GRAY_MODES for p in paths)
    test_paths = [p for i, p in enumerate(paths) if i % FOLDER_TEST_EVERY == 0][:limit]
    train_paths = [p for i, p in enumerate(paths) if i % FOLDER_TEST_EVERY != 0][:limit]
    size = default(image_size, FOLDER_DEFAULT_SIZE)
    channels = 1 if gray else 3
    check_memory(4.0 * (len(test_paths) + len(train_paths)) * channels * size * size,
                 f"folder dataset: {len(test_paths) + len(train_paths)} images of {channels}x{size}x{size} float32")

    def load(split_paths):
        signature = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in split_paths)
        return torch.from_numpy(np.array(_load_folder_cached(tuple(split_paths), signature, size, gray)))

    return ImageDataset(name="folder", train=load(train_paths), test=load(test_paths))
