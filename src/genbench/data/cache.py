"""A decoded image folder (or the rendered emoji font) kept on disk, so that the next run reads it
instead of decoding again.

Decoding, cropping and resizing 100,000 PNGs takes minutes; reading them back as one array takes
well under a second. One entry per source (a folder, a font file) and request::

    <$GENBENCH_CACHE or ~/.cache/genbench>/datasets/<kind>-<hash of the source's path and the request>/
        pixels-<key>.npy   the decoded images, (N, C, S, S) uint8 (float32 for 16-bit greyscale
                           folders): a plain .npy, written and read with allow_pickle=False
        index.json         names that file, with its key, shape and dtype; written last

``key`` is a sha256 over the request (image size, limit), the decoder's version and Pillow's, and
every image file's relative path, size and mtime: an added, removed, replaced or touched image, or
another image size, gives another key, and the folder is decoded again, never read stale. A
changed folder replaces its entry (the old .npy is removed), so the cache does not grow with every
edit. Both files are written to a temporary file and renamed (genbench.files); a reader that finds
no index.json, another key, or a .npy that does not match the index decodes again.

Reading maps the .npy into memory copy-on-write (``np.load(mmap_mode="c")``): nothing is read
until it is used, a torchrun process reads only the pages of its shard, processes on one machine
share those pages through the page cache, and a caller that writes into its tensors changes its
own copy of a page, never the file. The files are only ever replaced by a rename, never changed
in place, so a mapping stays valid while another process decodes the folder again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np

from genbench.errors import GenbenchError
from genbench.files import TMP_INFIX, atomic_write_bytes, cache_root, fsync_folder
from genbench.limits import format_bytes

CACHE_KIND = "datasets"
INDEX_FILE = "index.json"
DECODER_VERSION = 1  # bump when decoding changes what a file decodes to: every entry is then stale


def content_key(request: dict, files: Iterable[tuple[str, int, int]]) -> str:
    """sha256 over the request and each (relative path, size, mtime_ns) of the image files."""
    import PIL

    h = hashlib.sha256()
    h.update(json.dumps({"decoder": DECODER_VERSION, "pillow": PIL.__version__, **request}, sort_keys=True).encode())
    for rel, size, mtime_ns in files:
        h.update(f"\0{rel}\0{size}\0{mtime_ns}".encode())
    return h.hexdigest()


def entry_dir(root: Path, request: dict, cache_dir: str | os.PathLike | None = None, kind: str = "folder") -> Path:
    """The entry of the source at `root` (resolved: a folder, or the emoji font file) for `request`;
    one per source and request, named ``<kind>-<hash>``."""
    name = json.dumps({"root": str(root.resolve()), **request}, sort_keys=True)
    return cache_root(CACHE_KIND, cache_dir) / f"{kind}-{hashlib.sha256(name.encode()).hexdigest()[:16]}"


def read_entry(entry: Path, key: str) -> np.ndarray | None:
    """The images, mapped copy-on-write, when `entry` holds those of `key`; else None."""
    found = read_entry_with_index(entry, key)
    return None if found is None else found[0]


def read_entry_with_index(entry: Path, key: str) -> tuple[np.ndarray, dict] | None:
    """(the images, mapped copy-on-write; index.json as written) when `entry` holds those of `key`;
    else None. The index is read once, so the two always belong together."""
    try:
        index = json.loads((entry / INDEX_FILE).read_text())
        if not isinstance(index, dict) or index.get("key") != key:
            return None
        pixels = np.load(entry / f"pixels-{key[:16]}.npy", mmap_mode="c", allow_pickle=False)
    except (OSError, ValueError, RecursionError):  # missing, unreadable, short or not a .npy file
        return None
    if list(pixels.shape) != index.get("shape") or str(pixels.dtype) != index.get("dtype") or pixels.ndim != 4:
        return None
    return pixels, index


def write_entry(entry: Path, key: str, shape: tuple[int, ...], dtype: np.dtype, images: Iterable[np.ndarray],
                index: dict) -> None:
    """Stream `images` (each of shape `shape[1:]` and `dtype`) into the entry's .npy, then write
    index.json (`index` + key, shape, dtype). One image at a time is held in memory. When `images`
    raises (a bad image), nothing is left behind and the entry keeps what it held."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    try:
        entry.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(entry).free
    except OSError as e:
        raise GenbenchError(f"{entry}: cannot create the dataset cache ({e.strerror or e}); set "
                            "GENBENCH_CACHE to a writable folder") from None
    if free < nbytes + 2**20:
        raise GenbenchError(f"{entry}: only {format_bytes(free)} free on its disk, the decoded images need "
                            f"{format_bytes(nbytes)}; free some space or set GENBENCH_CACHE to another disk")
    name = f"pixels-{key[:16]}.npy"
    tmp = entry / f".{name}{TMP_INFIX}{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)})
            count = 0
            for image in images:
                f.write(np.ascontiguousarray(image, dtype=dtype).tobytes())
                count += 1
            if count != shape[0]:
                raise GenbenchError(f"{entry}: {count} images decoded where {shape[0]} were expected")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, entry / name)
        fsync_folder(entry)
        atomic_write_bytes(entry / INDEX_FILE, (json.dumps(
            {**index, "key": key, "shape": list(shape), "dtype": str(dtype)}, indent=1) + "\n").encode())
    except OSError as e:
        raise GenbenchError(f"{entry}: cannot write the dataset cache ({e.strerror or e}); free some space "
                            "or set GENBENCH_CACHE to a writable folder") from None
    finally:
        tmp.unlink(missing_ok=True)
    for old in entry.glob("pixels-*.npy"):  # the folder's earlier contents: stale from now on
        if old.name != name:
            old.unlink(missing_ok=True)
