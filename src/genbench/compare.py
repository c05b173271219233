"""`genbench compare`: train (or reuse) every model on one dataset, evaluate all the same way, report.

Data flows one way: dataset -> train_run (one run folder per model, reused when finished, resumed
when interrupted) -> `evaluate_run` (the same number of samples, the same seed, the same test
images and feature network for every model) -> metrics.json -> report.md / report.html.

Reference rows go through the identical protocol: the training set scored against the test set
(the floor a perfect model could reach with this many samples) and uniform noise (the ceiling).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from .errors import GenbenchError

PROTOCOL_VERSION = 1


def add_compare_parser(sub) -> None:
    from .cli import _dataset_args

    p = sub.add_parser("compare", help="train/reuse several models, evaluate them identically, write a report")
    _dataset_args(p)
    p.add_argument("--models", default=None, help="comma-separated model names (default: every available model)")
    p.add_argument("--preset", default="quick", help="quick | standard")
    p.add_argument("--set", action="append", default=[], metavar="MODEL:KEY=VALUE",
                   help="override a config field of one model, e.g. --set vae:latent_dim=8 (repeatable)")
    p.add_argument("--out", default="runs/compare", help="folder of the runs and the report")
    p.add_argument("--num-samples", type=int, default=None,
                   help="samples per model for FD/KID/PRDC (default: 1000, or 5000 for the standard preset)")
    p.add_argument("--eval-limit", type=int, default=None,
                   help="test images for likelihood and reconstruction (default: all, at most 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="device of the evaluation (training: each model's train.device)")
    p.add_argument("--jobs", type=int, default=None,
                   help="models trained at once, each in its own process (default: cores / threads per "
                        "process, e.g. 2 on a 2-core machine; 1 trains in this process)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_compare)

    f = sub.add_parser("features", help="the feature network used by the evaluation")
    fsub = f.add_subparsers(dest="features_command", required=True)
    ft = fsub.add_parser("train", help="train (or load from the cache) the feature network of a dataset")
    _dataset_args(ft)
    ft.set_defaults(func=cmd_features_train)


def cmd_features_train(args) -> int:
    from .cli import dataset_spec, load_from_spec
    from .features import get_feature_network

    net = get_feature_network(load_from_spec(dataset_spec(args)))
    print(f"feature network for {args.dataset}: test accuracy {net.test_accuracy:.4f} ({net.directory})")
    return 0


# models by training cost under their presets, most expensive first (measured: digits quick, docs/benchmarks.md)
TRAIN_COST_RANK = ("ldm", "ddpm", "vqgan", "vqvae", "vae", "ae")


def default_jobs() -> int:
    """Training processes at once: one per group of `default_threads()` cores (2 on a 2-core machine,
    where each process uses 1 thread; 1 where torch's default already uses every core). Small models
    keep one core busy with Python and small kernels, so two single-thread processes train about
    twice the images per second of one two-thread process here. A GPU is shared by the processes."""
    import os

    from .cli import default_threads

    return max(1, (os.cpu_count() or 1) // default_threads())


def _run_complete(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "run.json").read_text()).get("status") == "complete"
    except (OSError, ValueError):
        return False


def _last_global_step(log: Path) -> int:
    """The latest `global_step` logged by a run (0 before its first record)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["global_step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def train_in_processes(models: list[str], spec: dict, shape: tuple[int, int, int], out: Path, preset: str,
                       per_model_sets: dict[str, list[str]], jobs: int, progress: bool = True) -> None:
    """Train `models` with up to `jobs` `genbench train` processes at once (each resumable, its output
    in RUN/train.log). One progress bar over the steps of all models, from their log.jsonl files.
    A failed process stops the comparison with its model, exit status and the end of its log."""
    import os
    import subprocess
    import sys

    from tqdm import tqdm

    from .cli import default_threads
    from .registry import get_model_class
    from .trainer import resolve_configs

    total = {}
    for m in models:  # also checks every model's --set items before any process starts
        _, cfg = resolve_configs(m, spec["name"], shape, preset, per_model_sets[m])
        stages = getattr(get_model_class(m), "stages", ("main",))
        total[m] = sum(cfg.for_stage(s).steps for s in stages)
    data_args = ["--dataset", spec["name"]]
    for key, flag in (("data_dir", "--data-dir"), ("image_size", "--image-size"), ("limit", "--limit")):
        if spec.get(key) is not None:
            data_args += [flag, str(spec[key])]
    env = {**os.environ, "GENBENCH_THREADS": str(default_threads())}
    # longest first, so that the last to start are short: the diffusion models, then the GAN, then the
    # rest (step counts say little: an AE step costs a fraction of a U-Net step)
    queue = sorted(models, key=lambda m: TRAIN_COST_RANK.index(m) if m in TRAIN_COST_RANK else len(TRAIN_COST_RANK))
    running: dict[str, tuple[subprocess.Popen, object]] = {}
    finished: set[str] = set()
    bar = tqdm(total=sum(total.values()), desc=f"train {len(models)} models, {jobs} at once", unit="step",
               disable=not progress, smoothing=0.1)
    try:
        while queue or running:
            while queue and len(running) < jobs:
                m = queue.pop(0)
                run_dir = out / m
                run_dir.mkdir(parents=True, exist_ok=True)
                log = open(run_dir / "train.log", "ab")
                cmd = [sys.executable, "-m", "genbench", "train", m, *data_args, "--preset", preset, "--out", str(run_dir),
                       "--resume", "--no-progress", "--no-images"]
                for item in per_model_sets[m]:
                    cmd += ["--set", item]
                bar.write(f"[compare] {m}: training in its own process -> {run_dir / 'train.log'}")
                running[m] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log)
            time.sleep(1.0)
            for m in list(running):
                proc, log = running[m]
                if proc.poll() is None:
                    continue
                log.close()
                del running[m]
                if proc.returncode != 0:
                    tail = (out / m / "train.log").read_text(errors="replace").strip().splitlines()[-5:]
                    raise GenbenchError(f"training {m} failed (exit status {proc.returncode}); "
                                        f"{out / m / 'train.log'} ends with:\n  " + "\n  ".join(tail))
                finished.add(m)
                bar.write(f"[compare] {m}: trained")
            bar.n = sum(total[m] if m in finished else min(total[m], _last_global_step(out / m / "log.jsonl"))
                        for m in models)
            bar.refresh()
    finally:
        for proc, log in running.values():  # interrupted or failed: stop the others (their checkpoints stay)
            proc.terminate()
            proc.wait()
            log.close()
        bar.close()


