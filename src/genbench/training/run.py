"""A run: resolve the configs of a request, train into a run folder, export the model.

    request (model name, dataset, preset, --set items)
      -> resolve_configs: Config defaults <- presets <- dataset presets <- image shape <- --set
      -> run.json (status "running") -> train (genbench.training.loop) -> model/ (save_pretrained)
      -> run.json (status "complete", with the training summary)
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

from genbench import __version__
from genbench.config import apply_sets, from_dict, merge, to_dict
from genbench.data import DatasetSpec, ImageDataset
from genbench.errors import GenbenchError
from genbench.files import ensure_writable_folder
from genbench.limits import check_memory
from genbench.models.base import get_model_class, planned_state, state_bytes
from genbench.models.presets import DATASET_PRESETS, PRESETS
from genbench.utils import count_parameters

from . import distributed
from .config import RESUMABLE_FIELDS, TrainConfig, check_world
from .loop import train
from .run_folder import RunFolder


def resolve_configs(model_name: str, dataset_name: str, shape: tuple[int, int, int], preset: str = "quick",
                    sets: list[str] | tuple = ()) -> tuple[Any, TrainConfig]:
    """Model and train configs from defaults <- preset <- dataset preset <- `--set` items; validated."""
    cls = get_model_class(model_name)
    presets = PRESETS.get(model_name, {})
    if preset not in presets:
        raise GenbenchError(f"unknown preset {preset!r} for {model_name}; choose from {sorted(presets)}")
    # deep copy: nested `--set` items write into these dicts and must not leak into the presets
    dataset_preset = DATASET_PRESETS.get(model_name, {}).get((preset, dataset_name), {})
    chosen = copy.deepcopy(merge(presets[preset], dataset_preset))
    c, h, w = shape
    if h != w:
        raise GenbenchError(f"dataset {dataset_name}: images must be square, got {h}x{w}")
    model_d = merge(chosen.get("model", {}), {"image_channels": c, "image_size": h})
    train_d = dict(chosen.get("train", {}))
    apply_sets({"model": (cls.Config, model_d), "train": (TrainConfig, train_d)}, sets)
    model_cfg = from_dict(cls.Config, model_d, where=f"{model_name} config")
    train_cfg = from_dict(TrainConfig, train_d, where="train config")
    check_stage_names(train_cfg, model_name, tuple(cls.stages))
    check_training_memory(cls, model_cfg, f"{model_name} config")
    return model_cfg, train_cfg


# the model's state, its gradients, AdamW's two moments and an EMA copy
TRAINING_STATE_COPIES = 5


def check_training_memory(cls, model_cfg, where: str) -> None:
    """Refuse a config whose training state would not fit the memory limit, before building it."""
    nbytes = TRAINING_STATE_COPIES * state_bytes(planned_state(cls, model_cfg, where))
    check_memory(nbytes, f"{where}: training a {cls.name} model of this size")


def check_stage_names(train_cfg: TrainConfig, model_name: str, stages: tuple[str, ...]) -> None:
    unknown = sorted(set(train_cfg.stages) - set(stages))
    if unknown:
        raise GenbenchError(f"train config: stages {unknown} are not stages of {model_name} {list(stages)}")


def total_steps(model_name: str, train_cfg: TrainConfig) -> int:
    """Training steps over all of the model's stages."""
    return sum(train_cfg.for_stage(s).steps for s in get_model_class(model_name).stages)


def _flat(d: dict, prefix: str) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def request_differences(info: dict, model_name: str, dataset_spec: DatasetSpec, shape: tuple[int, int, int],
                        preset: str | None = None, sets: list[str] | tuple | None = None) -> list[str]:
    """How the run recorded in `info` (run.json) differs from a request, one "field: here, requested"
    item per difference. The model and the dataset are always compared; the configs only when the
    request names a preset or --set items (None: "as recorded"): resolved, so the order of the items
    does not matter, and a preset changed in the code since the run started shows as a difference."""
    diffs, _ = _differences(info, model_name, dataset_spec, shape, preset, sets)
    return [_describe(d) for d in diffs]


def _describe(diff: tuple[str, Any, Any]) -> str:
    return f"{diff[0]}: {diff[1]} here, {diff[2]} requested"


