"""U-Net speed on this machine: DDPM training steps and sampling forwards for the DDPM presets.

    python benchmarks/bench_unet.py [--threads N] [--min-time 3] [--presets quick standard]

For each preset's U-Net (models/ddpm.py PRESETS) at its dataset size, times a full training step
(DDPM simple loss forward + backward + AdamW) and an inference forward (what one DDIM step costs per
image), in fp32 with contiguous and channels_last memory format, and bf16 autocast where the CPU has
native bf16 (genbench.utils.cpu_has_native_bf16). FLOPs come from torch.utils.flop_counter, so the
table also gives the achieved GFLOP/s to set against benchmarks/bench_cpu_peak.py.

If diffusers is installed (the optional `bench` extra), diffusers' UNet2DModel with a matching layout
is timed the same way as a reference implementation; otherwise that row is skipped with a note.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from genbench.config import from_dict
from genbench.models.ddpm import DDPM, DDPMConfig
from genbench.utils import count_parameters, cpu_has_native_bf16

SIZES = {"quick": 8, "standard": 28}


def _time(fn, min_time: float) -> float:
    """Best-of wall time per call: repeats until min_time has passed (after one warm-up)."""
    fn()
    best, t_end = float("inf"), time.perf_counter() + min_time
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bench_net(net, channels: int, side: int, batch: int, sample_batch: int, memory_format, bf16: bool, min_time: float):
    net = net.to(memory_format=memory_format)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(batch, channels, side, side).contiguous(memory_format=memory_format)
    t = torch.randint(0, 1000, (batch,))
    xs = torch.randn(sample_batch, channels, side, side).contiguous(memory_format=memory_format)
    ts = torch.randint(0, 1000, (sample_batch,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = (net(x, t).float() - x).pow(2).mean()  # the simple loss' shape of work
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.inference_mode()
    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            net(xs, ts)

    train_flops = _flops(lambda: net(x, t).pow(2).mean().backward())
    fwd_flops = _flops(lambda: net(xs, ts))
    net.train()
    t_step = _time(step, min_time)
    net.eval()
    t_fwd = _time(forward, min_time)
    return {
        "train_ms": t_step * 1e3, "train_img_s": batch / t_step, "train_gflops": train_flops / t_step / 1e9,
        "fwd_img_s": sample_batch / t_fwd, "fwd_gflops": fwd_flops / t_fwd / 1e9,
    }


def diffusers_unet(cfg: DDPMConfig):
    """diffusers' UNet2DModel with genbench's layout (levels, widths, blocks, attention), or None."""
    try:
        from diffusers import UNet2DModel
    except ImportError:
        return None
    u = cfg.unet
    down = tuple("AttnDownBlock2D" if i in u.attention_levels else "DownBlock2D" for i in range(len(u.channel_mult)))
    up = tuple("AttnUpBlock2D" if i in u.attention_levels else "UpBlock2D" for i in reversed(range(len(u.channel_mult))))
    net = UNet2DModel(
        sample_size=cfg.image_size, in_channels=cfg.image_channels, out_channels=cfg.image_channels,
        block_out_channels=tuple(u.base_channels * m for m in u.channel_mult), layers_per_block=u.num_res_blocks,
        down_block_types=down, up_block_types=up, norm_num_groups=min(32, u.base_channels),
        attention_head_dim=u.base_channels * u.channel_mult[-1] // u.num_heads, dropout=u.dropout,
        resnet_time_scale_shift="scale_shift" if u.time_conditioning == "scale_shift" else "default",
    )

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, t):
            return self.net(x, t).sample

    return Wrap()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--min-time", type=float, default=3.0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--sample-batch", type=int, default=250)
    ap.add_argument("--presets", nargs="+", default=["quick", "standard"], choices=sorted(SIZES))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bf16_options = [False, True] if cpu_has_native_bf16() else [False]
    print(f"torch {torch.__version__}, {args.threads} threads, native bf16: {cpu_has_native_bf16()}, "
          f"train batch {args.batch}, sampling batch {args.sample_batch}")
    print("| preset | net | params | format | dtype | train ms/step | train img/s | train GFLOP/s "
          "| fwd img/s | fwd GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for preset in args.presets:
        side = SIZES[preset]
        cfg = from_dict(DDPMConfig, {**DDPM.PRESETS[preset]["model"], "image_channels": 1, "image_size": side})
        nets = {"genbench": lambda: DDPM(cfg).unet, "diffusers": lambda: diffusers_unet(cfg)}
        for name, make in nets.items():
            if make() is None:
                print(f"| {preset} | {name} | - | - | - | not installed (pip install '.[bench]') | | | | |")
                continue
            for fmt_name, fmt in [("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)]:
                for bf16 in bf16_options:
                    net = make()
                    r = bench_net(net, 1, side, args.batch, args.sample_batch, fmt, bf16, args.min_time)
                    print(f"| {preset} {side}x{side} | {name} | {count_parameters(net) / 1e6:.2f}M | {fmt_name} "
                          f"| {'bf16' if bf16 else 'fp32'} | {r['train_ms']:.0f} | {r['train_img_s']:.0f} "
                          f"| {r['train_gflops']:.1f} | {r['fwd_img_s']:.0f} | {r['fwd_gflops']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
