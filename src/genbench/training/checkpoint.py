"""Training checkpoints: what is saved to resume a run exactly, and how it is checked on the way back.

Layout, inside a run folder's `checkpoints/`:

    latest.json                   {"checkpoint": "<stage>-<step:08d>"}: the one to resume from
    <stage>-<step:08d>/state.json format version, stage, step, optimizer settings, the run's summary
                                  so far, and the size + sha256 of state.safetensors
    <stage>-<step:08d>/state.safetensors
                                  model.<name>   the model's state_dict
                                  ema.<name>     the EMA shadow weights (when the stage uses EMA)
                                  optim.<group>.<param index>.<step|exp_avg|exp_avg_sq>  AdamW state

No RNG state is saved: the trainer re-seeds torch's RNG from (seed, stage, step, rank) before every
step (genbench.training.loop.rng_seed), so the step is all a resume needs.

A checkpoint is written into a fresh folder that is renamed into place; only then is `latest.json`
replaced (atomically), and only then are older checkpoints removed: a process killed at any moment
leaves `latest.json` naming a complete checkpoint. Loading validates state.json field by field,
then the hash-checked tensors (never unpickled), then every optimizer setting and tensor against a
fresh optimizer's, so a corrupted or hostile checkpoint is refused with a message naming the file.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path

import torch

from genbench.errors import GenbenchError
from genbench.files import (ensure_writable_folder, fsync_folder, read_json, read_tensors, require_fields, write_json,
                            write_tensors)

FORMAT_VERSION = 1
POINTER = "latest.json"
STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
TENSOR_PREFIXES = ("model.", "ema.", "optim.")


def checkpoint_name(stage: str, step: int) -> str:
    return f"{stage}-{step:08d}"


# ---------------------------------------------------------------- writing


def save_checkpoint(ckpt_root: str | os.PathLike, name: str, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write a complete checkpoint into `ckpt_root/<name>/`, then point `latest.json` at it."""
    root = Path(ckpt_root)
    ensure_writable_folder(root)
    final = root / name
    tmp = root / f".{name}.partial"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        record = write_tensors(tmp / STATE_TENSORS, tensors)
        write_json(tmp / STATE_JSON, {"format_version": FORMAT_VERSION, **meta, "tensors": record})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_folder(root)
        write_json(root / POINTER, {"checkpoint": name})
    except OSError as e:  # latest.json could not be replaced: it still names the previous checkpoint
        shutil.rmtree(tmp, ignore_errors=True)
        raise GenbenchError(f"{root}: could not write checkpoint {name} ({e.strerror or e}); the previous one is kept") from None
    for old in root.iterdir():
        if old.is_dir() and old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def training_state(model, optimizers: dict[str, torch.optim.Optimizer], ema_shadow: dict | None) -> tuple[dict, dict]:
    """(tensors, optimizer settings) of a training state, in the layout above."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema_shadow is not None:
        tensors.update({f"ema.{k}": v for k, v in ema_shadow.items()})
    groups = {}
    for g, opt in optimizers.items():
        sd = opt.state_dict()
        for idx, st in sd["state"].items():
            for key, value in st.items():
                tensors[f"optim.{g}.{idx}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
        groups[g] = sd["param_groups"]
    return tensors, groups


# ---------------------------------------------------------------- reading


def has_checkpoint(ckpt_root: str | os.PathLike) -> bool:
    return (Path(ckpt_root) / POINTER).exists()



def load_checkpoint(ckpt_root: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(tensors, meta) of the checkpoint `latest.json` names, or None when there is none.

    state.json is validated field by field before the hash-checked safetensors file is read; the
    caller checks the stage, step and optimizer state against its model (`check_position`,
    `restore_optimizer`, `check_like`)."""
    root = Path(ckpt_root)
    pointer = root / POINTER
    if not pointer.exists():
        return None
    name = require_fields(read_json(pointer), pointer, checkpoint=str)["checkpoint"]
    if not re.fullmatch(r"[\w-]+", name, flags=re.ASCII):  # a folder name, never a path
        raise GenbenchError(f"{pointer}: invalid checkpoint name {name!r}")
    where = root / name / STATE_JSON
    meta = require_fields(read_json(where), where, format_version=int, stage=str, step=int, optimizers=dict,
                          summary=dict, tensors=dict)
    require_fields(meta["tensors"], f"{where}: tensors", size=int, sha256=str)
    if meta["format_version"] != FORMAT_VERSION:
        raise GenbenchError(f"{where}: format_version {meta['format_version']} is not {FORMAT_VERSION}")
    stage_summaries = require_fields(meta["summary"], f"{where}: summary", stages=dict)["stages"]
    for s, entry in stage_summaries.items():
        require_fields(entry, f"{where}: summary.stages.{s}", wall_time_s=(int, float))
    tensors = read_tensors(root / name / STATE_TENSORS, meta["tensors"])
    unexpected = sorted(k for k in tensors if not k.startswith(TENSOR_PREFIXES))
    if unexpected:
        raise GenbenchError(f"{root / name / STATE_TENSORS}: unexpected tensors {unexpected[:5]}")
    meta["where"] = str(root / name)
    return tensors, meta


