"""The train config: one typed dataclass for every model, with per-stage overrides.

Saved in run.json beside the model config; presets (genbench.models.presets) and `--set train.*`
items fill it in.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from genbench.config import from_dict, merge, to_dict
from genbench.errors import GenbenchError


# what a resumed run may change (`genbench train --resume --set train.lr=...`): the rest would make the
# checkpoint describe another run
RESUMABLE_FIELDS = ("steps", "lr", "grad_clip", "log_every", "ckpt_every", "fd_every")


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
    ema_warmup: bool = False  # decay min(ema_decay, (1 + n) / (10 + n)) at update n (training.ema.EMA)
    bf16: bool = False  # bf16 autocast of forward + loss: on CUDA, and on CPUs with native bf16 only
    # NHWC weights and batches while this stage trains (torch.channels_last): oneDNN's convolutions are
    # faster so on CPU, bf16 ones most (docs/benchmarks.md, issue 14); the weights are saved and handed
    # on in the default layout
    channels_last: bool = False
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 500
    # quality probes: the FD of a few samples every fd_every steps of the last stage, logged with the
    # training compute spent (0: off; `genbench compare` turns it on, genbench.evaluation.probe)
    fd_every: int = 0
    device: str = "auto"
    # per-stage overrides of the fields above, e.g. {"prior": {"steps": 2000, "lr": 3e-4}}
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    def validate(self) -> None:
        checks = [
            (self.steps >= 1, "steps must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)"),
            (self.grad_clip >= 0, "grad_clip must be >= 0"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (0 <= self.ema_decay < 1, "ema_decay must be in [0, 1)"),
            (self.log_every >= 1, "log_every must be >= 1"),
            (self.ckpt_every >= 1, "ckpt_every must be >= 1"),
            (self.fd_every >= 0, "fd_every must be >= 0 (0 turns the quality probes off)"),
            (0 <= self.seed < 2**32, "seed must be in [0, 2**32)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise GenbenchError(f"train config: {msg}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise GenbenchError(f"train config: device must be auto, cpu or cuda[:N], got {self.device!r}")
        base = {k: v for k, v in to_dict(self).items() if k != "stages"}
        for stage, over in self.stages.items():
            if "stages" in over:
                raise GenbenchError(f"train config: stages.{stage} cannot nest stages")
            try:
                from_dict(TrainConfig, merge(base, over), where=f"train config: stages.{stage}")
            except GenbenchError as e:
                if f"stages.{stage}" in str(e):
                    raise
                raise GenbenchError(str(e).replace("train config: ", f"train config: stages.{stage}: ", 1)) from None

    def for_stage(self, stage: str) -> TrainConfig:
        over = self.stages.get(stage, {})
        return from_dict(TrainConfig, merge({k: v for k, v in to_dict(self).items() if k != "stages"}, over))


def lr_at(cfg: TrainConfig, step: int) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr


def check_world(cfg: TrainConfig, stages: tuple[str, ...], num_images: int, world_size: int) -> None:
    """Each rank takes batch_size / world_size images of every global batch: it must divide evenly."""
    for stage in stages:
        bs = min(cfg.for_stage(stage).batch_size, num_images)
        if bs % world_size:
            where = f" (stage {stage!r})" if len(stages) > 1 else ""
            raise GenbenchError(
                f"train config: batch_size {bs}{where} does not split evenly over {world_size} processes; "
                f"choose a multiple of {world_size} (the global batch is what the config says, split across ranks)"
            )
