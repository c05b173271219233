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
from genbench.models.base import GenerativeModel

from .config import TrainConfig
from .flops import count_step_flops, phase_steps
from .run import resolve_configs


MAX_BUDGET_STEPS = 10_000_000  # per stage: far beyond any budget a CPU or a GPU finishes


@dataclass
class BudgetPlan:
    model: str
    budget: float  # requested training FLOPs
    preset_flops: int  # the preset's training FLOPs
    scale: float  # k: steps (and schedules) of every stage multiplied by this
    sets: list[str]  # the --set items that apply it
    flops: int  # training FLOPs of the scaled schedule
    steps: dict[str, int]  # per stage


def step_flops_table(model_name: str, model_cfg, train_cfg: TrainConfig,
                     train_images: torch.Tensor) -> tuple[GenerativeModel, dict[tuple[str, int], int]]:
    """(the model, {(stage, phase): FLOPs of one step}) under these configs, each kind of step counted
    once on batches of its stage's size. Each stage is prepared as the trainer prepares it (codebook
    init, scale factor, perceptual network), on a model built with the run's seed, so every term the
    loss computes is counted."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train_cfg.seed)
        model = get_model_class(model_name)(copy.deepcopy(model_cfg))
        table = {}
        for stage in model.stages:
            scfg = train_cfg.for_stage(stage)
            with torch.no_grad():
                model.prepare_stage(stage, train_images)
            batch = train_images[: min(scfg.batch_size, train_images.shape[0])]
            for phase, (first, _) in phase_steps(model, stage, scfg.steps).items():
                table[stage, phase] = count_step_flops(model, stage, batch, first)
    return model, table


def schedule_flops(schedule: GenerativeModel, train_cfg: TrainConfig, table: dict[tuple[str, int], int]) -> dict[str, int]:
    """Each stage's training FLOPs: its steps of each phase (by `schedule`'s flops_phase) times that
    phase's FLOPs per step from `table` (the batch sizes must be those the table was counted with)."""
    return {stage: sum(n * table[stage, phase]
                       for phase, (_, n) in phase_steps(schedule, stage, train_cfg.for_stage(stage).steps).items())
            for stage in schedule.stages}


def training_flops(model_name: str, model_cfg, train_cfg: TrainConfig, train_images: torch.Tensor) -> dict[str, int]:
    """FLOPs of each stage's whole training under these configs."""
    model, table = step_flops_table(model_name, model_cfg, train_cfg, train_images)
    return schedule_flops(model, train_cfg, table)


def plan_budget(model_name: str, dataset_name: str, train_images: torch.Tensor, preset: str, sets: list[str],
                budget: float) -> BudgetPlan:
    """The --set items that give `model_name` `budget` training FLOPs (see the module docstring)."""
    if not budget > 0:
        raise GenbenchError(f"budget must be > 0 FLOPs, got {budget}")
    shape = tuple(train_images.shape[1:])
    cls = get_model_class(model_name)
    model_cfg, train_cfg = resolve_configs(model_name, dataset_name, shape, preset, sets)
    model, table = step_flops_table(model_name, model_cfg, train_cfg, train_images)
    preset_flops = sum(schedule_flops(model, train_cfg, table).values())
    k = budget / preset_flops
    extra = []
    for stage in cls.stages:
        scfg = train_cfg.for_stage(stage)
        steps = max(1, round(k * scfg.steps))
        if steps > MAX_BUDGET_STEPS:
            raise GenbenchError(
                f"budget {budget:.3g} FLOPs: {model_name} would train its stage {stage!r} for {steps:,} steps "
                f"({k:.3g}x its preset's {scfg.steps}); at most {MAX_BUDGET_STEPS:,} per stage: choose a smaller budget")
        extra.append(f"train.stages.{stage}.steps={steps}")
        if scfg.warmup_steps:
            extra.append(f"train.stages.{stage}.warmup_steps={round(k * scfg.warmup_steps)}")
    extra += cls.schedule_sets(model_cfg, k)
    model_cfg2, train_cfg2 = resolve_configs(model_name, dataset_name, shape, preset, [*sets, *extra])
    # the scaled schedule moves phase boundaries (disc_start), not the cost of a step of each phase: an
    # unprepared model of the scaled config says which step is which; the preset's table prices them
    per_stage = schedule_flops(cls(model_cfg2), train_cfg2, table)
    return BudgetPlan(model=model_name, budget=budget, preset_flops=preset_flops, scale=k, sets=extra,
                      flops=sum(per_stage.values()), steps={s: train_cfg2.for_stage(s).steps for s in cls.stages})