def _parse_model_sets(sets: list[str], models: list[str], known: list[str]) -> dict[str, list[str]]:
    """MODEL:KEY=VALUE items per model; items for known models not being compared are ignored."""
    per_model: dict[str, list[str]] = {m: [] for m in known}
    for item in sets:
        name, sep, rest = item.partition(":")
        if not sep or name not in per_model:
            raise GenbenchError(f"--set {item!r}: expected MODEL:KEY=VALUE with MODEL one of {known}")
        per_model[name].append(rest)
    return {m: per_model[m] for m in models}


def cmd_compare(args: argparse.Namespace) -> int:
    from .cli import dataset_spec, load_from_spec
    from .features import get_feature_network
    from .registry import available_models, get_model_class
    from .report import write_reports
    from .trainer import train_run

    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else available_models()
    for m in models:
        get_model_class(m)  # unknown model: fail before any work
    if len(set(models)) != len(models):
        raise GenbenchError(f"--models lists a model twice: {models}")
    per_model_sets = _parse_model_sets(args.set, models, available_models())
    num_samples = args.num_samples or (5000 if args.preset == "standard" else 1000)
    if num_samples < 2:
        raise GenbenchError(f"--num-samples must be >= 2, got {num_samples}")
    out = Path(args.out)
    spec = dataset_spec(args)
    ds = load_from_spec(spec)
    eval_limit = args.eval_limit or min(len(ds.test), 2000)
    jobs = default_jobs() if args.jobs is None else args.jobs
    if jobs < 1:
        raise GenbenchError(f"--jobs must be >= 1, got {jobs}")
    t0 = time.perf_counter()
    pending = [m for m in models if not _run_complete(out / m)]
    if jobs > 1 and len(pending) > 1:
        train_in_processes(pending, spec, ds.shape, out, args.preset, per_model_sets, jobs,
                           progress=not args.no_progress)

    print(f"[compare] feature network for {ds.name} ...", flush=True)
    feats = get_feature_network(ds)
    ctx = EvalContext(ds, feats, num_samples=num_samples, eval_limit=eval_limit, seed=args.seed)
    rows = [ctx.reference_row("train set (floor)", ds.train), ctx.reference_row("uniform noise (ceiling)", None)]
    for m in models:
        run_dir = out / m
        print(f"[compare] {m}: train (or reuse) in {run_dir}", flush=True)
        train_run(m, ds, run_dir, preset=args.preset, sets=per_model_sets[m], resume=True,
                  progress=not args.no_progress, dataset_spec=spec)
        print(f"[compare] {m}: evaluate", flush=True)
        rows.append(ctx.evaluate_run(run_dir, device=args.device))
    result = {
        "protocol_version": PROTOCOL_VERSION,
        "dataset": spec,
        "preset": args.preset,
        "num_samples": num_samples,
        "eval_test_images": eval_limit,
        "seed": args.seed,
        "feature_network": {"test_accuracy": feats.test_accuracy, "data_hash": feats.data_hash,
                            "feature_dim": feats.feature_dim},
        "rows": rows,
        "wall_time_s": time.perf_counter() - t0,
    }
    paths = write_reports(out, result)
    print(f"[compare] done in {result['wall_time_s']:.0f}s; report: {paths['html']}")
    return 0


