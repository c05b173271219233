"""Equal training compute: a FLOP budget turned into each model's steps, deterministically.

`plan_budget` counts the FLOPs of the preset's whole training (every stage: a VQ model's prior, an
LDM's first stage) with genbench.training.flops, then scales every stage's steps (and warm-up, and
the model's own step-based schedule, `schedule_sets`) by one factor k = budget / preset FLOPs, so the
recipe keeps its shape at another length. The result is a list of `--set` items: the run records
them like any other request, the same command gives the same steps on any machine (FLOPs depend on
shapes only), and the planned FLOPs are recounted with the scaled schedule (a phase boundary like
disc_start moves with it) so the report can show planned beside achieved compute.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from genbench.errors import GenbenchError
from genbench.models import get_model_class

from .config import TrainConfig
from .flops import stage_flops
from .run import resolve_configs


@dataclass
class BudgetPlan:
    model: str
    budget: float  # requested training FLOPs
    preset_flops: int  # the preset's training FLOPs
    scale: float  # k: steps (and schedules) of every stage multiplied by this
    sets: list[str]  # the --set items that apply it
    flops: int  # training FLOPs of the scaled schedule
    steps: dict[str, int]  # per stage


def training_flops(model_name: str, model_cfg, train_cfg: TrainConfig, train_images: torch.Tensor) -> dict[str, int]:
    """FLOPs of each stage's whole training under these configs, on batches of the stage's size.
    Each stage is prepared as the trainer prepares it (codebook init, scale factor, perceptual
    network), on a model built with the run's seed, so every term the loss computes is counted."""
    cls = get_model_class(model_name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train_cfg.seed)
        model = cls(copy.deepcopy(model_cfg))
        out = {}
        for stage in model.stages:
            scfg = train_cfg.for_stage(stage)
            with torch.no_grad():
                model.prepare_stage(stage, train_images)
            batch = train_images[: min(scfg.batch_size, train_images.shape[0])]
            out[stage] = stage_flops(model, stage, scfg.steps, batch)
    return out


def plan_budget(model_name: str, dataset_name: str, train_images: torch.Tensor, preset: str, sets: list[str],
                budget: float) -> BudgetPlan:
    """The --set items that give `model_name` `budget` training FLOPs (see the module docstring)."""
    if not budget > 0:
        raise GenbenchError(f"budget must be > 0 FLOPs, got {budget}")
    shape = tuple(train_images.shape[1:])
    cls = get_model_class(model_name)
    model_cfg, train_cfg = resolve_configs(model_name, dataset_name, shape, preset, sets)
    preset_flops = sum(training_flops(model_name, model_cfg, train_cfg, train_images).values())
    k = budget / preset_flops
    extra = []
    for stage in cls.stages:
        scfg = train_cfg.for_stage(stage)
        extra.append(f"train.stages.{stage}.steps={max(1, round(k * scfg.steps))}")
        if scfg.warmup_steps:
            extra.append(f"train.stages.{stage}.warmup_steps={round(k * scfg.warmup_steps)}")
    extra += cls.schedule_sets(model_cfg, k)
    model_cfg2, train_cfg2 = resolve_configs(model_name, dataset_name, shape, preset, [*sets, *extra])
    per_stage = training_flops(model_name, model_cfg2, train_cfg2, train_images)
    return BudgetPlan(model=model_name, budget=budget, preset_flops=preset_flops, scale=k, sets=extra,
                      flops=sum(per_stage.values()), steps={s: train_cfg2.for_stage(s).steps for s in cls.stages})
