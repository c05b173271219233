"""One trainer for every model: AdamW, clipping, EMA, bf16 autocast, checkpoints, exact resume.

The loop is flat on purpose (nanoGPT's train.py): sample a batch, `model.loss(batch)`, backward,
step, maybe log, maybe checkpoint. Models with several optimizers (a GAN's generator and
discriminator) name their parameter groups; models trained in stages (a VQ-VAE then its prior)
name their stages, and each stage is trained, checkpointed and resumed in turn.

Resume is exact on CPU: the checkpoint holds the model, EMA, optimizer state, the global torch RNG
and the data-order generator, so an interrupted-and-resumed run ends with the same weights as an
uninterrupted one (tests/test_trainer.py checks bit equality).
"""

from __future__ import annotations

import copy
import json
import math
import os
import resource
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from . import __version__
from .checkpoint import load_checkpoint, read_json, save_checkpoint, save_pretrained, write_json
from .config import from_dict, merge, to_dict
from .errors import GenbenchError
from .utils import autocast, bf16_effective, count_parameters, select_device


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 0.0  # max global grad norm; 0 disables
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    ema_decay: float = 0.0  # 0 disables; the exported model then holds the raw weights
    bf16: bool = False  # bf16 autocast of forward + loss: on CUDA, and on CPUs with native bf16 only
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 500
    device: str = "auto"
    # per-stage overrides of the fields above, e.g. {"prior": {"steps": 2000, "lr": 3e-4}}
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    def validate(self) -> None:
        checks = [
            (self.steps >= 0, "steps must be >= 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)"),
            (self.grad_clip >= 0, "grad_clip must be >= 0"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (0 <= self.ema_decay < 1, "ema_decay must be in [0, 1)"),
            (self.log_every >= 1, "log_every must be >= 1"),
            (self.ckpt_every >= 1, "ckpt_every must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise GenbenchError(f"train config: {msg}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise GenbenchError(f"train config: device must be auto, cpu or cuda[:N], got {self.device!r}")
        base = {k: v for k, v in to_dict(self).items() if k != "stages"}
        for stage, over in self.stages.items():
            if "stages" in over:
                raise GenbenchError(f"train config: stages.{stage} cannot nest stages")
            from_dict(TrainConfig, merge(base, over), where=f"train config: stages.{stage}")

    def for_stage(self, stage: str) -> TrainConfig:
        over = self.stages.get(stage, {})
        return replace(from_dict(TrainConfig, merge({k: v for k, v in to_dict(self).items() if k != "stages"}, over)))


class TrainingDiverged(GenbenchError):
    pass


class Interrupted(Exception):
    """Raised by the `interrupt_at` test hook after a checkpoint: simulates a killed process."""


def lr_at(cfg: TrainConfig, step: int) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr


def optimizer_groups(model, stage: str) -> dict[str, list[torch.nn.Parameter]]:
    fn = getattr(model, "optimizer_groups", None)
    groups = fn(stage) if callable(fn) else {"main": [p for p in model.parameters() if p.requires_grad]}
    if "main" not in groups:
        raise GenbenchError(f"{model.name}: optimizer_groups({stage!r}) must contain a 'main' group")
    return groups


class EMA:
    """Exponential moving average of parameters (buffers are copied, not averaged)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._params = dict(model.named_parameters())

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        params = [p.detach() for k, p in self._params.items()]
        shadows = [self.shadow[k] for k in self._params]
        torch._foreach_lerp_(shadows, params, 1.0 - self.decay)
        for k, b in model.named_buffers():
            self.shadow[k].copy_(b)

    def copy_to(self, model: torch.nn.Module) -> None:
        model.load_state_dict(self.shadow)


def _flatten_optimizer(name: str, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            tensors[f"optim.{name}.{idx}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, sd["param_groups"]


def _unflatten_optimizer(name: str, opt: torch.optim.Optimizer, tensors: dict, groups: list) -> None:
    state: dict[int, dict] = {}
    prefix = f"optim.{name}."
    for k, v in tensors.items():
        if k.startswith(prefix):
            idx, key = k[len(prefix):].split(".", 1)
            state.setdefault(int(idx), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def train(
    model: torch.nn.Module,
    train_images: torch.Tensor,
    cfg: TrainConfig,
    run_dir: str | os.PathLike,
    progress: bool = True,
    interrupt_at: int | None = None,
) -> dict:
    """Train `model` through all its stages inside `run_dir`, resuming from its latest checkpoint.

    Returns a summary dict (wall time, images/s per stage, peak memory). `interrupt_at` (tests only)
    raises `Interrupted` right after the checkpoint of that global step is written.
    """
    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    device = select_device(cfg.device)
    model.to(device)
    data = train_images.to(device)
    stages = tuple(getattr(model, "stages", ("main",)))

    torch.manual_seed(cfg.seed)
    resumed = load_checkpoint(ckpt_root)
    stage_idx, step, summary = 0, 0, {"stages": {}}
    state_tensors, meta = resumed if resumed else ({}, {})
    if resumed:
        from .checkpoint import load_state

        load_state(model, {k[6:]: v for k, v in state_tensors.items() if k.startswith("model.")}, ckpt_root)
        stage_idx, step, summary = stages.index(meta["stage"]), meta["step"], meta["summary"]
    log_file = open(run_dir / "log.jsonl", "a")
    global_offset = sum(cfg.for_stage(s).steps for s in stages[:stage_idx])
    try:
        for si in range(stage_idx, len(stages)):
            stage = stages[si]
            scfg = cfg.for_stage(stage)
            groups = optimizer_groups(model, stage)
            opts = {
                g: torch.optim.AdamW(ps, lr=scfg.lr, betas=(scfg.beta1, scfg.beta2), weight_decay=scfg.weight_decay)
                for g, ps in groups.items()
            }
            ema = None
            stage_elapsed = 0.0
            if resumed and si == stage_idx:
                for g, opt in opts.items():
                    _unflatten_optimizer(g, opt, state_tensors, meta["optimizers"][g])
                if scfg.ema_decay > 0:
                    ema = EMA(model, scfg.ema_decay)
                    ema.shadow = {k[4:]: v.to(device) for k, v in state_tensors.items() if k.startswith("ema.")}
                torch.set_rng_state(state_tensors["rng.torch"])
                if device.type == "cuda" and "rng.cuda" in state_tensors:
                    torch.cuda.set_rng_state(state_tensors["rng.cuda"])
                stage_elapsed = summary["stages"].get(stage, {}).get("wall_time_s", 0.0)
            else:
                step = 0
                prepare = getattr(model, "prepare_stage", None)
                if callable(prepare):
                    with torch.no_grad():
                        prepare(stage, data)
                if scfg.ema_decay > 0:
                    ema = EMA(model, scfg.ema_decay)  # after prepare_stage: it may set buffers or params
            step = _train_stage(model, data, scfg, stage, step, opts, ema, ckpt_root, log_file,
                                summary, stage_elapsed, global_offset, progress, interrupt_at, device)
            if ema is not None:
                # later stages (and the export) continue from the averaged weights
                ema.copy_to(model)
            global_offset += scfg.steps
        finish = getattr(model, "finish_training", None)
        if callable(finish):
            model.eval()
            with torch.no_grad():
                finish(data)
    finally:
        log_file.close()
    summary["peak_memory_mb"] = _peak_memory_mb(device)
    summary["wall_time_s"] = sum(s["wall_time_s"] for s in summary["stages"].values())
    return summary


def _train_stage(model, data, scfg, stage, step, opts, ema, ckpt_root, log_file,
                 summary, elapsed, global_offset, progress, interrupt_at, device):
    n = data.shape[0]
    bs = min(scfg.batch_size, n)
    batches_per_epoch = n // bs
    # each epoch's order is a pure function of (seed, stage, epoch): nothing to restore on resume
    stage_seed = scfg.seed * 1_000_003 + sum(map(ord, stage))
    perm, perm_epoch = None, -1
    model.train()
    bar = tqdm(total=scfg.steps, initial=step, desc=f"{model.name}:{stage}", unit="step",
               disable=not progress, dynamic_ncols=True, leave=False)
    window_t, window_steps = time.perf_counter(), 0
    stage_summary = summary["stages"].setdefault(stage, {"steps": scfg.steps, "batch_size": bs})
    t_start = time.perf_counter()
    try:
        while step < scfg.steps:
            epoch, pos = divmod(step, batches_per_epoch)
            if epoch != perm_epoch:
                gen = torch.Generator().manual_seed(stage_seed * 100_003 + epoch)
                perm, perm_epoch = torch.randperm(n, generator=gen), epoch
            idx = perm[pos * bs:(pos + 1) * bs].to(data.device)
            batch = data.index_select(0, idx)
            lr = lr_at(scfg, step)
            for opt in opts.values():
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.zero_grad(set_to_none=True)
            with autocast(device, scfg.bf16):
                out = model.loss(batch, step=step, stage=stage)
            losses = {g: out["loss"] if g == "main" else out[f"loss_{g}"] for g in opts}
            if not all(torch.isfinite(v.detach()).all() for v in losses.values()):
                bad = {g: float(v.detach()) for g, v in losses.items()}
                raise TrainingDiverged(
                    f"{model.name}: stage {stage!r} step {step}: loss is not finite ({bad}); training stopped, "
                    f"the last good checkpoint in {ckpt_root} is kept (try a lower lr or --set train.grad_clip=1.0)"
                )
            names = list(opts)
            for i, g in enumerate(names):
                params = [p for grp in opts[g].param_groups for p in grp["params"]]
                losses[g].backward(inputs=params, retain_graph=i < len(names) - 1)
                if scfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, scfg.grad_clip)
            for opt in opts.values():
                opt.step()
            if ema is not None:
                ema.update(model)
            step += 1
            window_steps += 1
            if step % scfg.log_every == 0 or step == scfg.steps:
                now = time.perf_counter()
                ips = window_steps * bs / max(now - window_t, 1e-9)
                window_t, window_steps = now, 0
                record = {"stage": stage, "step": step, "global_step": global_offset + step, "lr": lr,
                          "images_per_s": round(ips, 2)}
                record.update({k: float(v.detach().float()) for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1})
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                bar.set_postfix(loss=f"{record['loss']:.4g}", img_s=f"{ips:.0f}")
            bar.update(1)
            if step % scfg.ckpt_every == 0 or step == scfg.steps:
                stage_summary["wall_time_s"] = elapsed + time.perf_counter() - t_start
                stage_summary["images_per_s"] = step * bs / max(stage_summary["wall_time_s"], 1e-9)
                _save(model, opts, ema, ckpt_root, stage, step, summary, device)
                if interrupt_at is not None and global_offset + step == interrupt_at:
                    raise Interrupted(f"interrupted after step {interrupt_at}")
    finally:
        bar.close()
    return step


def _save(model, opts, ema, ckpt_root, stage, step, summary, device):
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.shadow.items()})
    groups = {}
    for g, opt in opts.items():
        t, pg = _flatten_optimizer(g, opt)
        tensors.update(t)
        groups[g] = pg
    tensors["rng.torch"] = torch.get_rng_state()
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    meta = {"stage": stage, "step": step, "optimizers": groups, "summary": summary}
    save_checkpoint(ckpt_root, f"{stage}-{step:08d}", tensors, meta)


# ---------------------------------------------------------------- runs: configs + data + train + export


def resolve_configs(model_name: str, dataset_name: str, shape: tuple[int, int, int], preset: str = "quick",
                    sets: list[str] | tuple = ()) -> tuple[Any, TrainConfig]:
    """Model and train configs from defaults <- preset <- dataset preset <- `--set` items; validated."""
    from .config import apply_sets
    from .registry import get_model_class

    cls = get_model_class(model_name)
    presets = getattr(cls, "PRESETS", {})
    if preset not in presets:
        raise GenbenchError(f"unknown preset {preset!r} for {model_name}; choose from {sorted(presets)}")
    chosen = merge(presets[preset], getattr(cls, "DATASET_PRESETS", {}).get((preset, dataset_name), {}))
    c, h, w = shape
    if h != w:
        raise GenbenchError(f"dataset {dataset_name}: images must be square, got {h}x{w}")
    model_d = merge(chosen.get("model", {}), {"image_channels": c, "image_size": h})
    train_d = dict(chosen.get("train", {}))
    apply_sets({"model": (cls.Config, model_d), "train": (TrainConfig, train_d)}, sets)
    model_cfg = from_dict(cls.Config, model_d, where=f"{model_name} config")
    train_cfg = from_dict(TrainConfig, train_d, where="train config")
    stages = tuple(getattr(cls, "stages", ("main",)))
    unknown = sorted(set(train_cfg.stages) - set(stages))
    if unknown:
        raise GenbenchError(f"train config: stages {unknown} are not stages of {model_name} {list(stages)}")
    return model_cfg, train_cfg


def train_run(model_name: str, dataset, run_dir: str | os.PathLike, preset: str = "quick",
              sets: list[str] | tuple = (), resume: bool = False, progress: bool = True,
              interrupt_at: int | None = None, dataset_spec: dict | None = None) -> Path:
    """Train `model_name` on `dataset` (a genbench.data.ImageDataset) into `run_dir`; export the model.

    `run_dir/run.json` records the configs, dataset, status and costs. An existing, unfinished run is
    continued only with `resume=True`; a finished one is left as it is.
    """
    from .registry import get_model_class

    run_dir = Path(run_dir)
    run_json = run_dir / "run.json"
    if run_json.exists():
        info = read_json(run_json)
        if info.get("status") == "complete" and resume:
            return run_dir
        if not resume:
            raise GenbenchError(f"{run_dir}: already holds a run; pass --resume to continue it or choose another --out")
        if info.get("model") != model_name:
            raise GenbenchError(f"{run_dir}: holds a {info.get('model')} run, not {model_name}")
        cls = get_model_class(model_name)
        model_cfg = from_dict(cls.Config, info["model_config"], where=f"{run_json}: model_config")
        train_cfg = from_dict(TrainConfig, info["train_config"], where=f"{run_json}: train_config")
    else:
        cls = get_model_class(model_name)
        model_cfg, train_cfg = resolve_configs(model_name, dataset.name, dataset.shape, preset, sets)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise GenbenchError(f"{run_dir}: cannot create run folder ({e.strerror})") from None
        if not os.access(run_dir, os.W_OK):
            raise GenbenchError(f"{run_dir}: run folder is not writable")
        info = {
            "model": model_name,
            "dataset": dataset_spec or {"name": dataset.name},
            "preset": preset,
            "sets": list(sets),
            "model_config": to_dict(model_cfg),
            "train_config": to_dict(train_cfg),
            "status": "running",
            "genbench_version": __version__,
            "torch_version": torch.__version__,
        }
        write_json(run_json, info)
    torch.manual_seed(train_cfg.seed)  # model initialisation is part of the run's seed
    model = cls(model_cfg)
    summary = train(model, dataset.train, train_cfg, run_dir, progress=progress, interrupt_at=interrupt_at)
    summary["parameters"] = count_parameters(model)
    summary["device"] = str(select_device(train_cfg.device))
    summary["bf16_used"] = bf16_effective(select_device(train_cfg.device), train_cfg.bf16)
    model.eval()
    save_pretrained(model, run_dir / "model")
    info.update(status="complete", summary=summary)
    write_json(run_json, info)
    return run_dir
