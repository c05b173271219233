"""Saving and loading: safetensors for tensors, validated JSON for everything else. Never pickle.

Two kinds of folder:
- a *pretrained* folder (`save_pretrained` / `load_pretrained`): `config.json` + `model.safetensors`,
  the exported model (EMA weights when the run used EMA), what `sample`/`evaluate` read;
- a *training checkpoint* (`save_checkpoint` / `load_checkpoint`): model, EMA, optimizer and RNG
  states + step, written into a fresh folder that is renamed into place and only then pointed at by
  `latest.json`, so a process killed at any moment leaves the previous checkpoint intact.

Every JSON written here records the size and sha256 of the tensor file it belongs to; loading
checks both, so a truncated or corrupted file is refused with a clear error instead of loading junk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .config import from_dict, to_dict
from .errors import GenbenchError
from .utils import atomic_write_bytes

FORMAT_VERSION = 1


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensors_to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    # clone: safetensors refuses tensors that share storage (tied weights), and wants them contiguous on CPU
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return st_save(flat, metadata=metadata)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Write a safetensors file atomically; return its {"size", "sha256"} record."""
    data = tensors_to_bytes(tensors)
    atomic_write_bytes(path, data)
    return {"size": len(data), "sha256": _sha256(data)}


def read_tensors(path: Path, record: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
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
        if _sha256(data) != record.get("sha256"):
            raise GenbenchError(f"{path}: sha256 does not match the one recorded at save (corrupted file)")
    try:
        return st_load(data)
    except (SafetensorError, Exception) as e:  # safetensors raises several types on garbage
        raise GenbenchError(f"{path}: not a valid safetensors file ({e})") from None


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise GenbenchError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GenbenchError(f"{path}: not valid JSON ({e})") from None
    except (RecursionError, ValueError) as e:  # absurd nesting, integers beyond Python's digit limit
        raise GenbenchError(f"{path}: JSON too deeply nested or with out-of-range numbers ({type(e).__name__})") from None


def ensure_writable_folder(folder: Path, what: str = "output folder") -> None:
    """Create `folder` if needed; a clear error if it cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GenbenchError(f"{folder}: cannot create {what} ({e.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise GenbenchError(f"{folder}: {what} is not writable")


# ---------------------------------------------------------------- pretrained (exported) models


def save_pretrained(model: torch.nn.Module, folder: str | os.PathLike, extra: dict | None = None) -> None:
    """Write `folder/model.safetensors` then `folder/config.json` (which records the weights' hash)."""
    folder = Path(folder)
    ensure_writable_folder(folder)
    record = write_tensors(folder / "model.safetensors", model.state_dict())
    write_json(
        folder / "config.json",
        {
            "format_version": FORMAT_VERSION,
            "model": model.name,
            "config": to_dict(model.config),
            "weights": record,
            **(extra or {}),
        },
    )


def load_pretrained(folder: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Mirror of `save_pretrained`: validated config, verified weights, model in eval mode."""
    from .registry import get_model_class

    folder = Path(folder)
    meta = read_json(folder / "config.json")
    if not isinstance(meta, dict) or "model" not in meta or "config" not in meta or "weights" not in meta:
        raise GenbenchError(f"{folder / 'config.json'}: not a genbench model config (needs model, config, weights)")
    cls = get_model_class(meta["model"])
    config = from_dict(cls.Config, meta["config"], where=f"{folder / 'config.json'}: config")
    model = cls(config)
    state = read_tensors(folder / "model.safetensors", meta["weights"])
    load_state(model, state, folder / "model.safetensors")
    return model.to(device).eval()


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], source) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise GenbenchError(
            f"{source}: weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise GenbenchError(f"{source}: {k} has shape {tuple(v.shape)}, the model expects {tuple(expected[k].shape)}")
    module.load_state_dict(state)


# ---------------------------------------------------------------- training checkpoints


def save_checkpoint(ckpt_root: str | os.PathLike, step_name: str, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write a complete checkpoint into `ckpt_root/<step_name>/`, then point `latest.json` at it.

    The folder is built under a temporary name and renamed into place; `latest.json` is replaced
    atomically afterwards; only then are older checkpoints removed. A kill at any moment leaves
    `latest.json` naming a complete checkpoint.
    """
    root = Path(ckpt_root)
    ensure_writable_folder(root)
    final = root / step_name
    tmp = root / f".{step_name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        record = write_tensors(tmp / "state.safetensors", tensors)
        write_json(tmp / "state.json", {"format_version": FORMAT_VERSION, **meta, "tensors": record})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise GenbenchError(f"{root}: could not write checkpoint {step_name} ({e.strerror}); the previous one is kept") from None
    write_json(root / "latest.json", {"checkpoint": step_name})
    for old in root.iterdir():
        if old.is_dir() and old.name != step_name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt_root: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict] | None:
    """Return (tensors, meta) of the latest complete checkpoint, or None when there is none."""
    root = Path(ckpt_root)
    pointer = root / "latest.json"
    if not pointer.exists():
        return None
    pointed = read_json(pointer)
    name = pointed.get("checkpoint") if isinstance(pointed, dict) else None
    if not isinstance(name, str) or "/" in name or name.startswith("."):
        raise GenbenchError(f"{pointer}: invalid checkpoint name {name!r}")
    meta = read_json(root / name / "state.json")
    if not isinstance(meta, dict) or "tensors" not in meta:
        raise GenbenchError(f"{root / name / 'state.json'}: not a genbench checkpoint")
    tensors = read_tensors(root / name / "state.safetensors", meta["tensors"])
    return tensors, meta