class EvalContext:
    """Everything the evaluation shares across models: test images, features of the real sets, seed."""

    def __init__(self, ds, feats, num_samples: int, eval_limit: int, seed: int = 0):
        self.ds, self.feats, self.num_samples, self.seed = ds, feats, num_samples, seed
        self.test = ds.test[:eval_limit]
        # the real side of FD/KID/PRDC: all test images
        self.real_feats = feats.features(ds.test)
        self._test_feats = None  # features of self.test, for the reconstruction FD

    # ---- sample quality, identical for models and reference rows

    def sample_metrics(self, images: torch.Tensor) -> dict:
        from . import metrics

        f = self.feats.features(images)
        kid_mean, kid_std = metrics.kernel_distance(f, self.real_feats, num_subsets=50,
                                                    subset_size=min(1000, len(f), len(self.real_feats)), seed=self.seed)
        prdc = metrics.precision_recall_density_coverage(self.real_feats, f, k=5)
        hist = metrics.class_histogram_stats(self.feats.predict(images), self.feats.num_classes)
        mem = metrics.memorization(images[:1000], self.ds.train, self.ds.test[:1000])
        return {
            "fd": metrics.frechet_distance(f, self.real_feats),
            "kid": kid_mean, "kid_std": kid_std,
            **{k: prdc[k] for k in ("precision", "recall", "density", "coverage")},
            "class_entropy": hist["normalized_entropy"], "class_coverage": hist["class_coverage"],
            "class_histogram": hist.get("histogram"),
            "memorization_ratio": mem["ratio"], "memorization_fraction_closer": mem["fraction_closer"],
        }

    def reconstruction_fd(self, rec: torch.Tensor) -> float:
        """Frechet distance between the reconstructions of the evaluated test images and those test
        images themselves ("rFID" of Esser et al. 2021, with genbench's feature network): realism of
        reconstructions, which MSE does not measure."""
        from . import metrics

        if self._test_feats is None:
            self._test_feats = self.feats.features(self.test)
        return metrics.frechet_distance(self.feats.features(rec), self._test_feats)

    def reference_row(self, name: str, pool: torch.Tensor | None) -> dict:
        g = torch.Generator().manual_seed(self.seed)
        if pool is None:
            images = torch.rand((self.num_samples, *self.ds.shape), generator=g)
        else:
            idx = torch.randperm(len(pool), generator=g)[: self.num_samples]
            images = pool[idx]
        return {"name": name, "kind": "reference", **self.sample_metrics(images)}

    # ---- one trained model

    @torch.no_grad()
    def evaluate_run(self, run_dir: Path, device: str = "auto") -> dict:
        from . import metrics
        from .checkpoint import load_pretrained, read_json
        from .images import png_bytes, make_grid
        from .utils import count_parameters, select_device

        info = read_json(run_dir / "run.json")
        dev = select_device(device)
        model = load_pretrained(run_dir / "model", device=dev)
        name = info["model"]
        # samples: same count and seed for every model; timed per image
        calls = _count_network_calls(model)
        gen = torch.Generator(device=dev).manual_seed(self.seed)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        batches = []
        for i in range(0, self.num_samples, 500):
            batches.append(model.sample(min(500, self.num_samples - i), generator=gen).float().cpu())
        if dev.type == "cuda":
            torch.cuda.synchronize()
        sample_s = (time.perf_counter() - t0) / self.num_samples
        samples = torch.cat(batches).clamp(0, 1)
        row = {"name": name, "kind": "model", "run_dir": str(run_dir), **self.sample_metrics(samples)}
        row["network_calls_per_sample"] = calls
        test = self.test.to(dev)
        images = {"samples": make_grid(samples[:64], nrow=8)}
        if hasattr(model, "reconstruct"):
            rec = torch.cat([model.reconstruct(x).float() for x in test.split(500)]).clamp(0, 1).cpu()
            row.update(mse=metrics.mse(rec, self.test), psnr=metrics.psnr(rec, self.test),
                       ssim=metrics.ssim(rec, self.test), recon_fd=self.reconstruction_fd(rec))
            pairs = torch.stack([self.test[:32], rec[:32]], 1).flatten(0, 1)
            images["reconstructions"] = make_grid(pairs, nrow=8)
            interp = latent_interpolation(model, test[:8], steps=8)
            if interp is not None:
                images["interpolations"] = make_grid(interp.cpu(), nrow=8)
        else:
            row.update(mse=None, psnr=None, ssim=None, recon_fd=None)
        ev = model.evaluate(test, generator=torch.Generator(device=dev).manual_seed(self.seed)) \
            if hasattr(model, "evaluate") else {}
        row["bits_per_dim"] = ev.get("bits_per_dim")
        row["bpd_estimator"] = ev.get("bpd_estimator") or ev.get("likelihood_note") or "not defined"
        row["model_eval"] = {k: v for k, v in ev.items() if isinstance(v, (int, float, str)) or v is None}
        summary = info.get("summary", {})
        stages = summary.get("stages", {})
        row.update(
            parameters=count_parameters(model),
            train_wall_time_s=summary.get("wall_time_s"),
            train_images_per_s={s: v.get("images_per_s") for s, v in stages.items()},
            peak_memory_mb=summary.get("peak_memory_mb"),
            sample_ms_per_image=sample_s * 1000,
            device=summary.get("device"),
        )
        row["curves"] = _read_curves(run_dir / "log.jsonl")
        row["stability"] = loss_stability(row["curves"])
        row["images_png"] = {k: png_bytes(v) for k, v in images.items()}
        row["family"] = getattr(model, "FAMILY", {})
        return row


