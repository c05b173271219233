"""``folder``: a directory of PNG/JPEG images, labelled by class sub-folder or unlabelled.

The layout follows the convention users know from torchvision's ``ImageFolder`` and Keras'
``image_dataset_from_directory``:

- images directly in the folder: an unlabelled dataset;
- images in sub-folders (at any depth below them): labelled by the top sub-folder's name, classes
  numbered in name order (``class_names``, recorded in a run's run.json);
- both at once is an error (which did the user mean?), and so is a class folder without images.

Every image is center-cropped to a square and resized with Pillow's bicubic filter; every 10th
image (sorted by relative path) is held out as test. Hidden files and folders are skipped.

The decoded folder is kept as uint8 (float32 only for 16-bit greyscale) in a disk cache
(genbench.data.cache) that later loads map instead of decoding; a run with another image size, or
a folder whose files changed, is decoded again. Every problem is found before anything is cached:
an empty folder, an unreadable or truncated image (named, with the count of those that decode).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from genbench.errors import GenbenchError
from genbench.limits import check_memory
from genbench.utils import default, exists

from . import cache
from .container import ImageDataset, labels_tensor, shard_rows

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
FOLDER_DEFAULT_SIZE = 32
FOLDER_TEST_EVERY = 10  # index % 10 == 0 -> test
PROGRESS_DELAY_S = 1.0  # a progress bar appears only when decoding takes longer than this

# Pillow modes that hold one grey channel; a folder made only of these loads as C=1.
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N"})
WIDE_GRAY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})  # 16-bit PNGs open as these


def _list_images(root: Path) -> tuple[list[str], list[str]]:
    """(image paths relative to ``root``, sorted; the top sub-folders, sorted by name). Images are
    PNG/JPEG files found recursively; hidden files and folders (``.DS_Store``, macOS ``._x.png``
    resource forks, ``.git``) are skipped, and symbolic links to folders are not followed."""
    files, subfolders = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if Path(dirpath) == root:
            subfolders = sorted(dirnames)  # links to folders are listed here, though not walked
        rel = Path(dirpath).relative_to(root)
        files += [(rel / f).as_posix() for f in filenames
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(files), subfolders


def _labels(root: Path, files: list[str], subfolders: list[str]) -> tuple[tuple[str, ...] | None, np.ndarray | None]:
    """(class names, one label per file) for a folder of class sub-folders; (None, None) for a
    folder of images alone (its sub-folders, if any, hold none)."""
    top = [f for f in files if "/" not in f]
    nested = [f for f in files if "/" in f]
    if not nested:
        return None, None
    if top:
        raise GenbenchError(
            f"folder dataset: {root} holds images both directly ({len(top)}, e.g. {top[0]}) and in sub-folders "
            f"({len(nested)}, e.g. {nested[0]}): put every image in a class sub-folder to label them by "
            f"sub-folder name, or all directly in {root} for an unlabelled dataset"
        )
    classes = {f.split("/", 1)[0] for f in nested}
    empty = [d for d in subfolders if d not in classes]
    if empty:
        link = " (a symbolic link: not followed)" if (root / empty[0]).is_symlink() else ""
        raise GenbenchError(
            f"folder dataset: class folder {root / empty[0]}{link} holds no .png/.jpg/.jpeg images"
            f"{f' (nor do {len(empty) - 1} other class folders)' if len(empty) > 1 else ''}; every sub-folder "
            f"of {root} is a class: add images or remove it"
        )
    names = tuple(sorted(classes))
    number = {c: i for i, c in enumerate(names)}
    return names, np.array([number[f.split("/", 1)[0]] for f in files], dtype=np.int64)


def _open_image(path: Path):
    from PIL import Image, ImageOps

    with Image.open(path) as image:  # closed on a decoding error too
        image.load()
        return ImageOps.exif_transpose(image)  # camera JPEGs store rotation in EXIF (a copy: safe to close)


def _image_mode(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as image:  # header only: cheap
        return image.mode


def _square_pixels(path: Path, size: int, gray: bool, dtype: np.dtype) -> np.ndarray:
    """One image -> (C, size, size) pixels: center crop to the short side, then Pillow bicubic
    resize (which widens its kernel when downsampling, i.e. antialiases). uint8 as Pillow's 8-bit
    modes compute it; float32 in [0, 1] for a folder holding 16-bit greyscale (p / 65535,
    resized in float), where an 8-bit image gives p / 255."""
    from PIL import Image

    image = _open_image(path)
    if gray and image.mode in WIDE_GRAY_MODES:
        # 16-bit greyscale: Pillow's convert("L") clips instead of scaling, so rescale ourselves
        image = Image.fromarray(np.asarray(image, dtype=np.float32) / 65535.0, mode="F")
    else:
        image = image.convert("L" if gray else "RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    image = image.resize((size, size), Image.Resampling.BICUBIC)
    pixels = np.asarray(image)
    pixels = pixels[None] if gray else pixels.transpose(2, 0, 1)
    if dtype == np.uint8:
        return pixels
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32) / 255.0
    return np.clip(pixels, 0.0, 1.0)


def _file_stats(root: Path, files: list[str]) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of each image: what the cache key is made of (a stat each, no reading)."""
    stats = []
    for f in files:
        try:
            st = os.stat(root / f)
        except OSError as e:
            raise GenbenchError(f"folder dataset: cannot read {root / f}: {e.strerror}") from None
        stats.append((f, st.st_size, st.st_mtime_ns))
    return stats


