"""Image datasets, shaped (N, C, H, W), kept as compactly as their values allow.

Five sources, all local (genbench never downloads anything):

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, values 0..16 -> /16).
  Fixed stratified split with ``random_state=0``: 1437 train / 360 test, each split kept in the
  original sklearn order.
- ``fashion-mnist`` / ``mnist``: the four IDX files (raw or .gz) of LeCun et al. (1998) /
  Xiao et al. (2017), 60000 train / 10000 test, 1x28x28, pixels /255.
- ``folder``: every PNG/JPEG under a directory, labelled by class sub-folder or unlabelled,
  center-cropped to a square and resized with Pillow's bicubic filter; every 10th image (sorted
  order) is held out as test. Decoded once into a disk cache (see ``folder`` and ``cache``).
- ``emoji``: the colour emoji of the Noto Color Emoji font (Debian package fonts-noto-color-emoji),
  rendered by genbench into 3x32x32 images (another ``image_size`` on request), unlabelled; with
  Debian 12's font (2.042) 1643 distinct emoji, 1393 train / 250 test by a hash of each emoji's code
  points. Rendered once into the same disk cache (see ``emoji``).

Data flows one way: ``DatasetSpec`` / ``load_dataset`` -> ``ImageDataset`` -> trainer. 8-bit
sources are kept as uint8 (1 byte a pixel, not float32's 4) and converted to float32 in [0, 1] by
whoever reads them, a batch at a time (``ImageDataset.float_images``): p / 255, the very floats
the loaders made before. Where the values are not multiples of 1/255 the dataset stays float32,
exactly as before: ``digits`` (k/16), and any dataset resized in float (IDX at another
``image_size``). Raw arrays are memoized per process, keyed on each file's path, size and mtime;
every call gives fresh tensors (or a copy-on-write mapping of the folder cache), so callers own
what they get and may modify it in place.
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass, replace

import numpy as np

from genbench.errors import GenbenchError
from genbench.utils import exists

from .container import (ImageDataset, check_positive_int, labels_tensor, resize, shard_range, shard_rows, to_unit_tensor,
                        unit_float)
from .emoji import load_emoji
from .folder import load_folder
from .idx import ENV_VAR, SYSTEM_DIRS, default_data_dir, load_idx_dataset, parse_idx, read_idx

__all__ = ["DATASETS", "ENV_VAR", "SYSTEM_DIRS", "DatasetSpec", "ImageDataset", "default_data_dir", "load_dataset",
           "parse_idx", "read_idx", "shard_range", "unit_float"]

DATASETS: tuple[str, ...] = ("digits", "fashion-mnist", "mnist", "folder", "emoji")
DIGITS_TEST_SIZE = 360  # = ceil(0.2 * 1797)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """sklearn digits split once per process: (train images, train labels, test images, test labels)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = np.arange(len(digits.target))
    train_idx, test_idx = train_test_split(
        index, test_size=DIGITS_TEST_SIZE, stratify=digits.target, random_state=0
    )
    # sorted: each split keeps sklearn's order, so "the first N" is the same for any limit
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    images = digits.images  # (1797, 8, 8), integer values 0..16 stored as float64
    arrays = (images[train_idx], digits.target[train_idx], images[test_idx], digits.target[test_idx])
    for a in arrays:
        a.flags.writeable = False  # shared between calls: callers get converted copies
    return arrays


def _load_digits(image_size: int | None, limit: int | None, shard: tuple[int, int] | None) -> ImageDataset:
    """float32 storage: k/16 is not a multiple of 1/255 (and 1797 8x8 images weigh 0.5 MB)."""
    train_x, train_y, test_x, test_y = _digits_arrays()
    train_x, train_y = train_x[:limit], train_y[:limit]
    rows = shard_rows(len(train_x), shard)
    return ImageDataset(
        name="digits",
        train_pixels=resize(to_unit_tensor(train_x[rows], 16.0), image_size),
        test_pixels=resize(to_unit_tensor(test_x[:limit], 16.0), image_size),
        train_labels=labels_tensor(train_y[rows]),
        test_labels=labels_tensor(test_y[:limit]),
        num_classes=10,
        train_total=len(train_x) if exists(shard) else None,
    )


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    image_size: int | None = None,
    limit: int | None = None,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
) -> ImageDataset:
    """Load a dataset by name (one of ``DATASETS``): uint8 pixels, or float32 in [0, 1] (see above).

    ``data_dir``: for ``fashion-mnist``/``mnist`` overrides ``$GENBENCH_DATA`` and the system
    directory (see ``default_data_dir``); for ``folder`` it is the image directory (required); for
    ``emoji`` the font file or a folder holding NotoColorEmoji.ttf (``emoji.font_file``);
    ``digits`` is bundled with scikit-learn and takes none.
    ``image_size``: square output side. ``folder`` defaults to 32 (Pillow bicubic after a
    center crop), ``emoji`` to 32 (Pillow Lanczos from the font's 136-pixel bitmaps); for the others, a size different from the native one is reached with
    ``F.interpolate(mode="bilinear", antialias=True)`` and clamped to [0, 1].
    ``limit``: keep only the first ``limit`` train and the first ``limit`` test images.
    ``shard``: (rank, world) of a torchrun process: keep only that process's block of the training
    images (``shard_range``; the test split stays whole), so each process reads and holds 1/world
    of them; ``ImageDataset.num_train`` still counts them all.
    ``progress``: show a progress bar while a folder is decoded or the emoji rendered (when that
    takes over a second).
    """
    check_positive_int(image_size, "image_size")
    check_positive_int(limit, "limit")
    if exists(shard):
        shard_range(0, *shard)  # checks rank and world
    key = name.lower() if isinstance(name, str) else name
    if key not in DATASETS:
        raise GenbenchError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if key == "digits":
        if exists(data_dir):
            raise GenbenchError("dataset 'digits' is bundled with scikit-learn and takes no data_dir")
        ds = _load_digits(image_size, limit, shard)
    elif key == "folder":
        ds = load_folder(data_dir, image_size, limit, shard, progress)
    elif key == "emoji":
        ds = load_emoji(data_dir, image_size, limit, shard, progress)
    else:
        ds = load_idx_dataset(key, data_dir, image_size, limit, shard)
    return replace(ds, spec=DatasetSpec(key, None if data_dir is None else str(data_dir), image_size, limit))


@dataclass(frozen=True)
class DatasetSpec:
    """What to load, as recorded in a run's run.json and passed between processes: a dataset name
    and the options of ``load_dataset``. ``load()`` is ``load_dataset`` with these options (and the
    per-process ones, which a run does not record)."""

    name: str
    data_dir: str | None = None
    image_size: int | None = None
    limit: int | None = None

    def load(self, shard: tuple[int, int] | None = None, progress: bool = True) -> ImageDataset:
        return load_dataset(self.name, data_dir=self.data_dir, image_size=self.image_size, limit=self.limit,
                            shard=shard, progress=progress)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "dataset") -> DatasetSpec:
        """The inverse of to_dict; fields left out take their defaults."""
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            raise GenbenchError(f"{where}: expected a mapping with a dataset name, got {d!r:.80}")
        unknown = sorted(set(d) - {"name", "data_dir", "image_size", "limit"})
        if unknown:
            raise GenbenchError(f"{where}: unknown field(s) {unknown}")
        return cls(d["name"], d.get("data_dir"), d.get("image_size"), d.get("limit"))
