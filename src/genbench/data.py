"""Image datasets as float32 tensors in [0, 1], shaped (N, C, H, W).

Four sources, all local (genbench never downloads anything):

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, values 0..16 -> /16).
  Fixed stratified split with ``random_state=0``: 1437 train / 360 test, each split kept in the
  original sklearn order.
- ``fashion-mnist`` / ``mnist``: the four IDX files (raw or .gz) of LeCun et al. (1998) /
  Xiao et al. (2017), 60000 train / 10000 test, 1x28x28, pixels /255.
- ``folder``: every PNG/JPEG under a directory, center-cropped to a square and resized with
  Pillow's bicubic filter; every 10th image (sorted order) is held out as test.

Data flows one way: ``load_dataset`` -> ``ImageDataset`` -> trainer. Raw arrays (uint8 pixels as
stored on disk) are memoized per process, keyed on each file's path, size and mtime; every call
converts them into fresh tensors, so callers own what they get and may modify it in place.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from genbench.errors import GenbenchError
from genbench.utils import default, exists

DATASETS: tuple[str, ...] = ("digits", "fashion-mnist", "mnist", "folder")

ENV_VAR = "GENBENCH_DATA"
SYSTEM_DIRS = {
    "fashion-mnist": Path("/usr/share/datasets/fashion-mnist"),  # Debian: dataset-fashion-mnist
    "mnist": Path("/usr/share/datasets/mnist"),  # no Debian package known; a guess at the layout
}
IDX_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
FOLDER_DEFAULT_SIZE = 32
FOLDER_TEST_EVERY = 10  # index % 10 == 0 -> test
DIGITS_TEST_SIZE = 360  # = ceil(0.2 * 1797)

# IDX type code -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT")
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
GZIP_MAGIC = b"\x1f\x8b"

# Pillow modes that hold one grey channel; a folder made only of these loads as C=1.
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N"})
WIDE_GRAY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})  # 16-bit PNGs open as these


# ---------------------------------------------------------------------------------------------
# The dataset container


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


# ---------------------------------------------------------------------------------------------
# IDX files


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode one IDX file held in memory; ``source`` names it in error messages.

    Layout: magic ``00 00 TT DD`` (TT = type code, DD = number of dimensions), then DD
    big-endian uint32 sizes, then prod(sizes) big-endian items. Returns a native-endian,
    writable array of that shape.
    """
    if len(data) < 4:
        raise GenbenchError(f"{source}: not an IDX file: {len(data)} bytes is shorter than the 4-byte magic number")
    zero, type_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or type_code not in IDX_DTYPES:
        hint = " (looks gzip-compressed but could not be read as gzip)" if data[:2] == GZIP_MAGIC else ""
        raise GenbenchError(
            f"{source}: bad IDX magic number 0x{data[:4].hex()}{hint}; expected 0x0000TTDD with "
            f"type code TT in {{{', '.join(f'{c:02x}' for c in IDX_DTYPES)}}}"
        )
    if ndim == 0:
        raise GenbenchError(f"{source}: IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise GenbenchError(
            f"{source}: truncated IDX header: {ndim} dimensions need {header_len} bytes, file has {len(data)}"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = IDX_DTYPES[type_code]
    expected = math.prod(dims) * dtype.itemsize
    payload = len(data) - header_len
    if payload != expected:
        problem = "truncated payload" if payload < expected else "trailing bytes after payload"
        raise GenbenchError(
            f"{source}: {problem}: shape {dims} of {dtype.name} needs {expected} bytes, found {payload}"
        )
    array = np.frombuffer(data, dtype=dtype, count=math.prod(dims), offset=header_len)
    return array.reshape(dims).astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, raw or gzip-compressed (detected by the gzip magic bytes ``1f 8b``,
    not by the name: browsers often store a decompressed file under its ``.gz`` name)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise GenbenchError(f"{path}: cannot read IDX file: {e.strerror or e}") from e
    if data[:2] == GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise GenbenchError(f"{path}: corrupt gzip stream: {e or type(e).__name__}") from e
    return parse_idx(data, source=str(path))


@functools.lru_cache(maxsize=8)
def _read_idx_cached(path: Path, size: int, mtime_ns: int) -> np.ndarray:
    # size and mtime are in the key so that a replaced file is read again
    array = read_idx(path)
    array.flags.writeable = False  # shared between calls: callers get converted copies
    return array


def _read_idx_memo(path: Path) -> np.ndarray:
    st = path.stat()
    return _read_idx_cached(path.resolve(), st.st_size, st.st_mtime_ns)


# ---------------------------------------------------------------------------------------------
# Where the IDX files live


def _find_idx_files(directory: Path) -> dict[str, Path | None]:
    """Each of the four IDX files in ``directory``: the raw name, ``.gz``, or the dotted
    ``train-images.idx3-ubyte`` spelling some mirrors use; None when absent."""
    found = {}
    for key, stem in IDX_STEMS.items():
        dotted = stem.replace("-idx", ".idx")
        candidates = [directory / n for n in (stem, stem + ".gz", dotted, dotted + ".gz")]
        found[key] = next((p for p in candidates if p.is_file()), None)
    return found


def _has_idx_files(directory: Path) -> bool:
    return directory.is_dir() and all(exists(p) for p in _find_idx_files(directory).values())


def _data_root(name: str, data_dir: str | os.PathLike | None) -> tuple[Path, str]:
    """The directory to search and where it came from (for error messages)."""
    if exists(data_dir):
        return Path(data_dir).expanduser(), "data_dir argument"
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser(), f"${ENV_VAR}"
    return SYSTEM_DIRS[name], "system default"


def default_data_dir(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The directory holding ``name``'s IDX files (``fashion-mnist`` or ``mnist``).

    Resolution order: the explicit ``data_dir``, then ``$GENBENCH_DATA``, then
    ``/usr/share/datasets/<name>``. The first one that is set wins (no silent fallback to the
    next); within it a ``<name>/`` subfolder holding the files is preferred over the directory
    itself. When neither holds the four files the directory itself is returned, unchecked.
    """
    if name not in SYSTEM_DIRS:
        raise GenbenchError(f"dataset {name!r} has no data directory; those that do: {', '.join(SYSTEM_DIRS)}")
    root, _ = _data_root(name, data_dir)
    return root / name if _has_idx_files(root / name) else root


def _missing_files_error(name: str, root: Path, origin: str, files: dict[str, Path | None]) -> GenbenchError:
    missing = [IDX_STEMS[k] + "[.gz]" for k, p in files.items() if not exists(p)]
    where = f"{root} ({origin}) or its {name}/ subfolder"
    if name == "fashion-mnist":
        install = "install the Debian package dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist), or "
    else:
        install = "download the MNIST IDX files, then "
    return GenbenchError(
        f"{name}: IDX files not found in {where}; missing {', '.join(missing)}. To fix: {install}"
        f"pass --data-dir DIR or set {ENV_VAR}=DIR to a directory holding the four files "
        f"(or a {name}/ subfolder of them)"
    )


# ---------------------------------------------------------------------------------------------
# Loaders


def _check_positive_int(value, what: str):
    if exists(value) and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise GenbenchError(f"{what} must be a positive integer, got {value!r}")


def _to_unit_tensor(pixels: np.ndarray, scale: float) -> torch.Tensor:
    """(N, H, W) or (N, C, H, W) array -> fresh float32 (N, C, H, W) tensor, divided by ``scale``."""
    x = torch.from_numpy(np.array(pixels, dtype=np.float32))  # np.array copies: never alias the memo
    if x.ndim == 3:
        x = x.unsqueeze(1)
    return x.div_(scale)


def _resize(x: torch.Tensor, image_size: int | None) -> torch.Tensor:
    """Bilinear resize with antialiasing (a box-like prefilter when downsampling), clamped back
    into [0, 1]; a no-op at the native size."""
    if not exists(image_size) or x.shape[-2:] == (image_size, image_size):
        return x
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp_(0.0, 1.0)


def _labels(y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(y, dtype=np.int64))


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


def _load_digits(image_size: int | None, limit: int | None) -> ImageDataset:
    train_x, train_y, test_x, test_y = _digits_arrays()
    return ImageDataset(
        name="digits",
        train=_resize(_to_unit_tensor(train_x[:limit], 16.0), image_size),
        test=_resize(_to_unit_tensor(test_x[:limit], 16.0), image_size),
        train_labels=_labels(train_y[:limit]),
        test_labels=_labels(test_y[:limit]),
        num_classes=10,
    )


def _load_idx_split(name: str, images_path: Path, labels_path: Path, limit: int | None):
    images, labels = _read_idx_memo(images_path), _read_idx_memo(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise GenbenchError(
            f"{images_path}: expected uint8 images of shape (N, H, W), found {images.dtype} of shape {images.shape}"
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise GenbenchError(
            f"{labels_path}: expected integer labels of shape (N,), found {labels.dtype} of shape {labels.shape}"
        )
    if len(images) != len(labels):
        raise GenbenchError(
            f"{name}: {images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        bad = labels[(labels < 0) | (labels > 9)][0]
        raise GenbenchError(f"{labels_path}: label {int(bad)} outside the 10 classes 0..9")
    if len(images) == 0:
        raise GenbenchError(f"{images_path}: holds no images")
    return images[:limit], labels[:limit]


def _load_idx_dataset(name: str, data_dir, image_size: int | None, limit: int | None) -> ImageDataset:
    root, origin = _data_root(name, data_dir)
    directory = default_data_dir(name, data_dir)
    files = _find_idx_files(directory) if directory.is_dir() else dict.fromkeys(IDX_STEMS)
    if not all(exists(p) for p in files.values()):
        raise _missing_files_error(name, root, origin, files)
    train_x, train_y = _load_idx_split(name, files["train_images"], files["train_labels"], limit)
    test_x, test_y = _load_idx_split(name, files["test_images"], files["test_labels"], limit)
    if train_x.shape[1:] != test_x.shape[1:]:
        raise GenbenchError(
            f"{name}: train images are {train_x.shape[1:]} but test images are {test_x.shape[1:]} in {directory}"
        )
    return ImageDataset(
        name=name,
        train=_resize(_to_unit_tensor(train_x, 255.0), image_size),
        test=_resize(_to_unit_tensor(test_x, 255.0), image_size),
        train_labels=_labels(train_y),
        test_labels=_labels(test_y),
        num_classes=10,
    )


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
        image = Image.open(path)
        image.load()
        return ImageOps.exif_transpose(image)  # camera JPEGs store rotation in EXIF
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


def _load_folder(data_dir, image_size: int | None, limit: int | None) -> ImageDataset:
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

    def load(split_paths):
        signature = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in split_paths)
        return torch.from_numpy(np.array(_load_folder_cached(tuple(split_paths), signature, size, gray)))

    return ImageDataset(name="folder", train=load(train_paths), test=load(test_paths))


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    image_size: int | None = None,
    limit: int | None = None,
) -> ImageDataset:
    """Load a dataset by name (one of ``DATASETS``) as float32 tensors in [0, 1].

    ``data_dir``: for ``fashion-mnist``/``mnist`` overrides ``$GENBENCH_DATA`` and the system
    directory (see ``default_data_dir``); for ``folder`` it is the image directory (required);
    ``digits`` is bundled with scikit-learn and takes none.
    ``image_size``: square output side. ``folder`` defaults to 32 (Pillow bicubic after a
    center crop); for the others, a size different from the native one is reached with
    ``F.interpolate(mode="bilinear", antialias=True)`` and clamped to [0, 1].
    ``limit``: keep only the first ``limit`` train and the first ``limit`` test images.
    """
    _check_positive_int(image_size, "image_size")
    _check_positive_int(limit, "limit")
    key = name.lower() if isinstance(name, str) else name
    if key not in DATASETS:
        raise GenbenchError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if key == "digits":
        if exists(data_dir):
            raise GenbenchError("dataset 'digits' is bundled with scikit-learn and takes no data_dir")
        return _load_digits(image_size, limit)
    if key == "folder":
        return _load_folder(data_dir, image_size, limit)
    return _load_idx_dataset(key, data_dir, image_size, limit)
