"""Training compute in FLOPs: counted once per step kind, so budgets are deterministic.

A training step's FLOPs depend only on tensor shapes, not on the data or the machine, so they are
counted once, with torch.utils.flop_counter.FlopCounterMode, on a throwaway copy of the model: the
model's own `loss` and a backward pass per optimizer group, exactly as the trainer runs them
(genbench.training.loop). FlopCounterMode counts the matrix products, convolutions and attention
(2 FLOPs per multiply-add, forward and backward); elementwise work, normalisation and the optimizer
update are not counted, as in the usual 6 N FLOPs-per-token accounting (Kaplan et al. 2020).

A model whose step changes cost during a stage (VQ-GAN's discriminator switches on at `disc_start`)
says so with `flops_phase(stage, step)`; each phase is counted once. `StepFlops` is the trainer's
cache; `phase_steps` splits a stage's steps by phase, so genbench.training.budget can price a whole
training before it runs (`genbench compare --budget`).
"""

from __future__ import annotations

import copy

import torch
from torch.utils.flop_counter import FlopCounterMode

from genbench.models.base import GenerativeModel
from genbench.utils import autocast


def count_step_flops(model: GenerativeModel, stage: str, batch: torch.Tensor, step: int, bf16: bool = False) -> int:
    """FLOPs of one training step of `stage` at `step` on `batch` (forward + the backward of every
    optimizer group), counted on a deep copy so that the model, its buffers (a VQ codebook's EMA) and
    the global RNG are left as they were."""
    probe = copy.deepcopy(model)
    probe.train()
    groups = probe.optimizer_groups(stage)
    with torch.random.fork_rng(devices=[]), FlopCounterMode(display=False) as counter:
        torch.manual_seed(0)
        with autocast(batch.device, bf16):
            out = probe.loss(batch, step=step, stage=stage)
        names = list(groups)
        for i, g in enumerate(names):
            loss = out["loss"] if g == "main" else out[f"loss_{g}"]
            params = [p for p in groups[g] if p.requires_grad]
            if loss.requires_grad and params:
                loss.backward(inputs=params, retain_graph=i < len(names) - 1)
    return int(counter.get_total_flops())


class StepFlops:
    """FLOPs per training step, counted at the first step of each (stage, phase) and reused.

    `global_batch`: the step's images over all processes, when this process holds only some of them
    (torchrun): a step's FLOPs are proportional to its images, so the count on this process's
    `batch` is scaled to the global batch (exact with one process)."""

    def __init__(self, model: GenerativeModel, bf16: bool = False):
        self.model, self.bf16 = model, bf16
        self.counted: dict[tuple[str, int], tuple[int, int]] = {}  # key -> (FLOPs, images counted on)

    def known(self, stage: str, step: int) -> bool:
        """Whether this kind of step is counted already (then a call costs a dict lookup)."""
        return (stage, self.model.flops_phase(stage, step)) in self.counted

    def __call__(self, stage: str, step: int, batch: torch.Tensor, global_batch: int | None = None) -> int:
        key = (stage, self.model.flops_phase(stage, step))
        if key not in self.counted:
            self.counted[key] = (count_step_flops(self.model, stage, batch, step, self.bf16), batch.shape[0])
        flops, images = self.counted[key]
        return flops if global_batch is None else flops * global_batch // images


def phase_steps(model: GenerativeModel, stage: str, steps: int) -> dict[int, tuple[int, int]]:
    """{phase: (its first step, its number of steps)} over the `steps` steps of `stage`."""
    out: dict[int, tuple[int, int]] = {}
    for step in range(steps):
        phase = model.flops_phase(stage, step)
        first, n = out.get(phase, (step, 0))
        out[phase] = (first, n + 1)
    return out