def _pil_errors() -> tuple[type[Exception], ...]:
    """What Pillow raises on a damaged or hostile file."""
    from PIL import Image

    return OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError


def _error(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _decode_all(root: Path, paths: list[Path], size: int, gray: bool, dtype: np.dtype, bad: dict, total: int,
                progress: bool):
    """Yield each image's pixels (zeros in place of one that does not decode); at the end raise a
    GenbenchError naming the first bad image, with the count of good ones, so that a cache is
    never written from a folder with bad images and the user learns about all of them at once."""
    channels = 1 if gray else 3
    for path in tqdm(paths, desc=f"decoding {root.name}", unit="img", disable=not progress, leave=False,
                     delay=PROGRESS_DELAY_S, dynamic_ncols=True):
        pixels = None
        if path not in bad:
            try:
                pixels = _square_pixels(path, size, gray, dtype)
            except _pil_errors() as e:
                bad[path] = _error(e)
        yield pixels if exists(pixels) else np.zeros((channels, size, size), dtype)
    if bad:
        first = min(bad, key=lambda p: p.relative_to(root).as_posix())
        n = len(bad)
        raise GenbenchError(
            f"{first}: cannot decode image: {bad[first]}; {total - n} of the {total} images under {root} decode, "
            f"{n} {'does' if n == 1 else 'do'} not: fix or remove {'it' if n == 1 else 'them'}"
        )


def load_folder(data_dir, image_size: int | None, limit: int | None, shard: tuple[int, int] | None = None,
                progress: bool = True) -> ImageDataset:
    """The folder at `data_dir` as a dataset (see the module docstring): from the cache when it
    holds this folder's current files at this size, else decoded into it first. The train split
    is the first rows of the cached array and the test split the rest, so a shard or a limit is a
    view of the mapping, and only the rows used are ever read."""
    if not exists(data_dir):
        raise GenbenchError("dataset 'folder' needs data_dir: a directory of PNG/JPEG images")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise GenbenchError(f"folder dataset: {root} is not a directory")
    files, subfolders = _list_images(root)
    if len(files) == 0:
        raise GenbenchError(f"folder dataset: no .png/.jpg/.jpeg images found under {root}")
    if len(files) < 2:
        raise GenbenchError(f"folder dataset: {root} holds only {len(files)} image; need at least 2 (one train, one test)")
    class_names, labels = _labels(root, files, subfolders)
    index = np.arange(len(files))
    test_idx = index[index % FOLDER_TEST_EVERY == 0][:limit]
    train_idx = index[index % FOLDER_TEST_EVERY != 0][:limit]
    order = np.concatenate([train_idx, test_idx])  # the cache holds train images first, then test
    size = default(image_size, FOLDER_DEFAULT_SIZE)
    request = {"image_size": size, "limit": limit}
    key = cache.content_key(request, _file_stats(root, files))
    entry = cache.entry_dir(root, request)
    pixels = cache.read_entry(entry, key)
    if pixels is None:
        _decode_into_cache(root, files, order, len(train_idx), size, entry, key, progress)
        pixels = cache.read_entry(entry, key)
        if pixels is None:
            raise GenbenchError(f"{entry}: the dataset cache just written cannot be read back")
    n_train = len(train_idx)
    rows = shard_rows(n_train, shard)
    train, test = pixels[:n_train][rows], pixels[n_train:]
    check_memory(float(train.nbytes + test.nbytes), f"folder dataset: {len(train) + len(test)} images of "
                 f"{'x'.join(map(str, pixels.shape[1:]))} {pixels.dtype}")
    return ImageDataset(
        name="folder",
        train_pixels=torch.from_numpy(train),  # mapped, not read: pages come in as they are used
        test_pixels=torch.from_numpy(test),
        train_labels=None if labels is None else labels_tensor(labels[train_idx][rows]),
        test_labels=None if labels is None else labels_tensor(labels[test_idx]),
        num_classes=None if class_names is None else len(class_names),
        class_names=class_names,
        train_total=n_train if exists(shard) else None,
    )


def _decode_into_cache(root: Path, files: list[str], order: np.ndarray, n_train: int, size: int, entry: Path,
                       key: str, progress: bool) -> None:
    """Read every image's header (C=1 only when the whole folder is greyscale, so the channel count
    never depends on limit), then decode the images at `order` into the cache entry; or raise,
    naming the first bad image, before anything is cached."""
    bad: dict[Path, str] = {}
    modes = []
    for f in tqdm(files, desc=f"checking {root.name}", unit="img", disable=not progress, leave=False,
                  delay=PROGRESS_DELAY_S, dynamic_ncols=True):
        try:
            modes.append(_image_mode(root / f))
        except _pil_errors() as e:
            bad[root / f] = _error(e)
    gray = all(m in GRAY_MODES for m in modes)
    dtype = np.dtype(np.float32 if gray and any(m in WIDE_GRAY_MODES for m in modes) else np.uint8)
    shape = (len(order), 1 if gray else 3, size, size)
    check_memory(float(np.prod(shape)) * dtype.itemsize,
                 f"folder dataset: {len(order)} images of {'x'.join(map(str, shape[1:]))} {dtype}")
    images = _decode_all(root, [root / files[i] for i in order], size, gray, dtype, bad, len(files), progress)
    cache.write_entry(entry, key, shape, dtype, images,
                      {"root": str(root.resolve()), "image_size": size, "num_train": n_train})
