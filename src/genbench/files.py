"""Bytes on disk: atomic writes, validated JSON, safetensors with a size + sha256 record. Never pickle.

These are the building blocks of genbench's file formats, not formats themselves: the exported
model folder belongs to `genbench.models.base`, training checkpoints to
`genbench.training.checkpoint`, the run folder to `genbench.training.run_folder`.

Every tensor file is written with a record of its size and sha256 that the format's JSON keeps;
`read_tensors` checks both, so a truncated or replaced file is refused with a clear error instead
of loading junk.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import GenbenchError
from .limits import check_memory

MAX_JSON_BYTES = 64 * 2**20  # a run.json, config.json or checkpoint record is kilobytes; never read more than this


CACHE_ENV_VAR = "GENBENCH_CACHE"


def cache_root(kind: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where genbench keeps derived data of one `kind` (trained auxiliary networks, decoded image
    folders): ``cache_dir`` when given, else ``$GENBENCH_CACHE/<kind>``, else ``~/.cache/genbench/<kind>``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV_VAR, "").strip()
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "genbench"
    return root / kind


TMP_INFIX = ".tmp"  # atomic writes go through ".<name>.tmp<pid>" beside their target


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, rename, then fsync the folder: readers never
    see a torn file, and the rename survives a power cut, not only a killed process."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_INFIX}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_folder(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def fsync_folder(folder: Path) -> None:
    """Make the renames in `folder` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the ".<name>.tmp<pid>" files that writers killed mid-write left in `folder` (call it only
    while owning the folder, so that no live writer's file is removed); returns what was removed."""
    removed = []
    for p in folder.glob(f".*{TMP_INFIX}*"):
        if p.is_file() and p.name[p.name.rindex(TMP_INFIX) + len(TMP_INFIX):].isdigit():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensors_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    # clone: safetensors refuses tensors that share storage (tied weights), and wants them contiguous on CPU
    return st_save({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()})


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Write a safetensors file atomically; return its {"size", "sha256"} record."""
    data = tensors_to_bytes(tensors)
    atomic_write_bytes(path, data)
    return {"size": len(data), "sha256": sha256(data)}


def read_tensors(path: str | os.PathLike, record: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file, checking size and hash against `record` when given."""
    path = Path(path)
    if not path.is_file():
        raise GenbenchError(f"{path}: file not found")
    size = path.stat().st_size
    if record is not None and size != record.get("size"):
        raise GenbenchError(
            f"{path}: size {size} bytes does not match the {record.get('size')} recorded at save "
            "(truncated or replaced file)"
        )
    check_memory(2.0 * size, f"{path}: reading these weights")  # the file's bytes, then the tensors
    data = path.read_bytes()
    if record is not None:
        if len(data) != record.get("size"):
            raise GenbenchError(
                f"{path}: size {len(data)} bytes does not match the {record.get('size')} recorded at save "
                "(truncated or replaced file)"
            )
        if sha256(data) != record.get("sha256"):
            raise GenbenchError(f"{path}: sha256 does not match the one recorded at save (corrupted file)")
    try:
        return st_load(data)
    except (SafetensorError, Exception) as e:  # safetensors raises several types on garbage
        raise GenbenchError(f"{path}: not a valid safetensors file ({e})") from None


SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1}
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header


def read_safetensors_header(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype, shape)} from a safetensors file's JSON header, read without its tensors: the
    8-byte little-endian header length, then the header, each entry checked against the file size."""
    path = Path(path)
    if not path.is_file():
        raise GenbenchError(f"{path}: file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= min(MAX_HEADER_BYTES, size - 8):
            raise GenbenchError(f"{path}: not a valid safetensors file (header length {n} for a {size}-byte file)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise GenbenchError(f"{path}: not a valid safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise GenbenchError(f"{path}: not a valid safetensors file (header is not a JSON object)")
    out = {}
    data_size = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        ok = (isinstance(entry, dict) and entry.get("dtype") in SAFETENSORS_DTYPES
              and isinstance(entry.get("shape"), list) and all(isinstance(d, int) and d >= 0 for d in entry["shape"])
              and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
              and all(isinstance(o, int) for o in entry["data_offsets"]))
        if not ok:
            raise GenbenchError(f"{path}: not a valid safetensors file (bad header entry for {name!r})")
        begin, end = entry["data_offsets"]
        nbytes = SAFETENSORS_DTYPES[entry["dtype"]] * math.prod(entry["shape"])
        if not 0 <= begin <= end <= data_size or end - begin != nbytes:
            raise GenbenchError(f"{path}: not a valid safetensors file ({name!r} lies outside the file or has the "
                                "wrong byte count for its shape)")
        out[name] = (entry["dtype"], tuple(entry["shape"]))
    return out


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise GenbenchError(f"{path}: file not found")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise GenbenchError(f"{path}: {path.stat().st_size} bytes is far too large for a genbench JSON record "
                            f"(at most {MAX_JSON_BYTES // 2**20} MiB)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GenbenchError(f"{path}: not valid JSON ({e})") from None
    except (RecursionError, ValueError) as e:  # absurd nesting, integers beyond Python's digit limit
        raise GenbenchError(f"{path}: JSON too deeply nested or with out-of-range numbers ({type(e).__name__})") from None


def require_fields(obj, where, **fields) -> dict:
    """`obj` is a JSON object whose `fields` have the given types (bool is not an int here)."""
    if not isinstance(obj, dict):
        raise GenbenchError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key, tp in fields.items():
        value = obj.get(key)
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            names = " or ".join(t.__name__ for t in (tp if isinstance(tp, tuple) else (tp,)))
            raise GenbenchError(f"{where}: field {key!r} must be {names}, got {value!r:.60}")
    return obj


def check_output_file(path: str | os.PathLike, what: str = "--out") -> Path:
    """`path` can be written as a file: not a folder, in a folder that exists and is writable."""
    path = Path(path)
    if path.is_dir():
        raise GenbenchError(f"{what} {path}: is a folder; name a file")
    folder = path.parent
    if not folder.is_dir():
        raise GenbenchError(f"{what} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise GenbenchError(f"{what} {path}: the folder {folder} is not writable")
    return path


def ensure_writable_folder(folder: Path, what: str = "output folder") -> None:
    """Create `folder` if needed; a clear error if it cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GenbenchError(f"{folder}: cannot create {what} ({e.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise GenbenchError(f"{folder}: {what} is not writable")
