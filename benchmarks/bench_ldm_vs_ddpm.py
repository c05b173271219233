"""Latent vs pixel diffusion cost on this machine: training images/s and sampling ms/image, one process.

    python benchmarks/bench_ldm_vs_ddpm.py [--preset standard] [--steps 100] [--samples 100] [--threads N]
                                          [--device cpu|cuda]

Builds the preset's pixel DDPM and LDM (with the preset's first stage) at the dataset's image size (standard:
Fashion-MNIST 1x28x28; quick: digits 1x8x8) and times, interleaved in the same process so both see the
same machine:

* training: real optimizer steps of each training stage (the model's own `loss`, backward, AdamW,
  grad clipping as in the preset), batch size from the preset, after 3 warm-up steps. The LDM's
  diffusion step includes encoding the batch with the frozen first stage, as in training;
* sampling: `model.sample(n)` with the preset's sampler (DDIM, `sampler.steps` network calls), best
  of `--repeats`; the LDM's time includes decoding;
* FLOPs per image (torch.utils.flop_counter) of a training step's forward + backward and of one sample.

The networks are untrained (speed does not depend on the weights; the LDM's scale factor is measured
on random images), so this says nothing about sample quality: `genbench compare --dataset
fashion-mnist --preset standard --models ddpm,ldm` trains both and reports their cost next to FD/KID.
Precision as in the trainer: bf16 autocast where a stage asks for it and the device has native bf16
(genbench.utils.autocast: CUDA, or a CPU with AVX512-BF16/AMX), fp32 otherwise. On CUDA every timed
region ends with a synchronize.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from genbench.training.config import TrainConfig
from genbench.training.run import resolve_configs
from genbench.utils import autocast, count_parameters, select_device

SIZES = {"quick": 8, "standard": 28}
DATASETS = {"quick": "digits", "standard": "fashion-mnist"}


def build(name: str, preset: str, size: int):
    from genbench.models import get_model_class

    cfg, train_cfg = resolve_configs(name, DATASETS[preset], (1, size, size), preset)
    torch.manual_seed(0)
    return get_model_class(name)(cfg), train_cfg


DEVICE = torch.device("cpu")


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def images(n: int, size: int) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(0)).to(DEVICE)


def train_throughput(model, stage: str, cfg: TrainConfig, size: int, steps: int) -> tuple[float, float]:
    """(images/s, GFLOP per image) of `steps` optimizer steps of `stage`."""
    scfg = cfg.for_stage(stage)
    params = model.optimizer_groups(stage)["main"]
    opt = torch.optim.AdamW(params, lr=scfg.lr, betas=(scfg.beta1, scfg.beta2), weight_decay=scfg.weight_decay)
    batch = images(scfg.batch_size, size)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(DEVICE, scfg.bf16):
            loss = model.loss(batch, stage=stage)["loss"]
        loss.backward(inputs=params)
        if scfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, scfg.grad_clip)
        opt.step()

    with FlopCounterMode(display=False) as counter:
        model.loss(batch, stage=stage)["loss"].backward(inputs=params)
    for _ in range(3):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = time.perf_counter() - t0
    return steps * scfg.batch_size / dt, counter.get_total_flops() / scfg.batch_size / 1e9


@torch.no_grad()
def sample_cost(model, n: int, repeats: int) -> tuple[float, float]:
    """(ms per image, GFLOP per image) of `model.sample(n)`, best of `repeats`."""
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model.sample(2)
    model.sample(min(n, 8))  # warm-up
    best = float("inf")
    for i in range(repeats):
        sync()
        t0 = time.perf_counter()
        model.sample(n, generator=torch.Generator(device=DEVICE).manual_seed(i))
        sync()
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e3, counter.get_total_flops() / 2 / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="standard", choices=sorted(SIZES))
    ap.add_argument("--steps", type=int, default=100, help="timed training steps per stage")
    ap.add_argument("--samples", type=int, default=100, help="images per timed sampling call")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    args = ap.parse_args()
    global DEVICE
    DEVICE = select_device(args.device)
    torch.set_num_threads(args.threads)
    size = SIZES[args.preset]
    ddpm, ddpm_train = build("ddpm", args.preset, size)
    ldm, ldm_train = build("ldm", args.preset, size)
    ddpm, ldm = ddpm.to(DEVICE), ldm.to(DEVICE)
    with torch.no_grad():
        ldm.prepare_stage("diffusion", images(1000, size))
    name = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"torch {torch.__version__}, {name}, preset {args.preset} ({DATASETS[args.preset]} "
          f"1x{size}x{size}), LDM latent {'x'.join(map(str, ldm.latent_shape))}, {args.steps} timed steps per stage, "
          f"sampling {args.samples} images per call\n")
    rows = []
    for name, model, cfg in (("ddpm", ddpm, ddpm_train), ("ldm", ldm, ldm_train)):
        for stage in getattr(model, "stages", ("main",)):
            scfg = cfg.for_stage(stage)
            ips, gflop = train_throughput(model, stage, cfg, size, args.steps)
            rows.append((name, stage, scfg.steps, scfg.batch_size, ips, gflop))
            print(f"  {name}:{stage} {ips:.0f} img/s", flush=True)
    samples = {name: sample_cost(model, args.samples, args.repeats) for name, model in (("ddpm", ddpm), ("ldm", ldm))}
    params = {"ddpm": count_parameters(ddpm), "ldm": count_parameters(ldm)}
    print("\n| model | stage | preset steps x batch | train img/s | train GFLOP/img | est. stage time |")
    print("|---|---|---|---|---|---|")
    total = {"ddpm": 0.0, "ldm": 0.0}
    for name, stage, steps, bs, ips, gflop in rows:
        est = steps * bs / ips
        total[name] += est
        print(f"| {name} | {stage} | {steps} x {bs} | {ips:.0f} | {gflop:.3f} | {est / 60:.1f} min |")
    print("\n| model | params | est. preset training time | sample ms/img | sample GFLOP/img |")
    print("|---|---|---|---|---|")
    for name in ("ddpm", "ldm"):
        ms, gflop = samples[name]
        print(f"| {name} | {params[name] / 1e6:.2f}M | {total[name] / 60:.1f} min | {ms:.2f} | {gflop:.2f} |")
    r = samples["ddpm"][0] / samples["ldm"][0]
    print(f"\nLDM sampling is {r:.1f}x {'faster' if r > 1 else 'slower'} per image; "
          f"estimated preset training time ratio DDPM/LDM {total['ddpm'] / total['ldm']:.2f}.")


if __name__ == "__main__":
    main()
