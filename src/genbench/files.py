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
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import GenbenchError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers never see a torn file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise GenbenchError(f"{path}: file not found")
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


def ensure_writable_folder(folder: Path, what: str = "output folder") -> None:
    """Create `folder` if needed; a clear error if it cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GenbenchError(f"{folder}: cannot create {what} ({e.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise GenbenchError(f"{folder}: {what} is not writable")
