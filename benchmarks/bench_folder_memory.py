"""Memory and time of a large `folder` dataset: decode once into the cache, read it back, train.

    python benchmarks/bench_folder_memory.py [--n 100000] [--size 64] [--dir /tmp/genbench-folder-bench]
                                             [--steps 20] [--old-limit 5000]

1. Generates --n synthetic --size x --size colour PNGs in --dir/images (once; kept for reruns):
   8x8 random colours upsampled with Pillow's bicubic filter plus pixel noise, so the files compress
   and decode like smooth photographs rather than like pure noise.
2. Runs each phase in a fresh Python process, which reports its own peak RSS
   (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) and wall time, with GENBENCH_CACHE in --dir. The
   peak RSS counts the pages of the mapped cache file the process touched; those are the kernel's
   page cache (clean, shared between processes, dropped under memory pressure), so the peaks of
   the anonymous and the file-backed parts (RssAnon, RssFile in /proc/self/status, sampled every
   20 ms) are shown beside it.
   - cold: `load_dataset("folder", ...)` on an empty cache: header check, decode, write the cache;
   - warm: the same call again: the cache is mapped, nothing is decoded;
   - train: `genbench train ae` (an MLP autoencoder, --steps steps of batch 64, then its sample and
     reconstruction grids) on the warm cache, the whole command line in one process;
   wall s is the load_dataset call alone for the loads (after `import torch`), the whole command for train;
   - old (with --old-limit N > 0): the loader of genbench before this change (git 40d4e3b, float32
     in memory, no cache), on N train + N test images, to compare bytes per image; it is not run on
     the whole folder, which would need about 10 GB of float32 copies on this 23 GB shared machine.
Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

OLD_COMMIT = "40d4e3b"
REPO = Path(__file__).resolve().parents[1]


def generate(images: Path, n: int, size: int, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    images.mkdir(parents=True, exist_ok=True)
    have = len(list(images.glob("*.png")))
    if have == n:
        return
    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    for i in range(n):
        base = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        noisy = np.clip(np.asarray(base, np.int16) + rng.integers(-6, 7, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(images / f"{i:06d}.png")
        if i % 10000 == 9999:
            print(f"  generated {i + 1} images in {time.perf_counter() - t:.0f} s", flush=True)


class RssSampler(threading.Thread):
    """Peak RssAnon and RssFile of this process, sampled from /proc/self/status."""

    def __init__(self, every_s: float = 0.02):
        super().__init__(daemon=True)
        self.every_s, self.peak = every_s, {"RssAnon": 0, "RssFile": 0}

    def run(self):
        while True:
            with open("/proc/self/status") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in self.peak:
                        self.peak[key] = max(self.peak[key], int(value.split()[0]) // 1024)  # KiB -> MiB
            time.sleep(self.every_s)


def phase(name: str, images: str, size: int, steps: int, out: str, limit: int) -> dict:
    """Runs in its own process; returns its figures."""
    import torch  # noqa: F401  (imports are not part of the load time)

    sampler = RssSampler()
    sampler.start()

    t = time.perf_counter()
    result: dict = {"phase": name}
    if name in ("cold", "warm", "old"):
        from genbench.data import load_dataset

        t = time.perf_counter()
        ds = load_dataset("folder", data_dir=images, image_size=size, limit=limit or None)
        old = name == "old"  # that version's dataset held float32 `train`/`test` tensors
        train, test = (ds.train, ds.test) if old else (ds.train_pixels, ds.test_pixels)
        result.update(train=len(train), test=len(test), dtype=str(train.dtype).removeprefix("torch."),
                      dataset_mib=(train.nbytes + test.nbytes) / 2**20)
    else:
        from genbench.cli import main

        sets = ["arch=mlp", "width=64", "latent_dim=16", f"train.steps={steps}", "train.batch_size=64",
                f"train.ckpt_every={steps}", f"train.log_every={max(1, steps // 4)}"]
        code = main(["train", "ae", "--dataset", "folder", "--data-dir", images, "--image-size", str(size),
                     "--out", out, "--no-progress", *[a for s in sets for a in ("--set", s)]])
        assert code == 0, code
        summary = json.loads((Path(out) / "run.json").read_text())["summary"]
        result.update(images_per_s=summary["stages"]["main"]["images_per_s"], train_s=summary["wall_time_s"])
    result["wall_s"] = time.perf_counter() - t
    time.sleep(0.05)  # one more sample
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    result["peak_anon_mib"], result["peak_file_mib"] = sampler.peak["RssAnon"], sampler.peak["RssFile"]
    return result


def run_phase(name: str, args, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--phase", name, "--n", str(args.n), "--size", str(args.size),
           "--dir", str(args.dir), "--steps", str(args.steps), "--old-limit", str(args.old_limit)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"phase {name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "genbench-folder-bench")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--old-limit", type=int, default=5000)
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    images, cache = args.dir / "images", args.dir / "cache"
    if args.phase:
        limit = args.old_limit if args.phase == "old" else 0
        print(json.dumps(phase(args.phase, str(images), args.size, args.steps, str(args.dir / "run"), limit)))
        return

    print(f"generating {args.n} {args.size}x{args.size} colour PNGs in {images} ...", flush=True)
    t = time.perf_counter()
    generate(images, args.n, args.size)
    print(f"  ready in {time.perf_counter() - t:.0f} s; {sum(p.stat().st_size for p in images.iterdir()) / 2**20:.0f} "
          "MiB on disk", flush=True)
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(args.dir / "run", ignore_errors=True)
    env = {**os.environ, "GENBENCH_CACHE": str(cache)}
    rows = [run_phase("cold", args, env), run_phase("warm", args, env), run_phase("train", args, env)]
    if args.old_limit:
        old = args.dir / "old-src"
        shutil.rmtree(old, ignore_errors=True)
        old.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", OLD_COMMIT, "src"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
        rows.append(run_phase("old", args, {**env, "PYTHONPATH": str(old / "src")}))
    print(f"\n{args.n} images of 3x{args.size}x{args.size}; cache {sum(p.stat().st_size for p in cache.rglob('*') if p.is_file()) / 2**20:.0f} MiB\n")
    print("| phase | images (train + test) | dataset dtype | dataset MiB | wall s | peak RSS MiB | anonymous / "
          "file-backed MiB (sampled peaks) | train images/s |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        images_ = f"{r['train']} + {r['test']}" if "train" in r else "-"
        dataset = f"{r['dtype']} | {r['dataset_mib']:.0f}" if "dtype" in r else "- | -"
        ips = f"{r['images_per_s']:.0f}" if "images_per_s" in r else "-"
        print(f"| {r['phase']} | {images_} | {dataset} | {r['wall_s']:.1f} | {r['peak_rss_mib']:.0f} | "
              f"{r['peak_anon_mib']} / {r['peak_file_mib']} | {ips} |")

if __name__ == "__main__":
    main()