def check_position(meta: dict, stages: tuple[str, ...], steps_of) -> None:
    """The checkpoint's stage is one of `stages` and its step lies in [0, steps_of(stage)]."""
    where = Path(meta["where"]) / STATE_JSON
    if meta["stage"] not in stages:
        raise GenbenchError(f"{where}: stage {meta['stage']!r} is not a stage of this model {list(stages)}")
    if not 0 <= meta["step"] <= steps_of(meta["stage"]):
        raise GenbenchError(f"{where}: step {meta['step']} is outside [0, {steps_of(meta['stage'])}]")


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under `prefix` ("model." or "ema."), with the prefix removed."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def check_like(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], where) -> None:
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise GenbenchError(f"{where}: do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise GenbenchError(f"{where}: {k} has shape {tuple(v.shape)}, the model expects {tuple(expected[k].shape)}")


def _same_kind(stored, fresh) -> bool:
    """A JSON value from a checkpoint has the type of the optimizer setting it replaces."""
    if isinstance(fresh, bool) or fresh is None:
        return type(stored) is type(fresh)
    if isinstance(fresh, (int, float)):
        if isinstance(stored, bool) or not isinstance(stored, (int, float)):
            return False
        try:
            return math.isfinite(float(stored))
        except OverflowError:  # an int beyond float range
            return False
    if isinstance(fresh, (tuple, list)):
        return isinstance(stored, list) and len(stored) == len(fresh) and all(map(_same_kind, stored, fresh))
    return type(stored) is type(fresh)


def restore_optimizer(name: str, opt: torch.optim.Optimizer, tensors: dict, stored_groups, where) -> None:
    """Restore `opt` from a checkpoint after checking every setting and tensor against a fresh state."""
    fresh = opt.state_dict()["param_groups"]
    if not isinstance(stored_groups, list) or len(stored_groups) != len(fresh):
        raise GenbenchError(f"{where}: optimizer {name!r} must have {len(fresh)} parameter group(s)")
    groups = []
    for stored, new in zip(stored_groups, fresh):
        if not isinstance(stored, dict) or stored.get("params") != new["params"]:
            raise GenbenchError(f"{where}: optimizer {name!r} parameter groups do not match the model")
        unknown = sorted(set(stored) - set(new))
        if unknown:
            raise GenbenchError(f"{where}: optimizer {name!r} has unknown setting(s) {unknown}")
        for key, value in stored.items():
            if key != "params" and not _same_kind(value, new[key]):
                raise GenbenchError(f"{where}: optimizer {name!r} setting {key!r} = {value!r:.60} has the wrong type")
        groups.append({**new, **stored})  # settings a newer torch added keep their defaults
    params = {i: p for g, pg in zip(fresh, opt.param_groups) for i, p in zip(g["params"], pg["params"])}
    state: dict[int, dict] = {}
    prefix = f"optim.{name}."
    for k, v in tensors.items():
        if not k.startswith(prefix):
            continue
        idx, _, key = k[len(prefix):].partition(".")
        if not idx.isdigit() or int(idx) not in params or key not in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            raise GenbenchError(f"{where}: unexpected optimizer tensor {k!r}")
        expected = () if key == "step" else tuple(params[int(idx)].shape)
        if tuple(v.shape) != expected or not v.is_floating_point():
            raise GenbenchError(f"{where}: optimizer tensor {k!r} is {v.dtype} {tuple(v.shape)}, expected float {expected}")
        state.setdefault(int(idx), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": groups})
