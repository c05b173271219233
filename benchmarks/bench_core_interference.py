"""How much does work on one core slow a training step on the other? (issue 14's measurement caveat)

    python benchmarks/bench_core_interference.py [--models ae,ddpm] [--steps 30] [--cores 0,1]

The time-to-quality curves count training CPU seconds of one process pinned to one core. On a 2-core
machine the other core is rarely idle, and what runs there changes those seconds. This pins a
"victim" training loop (the Fashion-MNIST standard preset's model, one thread, random batches of the
preset's batch size, AdamW, the preset's bf16 setting where the CPU has it) to the first core and
times `--steps` steps in process CPU seconds, once with the second core idle and once beside each
"neighbour": the same loop of each model, endlessly, on the second core. Prints CPU ms per step and
the slowdown against the idle neighbour, with the CPU's flags.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from bench_time_to_quality import cpu_flags


def make_step(model_name: str):
    from genbench.models import get_model_class
    from genbench.training.run import resolve_configs
    from genbench.utils import autocast

    torch.set_num_threads(1)
    model_cfg, train_cfg = resolve_configs(model_name, "fashion-mnist", (1, 28, 28), "standard")
    torch.manual_seed(0)
    model = get_model_class(model_name)(model_cfg)
    stage = list(model.stages)[-1]
    cfg = train_cfg.for_stage(stage)
    batch = torch.rand(cfg.batch_size, 1, 28, 28)
    opt = torch.optim.AdamW(model.parameters(), cfg.lr)
    device = torch.device("cpu")

    def step() -> None:
        with autocast(device, cfg.bf16):
            loss = model.loss(batch, 0, stage)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def neighbour(model_name: str) -> None:
    step = make_step(model_name)
    while True:
        step()


def time_steps(model_name: str, steps: int) -> float:
    step = make_step(model_name)
    for _ in range(3):
        step()
    start = time.process_time()
    for _ in range(steps):
        step()
    return (time.process_time() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="ae,ddpm")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--cores", default="0,1")
    ap.add_argument("--neighbour", default=None, help=argparse.SUPPRESS)  # internal: run as the neighbour
    args = ap.parse_args()
    if args.neighbour:
        neighbour(args.neighbour)
        return
    victim_core, other_core = (int(c) for c in args.cores.split(","))
    os.sched_setaffinity(0, {victim_core})
    models = args.models.split(",")
    results = {"cpu_flags": cpu_flags(), "steps": args.steps, "ms_per_step": {}}
    for victim in models:
        row = {}
        for other in [None, *models]:
            proc = None
            if other:
                proc = subprocess.Popen(["taskset", "-c", str(other_core), sys.executable, __file__,
                                         "--neighbour", other], cwd=os.path.dirname(os.path.abspath(__file__)))
                time.sleep(8)  # past the neighbour's start-up
            try:
                row[other or "idle"] = 1000 * time_steps(victim, args.steps)
            finally:
                if proc:
                    proc.kill()
                    proc.wait()
            print(f"{victim} beside {other or 'an idle core'}: {row[other or 'idle']:.0f} CPU ms/step "
                  f"({row[other or 'idle'] / row['idle']:.2f}x the idle figure)", flush=True)
        results["ms_per_step"][victim] = row
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
