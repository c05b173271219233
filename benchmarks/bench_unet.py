"""U-Net training throughput of genbench vs diffusers at equal FLOPs per image (issue 5), DDIM cost, % of peak.

    python benchmarks/bench_unet.py [--threads 1] [--steps 40] [--block 5] [--wait-load 1.3] [--run-dir RUN]

One process, fp32 (an AVX2-only CPU emulates bf16 12-50x slower, docs/benchmarks.md), on the
Fashion-MNIST "standard" DDPM (models/presets.py, 1x28x28, batch 64):

* genbench: `DDPM(cfg)` trained through the library's own path, the per-step body of
  genbench.training.loop._train_stage: re-seed from loop.rng_seed, `model.loss(batch)` (the simple loss: random t,
  eps, MSE on eps, genbench.core.diffusion.training_loss), backward, clip_grad_norm_ 1.0, finiteness check,
  AdamW(foreach=True, lr/betas/weight decay of the preset), loop.EMA update (decay 0.995).
* diffusers: `UNet2DModel` with the same layout (block widths, one res block per level, attention at
  the 7x7 level and in the middle, 2 heads, scale-shift time conditioning, dropout 0.1, GroupNorm
  groups dividing every width), wrapped in the *same* loss (GaussianDiffusion.training_loss on its
  `.sample`), optimizer, clipping and EMA. 28x28 needs no padding for diffusers (28 -> 14 -> 7).
  Forward FLOPs per image of both nets are counted with torch.utils.flop_counter.FlopCounterMode and
  must agree within 10%; a training step's FLOPs are counted over one real step (forward + backward).
* memory format: each net is probed in contiguous and channels_last and timed in its faster one
  (genbench's training loop feeds contiguous batches; diffusers gets the same choice).
* timing is interleaved: blocks of `--block` steps alternate between the two nets (order swapped each
  round), so load from other processes hits both alike; images/s = images / summed step time.
* sampling: one 64-image DDIM-50 `DDPM.sample` (the library's path: eval mode, no_grad, clipped x0),
  random weights or the EMA-exported weights of `--run-dir` (RUN/model, as written by the trainer).
* peak: benchmarks/bench_cpu_peak.py's fp32 GEMM (1024^3) and 3x3-conv measurements at the same thread
  count; "% of peak" divides achieved GFLOP/s by the larger of the two.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from genbench.config import from_dict
from genbench.core.diffusion import GaussianDiffusion
from genbench.models.ddpm import DDPM, DDPMConfig
from genbench.models.presets import PRESETS
from genbench.nets.unet import num_groups
from genbench.training.loop import EMA, rng_seed
from genbench.utils import count_parameters

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cpu_peak  # noqa: E402  (sibling script: the machine's measured peak)

PRESET, SIDE, CHANNELS = "standard", 28, 1
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def wait_for_quiet(threshold: float, max_wait: float, poll: float = 30.0) -> str:
    """Poll the 1-minute load average until it is below threshold (or max_wait passes)."""
    t0 = time.monotonic()
    while (load := loadavg()) >= threshold and time.monotonic() - t0 < max_wait:
        print(f"  load {load:.2f} >= {threshold}: waiting ({time.monotonic() - t0:.0f} s so far)", flush=True)
        time.sleep(poll)
    waited = time.monotonic() - t0
    quiet = load < threshold
    return f"load {load:.2f} after {waited:.0f} s wait ({'quiet' if quiet else 'NOT quiet: measured anyway'})"


# ------------------------------------------------------------------------------------------ the two models


def standard_config() -> DDPMConfig:
    return from_dict(DDPMConfig, {**PRESETS["ddpm"][PRESET]["model"], "image_channels": CHANNELS, "image_size": SIDE})


class DiffusersDDPM(nn.Module):
    """diffusers' UNet2DModel behind genbench's DDPM loss: the same noise math, loss and targets."""

    name = "diffusers"

    def __init__(self, cfg: DDPMConfig):
        super().__init__()
        from diffusers import UNet2DModel

        u = cfg.unet
        widths = tuple(u.base_channels * m for m in u.channel_mult)
        down = tuple("AttnDownBlock2D" if i in u.attention_levels else "DownBlock2D" for i in range(len(widths)))
        up = tuple("AttnUpBlock2D" if i in u.attention_levels else "UpBlock2D" for i in reversed(range(len(widths))))
        self.unet = UNet2DModel(
            sample_size=cfg.image_size, in_channels=cfg.image_channels, out_channels=cfg.image_channels,
            block_out_channels=widths, layers_per_block=u.num_res_blocks, down_block_types=down, up_block_types=up,
            add_attention=u.mid_attention, attention_head_dim=widths[-1] // u.num_heads, dropout=u.dropout,
            # one group count for the whole net: the largest <= 32 that divides every width (16 here)
            norm_num_groups=num_groups(math.gcd(*widths)),
            resnet_time_scale_shift="scale_shift" if u.time_conditioning == "scale_shift" else "default",
        )
        self.diffusion = GaussianDiffusion(cfg.diffusion)

    def eps(self, x: Tensor, t: Tensor) -> Tensor:
        return self.unet(x, t).sample

    def loss(self, batch: Tensor, step: int = 0, stage: str = "main") -> dict[str, Tensor]:
        return {"loss": self.diffusion.training_loss(self.eps, batch * 2 - 1)}


def denoiser(model: nn.Module):
    """(x_t, t) -> network output of either model."""
    return model.eps if isinstance(model, DiffusersDDPM) else model.unet


# ------------------------------------------------------------------------------------------ training path


class Trainee:
    """A model, its optimizer and EMA, stepped exactly like the training loop's _train_stage (no logging/ckpt)."""

    def __init__(self, name: str, model: nn.Module, pool: Tensor, fmt: str):
        train = PRESETS["ddpm"][PRESET]["train"]
        self.name, self.fmt = name, fmt
        self.model = model.to(memory_format=FORMATS[fmt]).train()
        self.params = list(self.model.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=train["lr"], betas=(0.9, 0.999), weight_decay=0.0, foreach=True)
        self.ema = EMA(self.model, train["ema_decay"])
        self.clip = train["grad_clip"]
        self.pool = pool.contiguous(memory_format=FORMATS[fmt])
        self.step_no, self.seconds, self.images = 0, 0.0, 0

    def step(self, batch_size: int) -> float:
        n = self.pool.shape[0]
        idx = torch.arange(self.step_no * batch_size, (self.step_no + 1) * batch_size) % n
        t0 = time.perf_counter()
        batch = self.pool.index_select(0, idx)
        torch.manual_seed(rng_seed(0, "main", self.step_no, 0))
        self.opt.zero_grad(set_to_none=True)
        loss = self.model.loss(batch, step=self.step_no)["loss"]
        loss.backward(inputs=self.params)
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{self.name}: non-finite loss at step {self.step_no}")
        self.opt.step()
        self.ema.update(self.model)
        self.step_no += 1
        return time.perf_counter() - t0


