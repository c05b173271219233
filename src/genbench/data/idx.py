"""IDX files (LeCun et al. 1998): the format of MNIST and Fashion-MNIST, and where to find them.

``fashion-mnist`` / ``mnist``: the four IDX files (raw or .gz) of LeCun et al. (1998) /
Xiao et al. (2017), 60000 train / 10000 test, 1x28x28, pixels /255. Raw arrays (uint8 pixels as
stored on disk) are memoized per process, keyed on each file's path, size and mtime. The dataset
keeps them as uint8 at the native size; another ``image_size`` is reached in float32 (kept so: the
resized values are not multiples of 1/255).
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from genbench.errors import GenbenchError
from genbench.limits import check_memory
from genbench.utils import exists

from .container import (ImageDataset, labels_tensor, pixels_tensor, resize, shard_rows,
                        to_unit_tensor)

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
    not by the name: browsers often store a decompressed file under its ``.gz`` name).

    The header is read first: the size it declares is checked against the memory limit
    (genbench.limits) before the payload is read or inflated, and at most one byte more than it
    is read, so a small gzip file that inflates to gigabytes costs nothing."""
    path = Path(path)
    compressed = False
    try:
        with open(path, "rb") as f:
            compressed = f.read(2) == GZIP_MAGIC
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
            head = f.read(4)
            ndim = head[3] if len(head) == 4 else 0
            head += f.read(4 * ndim)
            declared = _declared_payload(head)
            if declared is not None:
                check_memory(declared, f"{path}: the IDX header's array")
            payload = f.read(declared + 1) if declared is not None else f.read()
    except OSError as e:  # gzip.BadGzipFile is an OSError
        what = "corrupt gzip stream" if compressed and not isinstance(e, FileNotFoundError) else "cannot read IDX file"
        raise GenbenchError(f"{path}: {what}: {e.strerror or e}") from e
    except (EOFError, zlib.error) as e:
        raise GenbenchError(f"{path}: corrupt gzip stream: {e or type(e).__name__}") from e
    return parse_idx(head + payload, source=str(path))


def _declared_payload(head: bytes) -> int | None:
    """Payload bytes a complete, valid IDX header declares; None when the header is not one
    (parse_idx then says what is wrong with it)."""
    if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in IDX_DTYPES or head[3] == 0 or len(head) < 4 + 4 * head[3]:
        return None
    dims = struct.unpack(f">{head[3]}I", head[4:4 + 4 * head[3]])
    return math.prod(dims) * IDX_DTYPES[head[2]].itemsize


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


def load_idx_dataset(name: str, data_dir, image_size: int | None, limit: int | None,
                     shard: tuple[int, int] | None = None) -> ImageDataset:
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
    native = not exists(image_size) or train_x.shape[1:] == (image_size, image_size)
    num_train, rows = len(train_x), shard_rows(len(train_x), shard)
    train_x, train_y = train_x[rows], train_y[rows]

    def pixels(x):
        return pixels_tensor(x) if native else resize(to_unit_tensor(x, 255.0), image_size)

    return ImageDataset(
        name=name,
        train_pixels=pixels(train_x),
        test_pixels=pixels(test_x),
        train_labels=labels_tensor(train_y),
        test_labels=labels_tensor(test_y),
        num_classes=10,
        train_total=num_train if exists(shard) else None,
    )
