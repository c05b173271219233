"""What a training step costs in each precision and memory layout, measured side by side (issue 14)

    python benchmarks/bench_step_cost.py [--models ae,vae,vqvae,vqgan,ddpm,ldm] [--rounds 4] [--steps 5] \
        [--out step_cost.json]

The time-to-quality runs count process CPU seconds, and on a shared host those drift by up to 40 %
between runs taken hours apart (docs/benchmarks.md). A ratio of two recipes that do the same steps
in another precision or layout must therefore come from the two timed together. This builds, for
every stage of each Fashion-MNIST standard preset, four copies of the model (fp32 or bf16 autocast,
NCHW or channels-last weights and batches; a fifth where the stage has attention: bf16 NCHW with
torch's fused attention kernel, genbench.nets.attention) and times their training steps (forward, loss, backward,
AdamW, one thread) in interleaved rounds, so that drift hits all four alike. The VQ-GAN's autoencoder
stage is timed before and after its discriminator starts. It prints CPU ms per step, each stage's
share of a whole preset run, and per model the estimated training CPU seconds of

- "before": the presets before this change (bf16 in the diffusion stages only, there with the fused
  attention kernel; NCHW everywhere), and
- "preset": the presets as they are (each stage's `bf16` and `channels_last`),

with their ratio. bf16 is timed only where `genbench.utils.cpu_has_native_bf16()` (elsewhere the
trainer ignores it, and emulated bf16 is 10-50x slower); the CPU's flags are in the output.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench_time_to_quality import cpu_flags

# (bf16, channels_last, fused attention in bf16 on CPU: the kernel the presets used before)
COMBOS = [(False, False, False), (True, False, False), (False, True, False), (True, True, False)]
FUSED = (True, False, True)


def combo_name(bf16: bool, channels_last: bool, fused: bool = False) -> str:
    name = f"{'bf16' if bf16 else 'fp32'} {'NHWC' if channels_last else 'NCHW'}"
    return f"{name} fused-attention" if fused else name


def has_attention(model: torch.nn.Module) -> bool:
    from genbench.nets.transformer import CausalSelfAttention
    from genbench.nets.unet import AttentionBlock

    return any(isinstance(m, (AttentionBlock, CausalSelfAttention)) for m in model.modules())


def make_step(model_name: str, stage_index: int, step_index: int, bf16: bool, channels_last: bool,
              fused: bool = False):
    """One training step of the preset's model at stage `stage_index`, as the trainer runs it (with
    `fused`: torch's fused attention kernel in bf16 on CPU, genbench.nets.attention)."""
    import genbench.nets.attention as attention_module

    from genbench.models import get_model_class
    from genbench.training.run import resolve_configs
    from genbench.utils import autocast

    model_cfg, train_cfg = resolve_configs(model_name, "fashion-mnist", (1, 28, 28), "standard")
    torch.manual_seed(0)
    model = get_model_class(model_name)(model_cfg)
    stage = list(model.stages)[stage_index]
    if model_name == "vqgan" and stage == "autoencoder" and model_cfg.perceptual_weight > 0:
        from genbench.nets.perceptual import PerceptualNetConfig, PerceptualNetwork, PerceptualVGG

        # the cost of the perceptual distance does not depend on its weights: an untrained network
        vgg = PerceptualVGG(PerceptualNetConfig(in_channels=1))
        model.set_perceptual_network(PerceptualNetwork(model=vgg, source="file", weights_sha256=""))
    cfg = train_cfg.for_stage(stage)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=layout)
    batch = torch.rand(cfg.batch_size, 1, 28, 28).contiguous(memory_format=layout)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, cfg.lr)
    device = torch.device("cpu")

    def step() -> None:
        attention_module.EXPLICIT_BF16_ON_CPU = not fused
        try:
            with autocast(device, bf16):
                loss = model.loss(batch, step_index, stage)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        finally:
            attention_module.EXPLICIT_BF16_ON_CPU = True

    step.attention = has_attention(model)
    return stage, cfg, step