def _cpu_flash_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(q, k, v)


def _cpu_flash_backward_flops(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, q, k, v)


# torch's counter knows the CUDA fused attention kernels but not the CPU one, which SDPA picks when q/k/v
# have a contiguous last dim (diffusers' attention does): without these, its attention would count as 0
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward_flops,
}


def count_flops(fn) -> int:
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


def forward_flops(model: nn.Module, batch: int) -> int:
    x, t = torch.randn(batch, CHANNELS, SIDE, SIDE), torch.randint(0, 1000, (batch,))
    with torch.no_grad():
        return count_flops(lambda: denoiser(model)(x, t))


# ------------------------------------------------------------------------------------------ main


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (genbench uses 1 on <= 2 cores)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40, help="timed training steps per net")
    ap.add_argument("--block", type=int, default=5, help="steps per interleaved block")
    ap.add_argument("--probe-steps", type=int, default=3, help="steps per net and memory format for the format probe")
    ap.add_argument("--format", choices=["auto", *FORMATS], default="auto", help="auto: each net's faster format")
    ap.add_argument("--sample-batch", type=int, default=64)
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--run-dir", type=Path, default=None, help="a genbench DDPM run folder to sample from")
    ap.add_argument("--wait-load", type=float, default=0.0, help="first wait until the 1-min load is below this")
    ap.add_argument("--wait-max", type=float, default=1200.0, help="longest wait for --wait-load, seconds")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_total = time.perf_counter()
    try:
        import diffusers
    except ImportError:
        sys.exit("diffusers is not installed: pip install -e '.[bench]' -c constraints.txt")

    load_note = wait_for_quiet(args.wait_load, args.wait_max) if args.wait_load > 0 else f"load {loadavg():.2f}"
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, {args.threads} thread(s), fp32, "
          f"{os.cpu_count()} logical cores, {load_note}", flush=True)

    cfg = standard_config()
    torch.manual_seed(0)
    pool = torch.rand(10 * args.batch, CHANNELS, SIDE, SIDE)  # pixel-like [0, 1] batches; content is irrelevant
    makers = {"genbench": lambda: DDPM(cfg), "diffusers": lambda: DiffusersDDPM(cfg)}

    # --- equal FLOPs per image
    fwd = {name: forward_flops(make(), args.batch) / args.batch for name, make in makers.items()}
    params = {name: count_parameters(make()) for name, make in makers.items()}
    mismatch = fwd["genbench"] / fwd["diffusers"] - 1
    print(f"forward GFLOP/image: genbench {fwd['genbench'] / 1e9:.4f}, diffusers {fwd['diffusers'] / 1e9:.4f} "
          f"({mismatch:+.1%}); parameters {params['genbench']:,} vs {params['diffusers']:,}", flush=True)
    if abs(mismatch) > 0.10:
        sys.exit("FLOPs per image differ by more than 10%: the comparison would not be at equal cost")

    # --- memory format probe (1 warm-up + probe steps per net and format, interleaved)
    fmt = {name: args.format for name in makers}
    if args.format == "auto":
        probe = {(n, f): Trainee(n, makers[n](), pool, f) for n in makers for f in FORMATS}
        for tr in probe.values():
            tr.step(args.batch)
        times = {k: math.inf for k in probe}  # fastest step: the least load-sensitive statistic of a few
        for _ in range(args.probe_steps):
            for k, tr in probe.items():
                times[k] = min(times[k], tr.step(args.batch))
        for n in makers:
            fmt[n] = min(FORMATS, key=lambda f: times[(n, f)])
            print(f"format probe {n} (fastest of {args.probe_steps} steps): " + ", ".join(
                f"{f} {args.batch / times[(n, f)]:.1f} img/s" for f in FORMATS) + f" -> {fmt[n]}", flush=True)
        del probe

    # --- interleaved training timing
    trainees = {n: Trainee(n, makers[n](), pool, fmt[n]) for n in makers}
    step_flops = {}
    for n, tr in trainees.items():
        tr.step(args.batch)  # warm-up (allocator, oneDNN primitive caches)
        step_flops[n] = count_flops(lambda tr=tr: tr.step(args.batch)) / args.batch
    order = list(trainees)
    rounds = math.ceil(args.steps / args.block)
    for r in range(rounds):
        for n in order if r % 2 == 0 else order[::-1]:
            tr = trainees[n]
            for _ in range(args.block):
                tr.seconds += tr.step(args.batch)
                tr.images += args.batch
    train_ips = {n: tr.images / tr.seconds for n, tr in trainees.items()}

    # --- DDIM sampling through the library's path
    if args.run_dir is not None:
        from genbench.models import GenerativeModel

        model = GenerativeModel.from_pretrained(args.run_dir)
        if not isinstance(model, DDPM):
            sys.exit(f"{args.run_dir}: not a DDPM run")
        weights = f"weights of {args.run_dir}"
    else:
        model = DDPM(cfg).eval()
        weights = "random weights"
    model.config.sampler.steps = args.sample_steps
    model.config.sampler.name = "ddim"
    gen = torch.Generator().manual_seed(0)
    model.unet(torch.randn(8, *model.image_shape), torch.randint(0, 1000, (8,)))  # warm-up
    t0 = time.perf_counter()
    samples = model.sample(args.sample_batch, generator=gen)
    sample_s = time.perf_counter() - t0
    assert samples.shape == (args.sample_batch, *model.image_shape)
    sample_flops = forward_flops(model, args.sample_batch) * args.sample_steps

    # --- the machine's measured fp32 peak at this thread count
    gemm = bench_cpu_peak.gemm_gflops(torch.float32)
    conv = bench_cpu_peak.conv_gflops(torch.float32)
    peak = max(gemm, conv)
    end_load = loadavg()

    rows = []
    for n in order:
        gflops = train_ips[n] * step_flops[n] / 1e9
        rows.append((f"{n} training ({fmt[n]})", f"{fwd[n] / 1e9:.4f}", f"{step_flops[n] / 1e9:.4f}",
                     f"{train_ips[n]:.1f}", f"{gflops:.1f}", f"{gflops / peak:.0%}"))
    sample_gflops = sample_flops / sample_s / 1e9
    print(f"\nfp32 peak ({args.threads} thread(s), bench_cpu_peak.py): GEMM 1024^3 {gemm:.1f} GFLOP/s, "
          f"conv3x3 64ch {conv:.1f} GFLOP/s -> peak {peak:.1f}")
    print(f"{rounds * args.block} timed steps of batch {args.batch} per net, interleaved in blocks of {args.block}\n")
    print("| run | fwd GFLOP/img | train-step GFLOP/img | images/s | GFLOP/s | % of peak |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"| genbench DDIM-{args.sample_steps} sampling, {args.sample_batch} images ({weights}) | "
          f"{fwd['genbench'] / 1e9:.4f} | - | {args.sample_batch / sample_s:.1f} ({sample_s:.2f} s) "
          f"| {sample_gflops:.1f} | {sample_gflops / peak:.0%} |")
    print(f"\ntraining throughput ratio genbench / diffusers: {train_ips['genbench'] / train_ips['diffusers']:.3f}x "
          f"(issue 5 target: >= 2x)")
    print(f"DDIM-{args.sample_steps} of {args.sample_batch} images: {sample_s:.2f} s (target < 15 s)")
    print(f"load at end {end_load:.2f}; whole benchmark {time.perf_counter() - t_total:.0f} s")


if __name__ == "__main__":
    main()