def _differences(info, model_name, dataset_spec, shape, preset, sets) -> tuple[list[tuple[str, Any, Any]], dict | None]:
    """(differences as (key, recorded, requested), the requested {"model", "train"} configs as JSON,
    or None when the configs were not compared)."""
    if info["model"] != model_name:
        return [("model", info["model"], model_name)], None
    here = _flat(DatasetSpec.from_dict(info.get("dataset", {}), where="the run's recorded dataset").to_dict(), "dataset.")
    wanted = _flat(dataset_spec.to_dict(), "dataset.")
    diffs = [(k, here[k], wanted[k]) for k in here if here[k] != wanted[k]]
    if preset is None and sets is None:
        return diffs, None
    model_cfg, train_cfg = resolve_configs(model_name, dataset_spec.name, shape, preset or info.get("preset", "quick"),
                                           info.get("sets", []) if sets is None else sets)
    requested = {"model": to_dict(model_cfg), "train": to_dict(train_cfg)}
    for section in ("model", "train"):
        here, wanted = _flat(info[f"{section}_config"], f"{section}."), _flat(requested[section], f"{section}.")
        diffs += [(k, here.get(k), wanted.get(k)) for k in sorted(set(here) | set(wanted)) if here.get(k) != wanted.get(k)]
    return diffs, requested


SAMPLER_KEYS = "model.sampler."  # how a diffusion model samples: chosen at evaluation, no part of training


def _resumable(key: str) -> bool:
    """train.<field> or train.stages.<stage>.<field> with a field that a resumed run may change, or
    the sampler (which training does not use)."""
    parts = key.split(".")
    return key.startswith(SAMPLER_KEYS) or (
        parts[0] == "train" and parts[-1] in RESUMABLE_FIELDS and (len(parts) == 2 or parts[1] == "stages"))


def load_training_data(spec: DatasetSpec, progress: bool = True) -> ImageDataset:
    """The dataset of `spec` as this process trains on it: under torchrun only its shard of the
    training images (each process reads and holds 1/W of them). Rank 0 loads first, so that a folder
    is decoded into the cache once, not by every process at the same time; the others then read
    their shard from the cache (or all stop with rank 0's error)."""
    world = distributed.init()
    shard = (world.rank, world.world_size) if world.world_size > 1 else None
    ds = distributed.on_main(lambda: spec.load(shard=shard, progress=progress), what=f"loading dataset {spec.name}")
    return ds if ds is not None else spec.load(shard=shard, progress=False)