def phases(model_name: str, stage: str, steps: int) -> list[tuple[int, int]]:
    """(step index to time, steps it stands for) of one stage: the VQ-GAN's autoencoder stage changes
    cost when its discriminator starts."""
    if model_name == "vqgan" and stage == "autoencoder":
        from genbench.training.run import resolve_configs

        start = resolve_configs("vqgan", "fashion-mnist", (1, 28, 28), "standard")[0].disc_start
        if 0 < start < steps:
            return [(0, start), (start, steps - start)]
    return [(0, steps)]


def time_stage(model_name: str, stage_index: int, rounds: int, steps: int, native_bf16: bool) -> dict:
    from genbench.models import get_model_class
    from genbench.training.run import resolve_configs

    model_cfg, train_cfg = resolve_configs(model_name, "fashion-mnist", (1, 28, 28), "standard")
    stage = list(get_model_class(model_name).stages)[stage_index]
    cfg = train_cfg.for_stage(stage)
    attention = make_step(model_name, stage_index, 0, False, False)[2].attention
    combos = [c for c in COMBOS + ([FUSED] if attention else []) if native_bf16 or not c[0]]
    diffusion = model_name == "ddpm" or stage == "diffusion"
    result = {"stage": stage, "steps": cfg.steps, "batch_size": cfg.batch_size,
              "preset": combo_name(cfg.bf16 and native_bf16, cfg.channels_last),
              # the presets before: bf16 in the diffusion stages only (where the CPU has it), with the
              # fused attention kernel, NCHW everywhere
              "before": combo_name(native_bf16 and diffusion, False, native_bf16 and diffusion and attention),
              "phases": []}
    for step_index, count in phases(model_name, stage, cfg.steps):
        runners = {combo_name(*c): make_step(model_name, stage_index, step_index, *c)[2] for c in combos}
        for run in runners.values():  # warm-up: allocator, oneDNN primitive caches
            run()
            run()
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(rounds):
            for name, run in runners.items():
                start = time.process_time()
                for _ in range(steps):
                    run()
                times[name].append((time.process_time() - start) / steps * 1000)
        result["phases"].append({"from_step": step_index, "steps": count,
                                 "ms_per_step": {k: round(statistics.median(v), 2) for k, v in times.items()},
                                 "ms_per_step_rounds": {k: [round(x, 2) for x in v] for k, v in times.items()}})
    return result


def stage_seconds(stage: dict, combo: str) -> float:
    return sum(p["steps"] * p["ms_per_step"][combo] / 1000 for p in stage["phases"])


def main() -> None:
    from genbench.models import get_model_class
    from genbench.utils import cpu_has_native_bf16

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="ae,vae,vqvae,vqgan,ddpm,ldm")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds (the median is reported)")
    ap.add_argument("--steps", type=int, default=5, help="steps per combination per round")
    ap.add_argument("--out", type=Path, default=None, help="JSON file of the results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    native = cpu_has_native_bf16()
    results = {"cpu_flags": cpu_flags(), "native_bf16": native, "torch": torch.__version__,
               "rounds": args.rounds, "steps": args.steps, "models": {}}
    for name in args.models.split(","):
        stages = []
        for i, stage in enumerate(get_model_class(name).stages):
            s = time_stage(name, i, args.rounds, args.steps, native)
            stages.append(s)
            for p in s["phases"]:
                cells = "  ".join(f"{k} {v:7.1f}" for k, v in p["ms_per_step"].items())
                print(f"{name:6s} {s['stage']:12s} from step {p['from_step']:5d} ({p['steps']:5d} steps): "
                      f"{cells} CPU ms/step; before: {s['before']}, preset: {s['preset']}", flush=True)
        before = sum(stage_seconds(s, s["before"]) for s in stages)
        preset = sum(stage_seconds(s, s["preset"]) for s in stages)
        results["models"][name] = {"stages": stages, "before_train_cpu_s": round(before, 1),
                                   "preset_train_cpu_s": round(preset, 1), "ratio": round(before / preset, 3)}
        print(f"{name:6s} whole preset: {before:.0f} CPU s before, {preset:.0f} now: {before / preset:.2f}x",
              flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps({k: {kk: v[kk] for kk in ("before_train_cpu_s", "preset_train_cpu_s", "ratio")}
                      for k, v in results["models"].items()}, indent=2))


if __name__ == "__main__":
    main()