def latent_interpolation(model, x: torch.Tensor, steps: int = 8) -> torch.Tensor | None:
    """Decode straight lines between the latents of pairs of test images (rows: pairs).

    Uses the model's continuous latent: `encode` for AE/VAE, or `encode_latents`/`decode_latents`
    where a model provides them (e.g. pre-quantization latents of VQ models). None otherwise."""
    enc = getattr(model, "encode_latents", None) or getattr(model, "encode", None)
    dec = getattr(model, "decode_latents", None) or getattr(model, "decode", None)
    if enc is None or dec is None:
        return None
    z = enc(x)
    if not torch.is_tensor(z) or not z.is_floating_point():
        return None
    a, b = z[0::2], z[1::2]
    n = min(len(a), len(b))
    w = torch.linspace(0, 1, steps, device=z.device).view(1, steps, *([1] * (z.ndim - 1)))
    path = a[:n, None] * (1 - w) + b[:n, None] * w  # (pairs, steps, ...)
    out = dec(path.flatten(0, 1))
    return out.float().clamp(0, 1)


def _count_network_calls(model):
    """Count forward calls of the model's direct sub-networks during one sample(2) call.

    It is the measured number of sequential network evaluations a sample costs (1 for a
    decoder, ~T for a diffusion sampler, one per token for an autoregressive prior)."""
    counts = {}
    hooks = [child.register_forward_pre_hook(lambda m, a, name=name: counts.__setitem__(name, counts.get(name, 0) + 1))
             for name, child in model.named_children()]
    try:
        model.sample(2)
    finally:
        for h in hooks:
            h.remove()
    return counts


def _read_curves(log_path: Path) -> dict:
    curves: dict[str, dict[str, list]] = {}
    if not log_path.exists():
        return curves
    for line in log_path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        c = curves.setdefault(rec.get("stage", "main"), {"step": [], "loss": []})
        c["step"].append(rec["step"])
        c["loss"].append(rec["loss"])
    return curves


def loss_stability(curves: dict) -> dict:
    """Measured training stability per stage: over the second half of the logged curve, the
    median absolute relative change between consecutive logged losses (noise level) and the
    largest relative jump upward (spikes). Small and smooth means stable."""
    out = {}
    for stage, c in curves.items():
        loss = np.asarray(c["loss"], dtype=np.float64)
        half = loss[len(loss) // 2:]
        if len(half) < 3:
            continue
        scale = np.maximum(np.abs(half[:-1]), 1e-8)
        rel = np.diff(half) / scale
        out[stage] = {"median_abs_rel_change": float(np.median(np.abs(rel))), "max_rel_jump": float(rel.max()),
                      "finite": bool(np.isfinite(loss).all())}
    return out