def train_run(model_name: str, dataset: ImageDataset, run_dir: str | os.PathLike, preset: str | None = None,
              sets: list[str] | tuple | None = None, resume: bool = False, progress: bool = True,
              interrupt_at: int | None = None, dataset_spec: DatasetSpec | None = None,
              sampler_elsewhere: bool = False, probe=None) -> Path:
    """Train `model_name` on `dataset` into `run_dir`; export the model.

    `run_dir/run.json` records the request (model, dataset spec, preset, --set items), the resolved
    configs, status and costs. A new run takes `preset` (default "quick") and `sets`. An existing
    run is continued (or, when finished, returned as it is) only with `resume=True` and only when it
    is the run of this request (`request_differences`; a None preset or sets mean "as recorded");
    otherwise a GenbenchError names every difference, before any work. An unfinished run may take
    other train steps/lr/grad_clip/log_every/ckpt_every and another sampler (applied and recorded).
    `sampler_elsewhere`: the caller applies the requested sampler where it samples (the comparison's
    evaluation), so a finished run whose sampler differs is reused. `probe`: the quality probe
    that train.fd_every > 0 calls (genbench.evaluation.probe.FDProbe). Under torchrun every process
    calls this; rank 0 alone reads and writes `run_dir` and shares the configs with the others.
    """
    world = distributed.init()
    run = RunFolder(run_dir)
    cls = get_model_class(model_name)
    spec = dataset_spec or dataset.spec or DatasetSpec(dataset.name)
    if not run.exists():  # a new run's request is checked before its folder is created
        _, train_cfg = resolve_configs(model_name, dataset.name, dataset.shape, preset or "quick", sets or ())
        check_world(train_cfg, tuple(cls.stages), dataset.num_train, world.world_size)
    lock = distributed.on_main(run.lock, what=f"locking the run folder {run.path}")  # rank 0 owns the folder
    try:
        return _train_locked(run, cls, model_name, dataset, spec, preset, sets, resume, progress, interrupt_at, world,
                             sampler_elsewhere, probe)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(run: RunFolder, cls, model_name, dataset, spec, preset, sets, resume, progress, interrupt_at,
                  world, sampler_elsewhere, probe) -> Path:
    def setup() -> dict:
        if run.exists():
            info = run.read_info()
            if not resume:
                raise GenbenchError(f"{run.path}: already holds a run; pass --resume to continue it or choose another --out")
            diffs, requested = _differences(info, model_name, spec, dataset.shape, preset, sets)
            if sampler_elsewhere:
                diffs = [d for d in diffs if not d[0].startswith(SAMPLER_KEYS)]
            running = info["status"] == "running"
            fixed = [d for d in diffs if not (running and _resumable(d[0]))]
            if fixed:
                if running:
                    hint = f" (an unfinished run may change only train.{{{', '.join(RESUMABLE_FIELDS)}}} and the sampler)"
                elif all(k.startswith(SAMPLER_KEYS) for k, _, _ in fixed):
                    hint = "; a finished run's sampler is chosen when sampling: genbench sample RUN --sampler NAME --steps N"
                else:
                    hint = ""
                raise GenbenchError(f"{run.path}: holds a run of another request "
                                    f"({'; '.join(map(_describe, fixed))}); choose another --out{hint}")
            if info["status"] == "complete":
                return info
            run.clean_interrupted_writes()
            if diffs:  # only what a resumed run may change: applied from here on, and recorded
                info["model_config"], info["train_config"] = requested["model"], requested["train"]
                info.setdefault("changed_on_resume", []).append(
                    {"sets": list(sets or []), "changes": {k: [a, b] for k, a, b in diffs}})
                run.write_info(info)
            model_cfg = from_dict(cls.Config, info["model_config"], where=f"{run.run_json}: model_config")
            check_training_memory(cls, model_cfg, f"{run.run_json}: model_config")
            train_cfg = from_dict(TrainConfig, info["train_config"], where=f"{run.run_json}: train_config")
            check_stage_names(train_cfg, model_name, tuple(cls.stages))
            check_world(train_cfg, tuple(cls.stages), dataset.num_train, world.world_size)
            return info
        model_cfg, train_cfg = resolve_configs(model_name, dataset.name, dataset.shape, preset or "quick", sets or ())
        check_world(train_cfg, tuple(cls.stages), dataset.num_train, world.world_size)
        ensure_writable_folder(run.path, "run folder")
        info = {
            "model": model_name,
            "dataset": spec.to_dict(),
            "preset": preset or "quick",
            "sets": list(sets or ()),
            "model_config": to_dict(model_cfg),
            "train_config": to_dict(train_cfg),
            "status": "running",
            **({"classes": list(dataset.class_names)} if dataset.class_names else {}),  # label i names classes[i]
            "genbench_version": __version__,
            "torch_version": torch.__version__,
        }
        run.write_info(info)
        return info

    info = distributed.on_main(setup, what=f"preparing the run folder {run.path}", share=True)
    if info["status"] == "complete":
        return run.path
    model_cfg = from_dict(cls.Config, info["model_config"], where=f"{run.run_json}: model_config")
    train_cfg = from_dict(TrainConfig, info["train_config"], where=f"{run.run_json}: train_config")
    torch.manual_seed(train_cfg.seed)  # model initialisation is part of the run's seed (the same on every rank)
    model = cls(model_cfg)
    summary = train(model, dataset.train_pixels, train_cfg, run.path, progress=progress, interrupt_at=interrupt_at,
                    probe=probe, num_images=dataset.train_total)  # None: the whole set, which train() shards itself
    summary["parameters"] = count_parameters(model)
    model.eval()

    def export() -> None:
        try:
            model.save_pretrained(run.model_dir)
        except OSError as e:
            raise GenbenchError(f"{run.model_dir}: cannot write the exported model ({e.strerror or e}); "
                                "the last checkpoint is kept, free some space and rerun with --resume") from None
        info.update(status="complete", summary=summary)
        run.write_info(info)

    distributed.on_main(export, what=f"exporting the model to {run.model_dir}")
    return run.path
