"""The comparison: train (or reuse) every model on one dataset, evaluate all the same way, report.

Data flows one way: dataset -> train_run (one run folder per model, reused when finished, resumed
when interrupted) -> EvalContext.evaluate_run (genbench.evaluation.protocol: the same samples,
seed, test images and feature network for every model) -> metrics.json -> report.md / report.html
(genbench.evaluation.report).

Reference rows go through the identical protocol: the training set scored against the test set
(the floor a perfect model could reach with this many samples) and uniform noise (the ceiling).

`run_comparison` is the library entry point (`genbench compare` parses its arguments and calls it).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

from tqdm import tqdm

from genbench.core.samplers import SamplerConfig
from genbench.data import DatasetSpec
from genbench.errors import GenbenchError
from genbench.models.base import available_models, get_model_class
from genbench.models.presets import TRAIN_COST_RANK
from genbench.training.budget import plan_budget
from genbench.training.run import SAMPLER_KEYS, request_differences, resolve_configs, total_steps, train_run
from genbench.training.run_folder import RunFolder, lock_folder
from genbench.training.distributed import env_world
from genbench.utils import check_seed, default_threads, intra_op_threads, select_device, threads_when_alone

from .features import check_kind, get_feature_network
from .probe import FDProbe
from .protocol import EvalContext
from .report import write_reports

PROTOCOL_VERSION = 1
DEFAULT_FD_POINTS = 8  # FD probes over each model's last stage (quality against training compute)
# a diffusion model's FD against its network calls per sample, beside the sampler it is evaluated with
DEFAULT_SAMPLER_SWEEP = (SamplerConfig("dpm++2m", 5), SamplerConfig("dpm++2m", 10), SamplerConfig("dpm++2m", 20),
                         SamplerConfig("ddim", 10), SamplerConfig("ddim", 20), SamplerConfig("ddim", 50))
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS")


def default_jobs() -> int:
    """Training processes at once: one per group of `default_threads()` cores (2 on a 2-core machine,
    where each process uses 1 thread; 1 where torch's default already uses every core). Small models
    keep one core busy with Python and small kernels, so two single-thread processes train about
    twice the images per second of one two-thread process here. A GPU is shared by the processes."""
    return max(1, (os.cpu_count() or 1) // default_threads())


def default_num_samples(preset: str) -> int:
    return 5000 if preset == "standard" else 1000


def run_comparison(
    dataset: DatasetSpec,
    out: str | os.PathLike,
    models: Sequence[str] | None = None,
    preset: str = "quick",
    sets: Mapping[str, Sequence[str]] | None = None,
    num_samples: int | None = None,
    eval_limit: int | None = None,
    seed: int = 0,
    device: str = "auto",
    jobs: int | None = None,
    progress: bool = True,
    replace: bool = False,
    sampler_sweep: Sequence[SamplerConfig] | None = None,
    budget: float | None = None,
    fd_points: int = DEFAULT_FD_POINTS,
    features: str | None = None,
) -> dict:
    """Train (or reuse) `models` (default: all) on `dataset` into `out/<model>/`, evaluate each by the
    same protocol, write `out/metrics.json`, `report.md` and `report.html`, and return the result
    (the rows of metrics.json plus the report paths under "reports").

    `sets`: per-model `--set` items, {"vae": ["latent_dim=8"]}. `num_samples`: samples per model for
    FD/KID/PRDC (default 1000, 5000 for the standard preset). `eval_limit`: test images for
    likelihood and reconstruction (default all, at most 2000). `jobs`: models trained at once in
    their own processes (default `default_jobs()`; 1 trains in this process).

    A model's existing run folder is reused (finished) or resumed (unfinished) only when it holds the
    run of this request (model, dataset, preset, --set items); otherwise nothing is done and a
    GenbenchError names the differences, unless `replace`: then the old folder is moved aside to
    `<model>.replaced-<k>` and the model is trained anew.

    Diffusion models are evaluated with the sampler the request names (`--set ddpm:sampler.steps=10`
    applies to a finished run too: sampling is no part of training), and, for the report's FD
    against network calls, under each sampler of `sampler_sweep` (default DEFAULT_SAMPLER_SWEEP;
    empty: none).

    Quality against compute: every model logs the FD of a few samples (genbench.evaluation.probe) at
    `fd_points` points of its last stage, with the training FLOPs and seconds spent so far (0: off);
    the report draws FD against training compute. `budget`: every model gets this many training
    FLOPs (all stages together): its preset's steps scaled by one factor (genbench.training.budget),
    recorded as --set items, the same on any machine.

    `features`: the feature network of every metric and probe, "classifier" or "contrastive"
    (genbench.evaluation.features; default: the classifier for labelled data, else the contrastive one)."""
    models = list(models) if models else available_models()
    for m in models:
        get_model_class(m)  # unknown model: fail before any work
    if len(set(models)) != len(models):
        raise GenbenchError(f"models: a model is listed twice: {models}")
    sets = dict(sets or {})
    unknown = sorted(set(sets) - set(available_models()))
    if unknown:
        raise GenbenchError(f"sets: unknown model(s) {unknown}; models are {available_models()}")
    per_model_sets = {m: list(sets.get(m, ())) for m in models}
    if fd_points < 0:
        raise GenbenchError(f"fd_points must be >= 0 (0: no FD during training), got {fd_points}")
    num_samples = num_samples or default_num_samples(preset)
    if num_samples < 2:
        raise GenbenchError(f"num_samples must be >= 2, got {num_samples}")
    jobs = default_jobs() if jobs is None else jobs
    if jobs < 1:
        raise GenbenchError(f"jobs must be >= 1, got {jobs}")
    check_seed(seed, "seed")
    select_device(device)  # an unusable evaluation device fails now, not after the training
    if env_world().world_size > 1:
        raise GenbenchError("genbench compare starts its own training processes (--jobs) and evaluates in one: "
                            "run it without torchrun (torchrun is for `genbench train`)")
    out = Path(out)
    ds = dataset.load()
    features = check_kind(ds, features)
    # every model's --set items are valid before any work; the model configs give the samplers to evaluate with
    resolved = {m: resolve_configs(m, dataset.name, ds.shape, preset, per_model_sets[m]) for m in models}
    plans = {}
    if budget is not None:
        for m in models:
            plans[m] = plan_budget(m, dataset.name, ds.train, preset, per_model_sets[m], budget)
            per_model_sets[m] += plans[m].sets
            resolved[m] = resolve_configs(m, dataset.name, ds.shape, preset, per_model_sets[m])
            print(f"[compare] {m}: budget {budget:.3g} FLOPs = {plans[m].scale:.3g} x its preset's steps "
                  f"({', '.join(f'{s} {n}' for s, n in plans[m].steps.items())})", flush=True)
    if fd_points:  # train.fd_every changes no model config
        for m in models:
            per_model_sets[m] += fd_probe_sets(m, resolved[m][1], per_model_sets[m], fd_points)
    requested = {m: resolved[m][0] for m in models}
    sweep = DEFAULT_SAMPLER_SWEEP if sampler_sweep is None else tuple(sampler_sweep)
    for sampler in sweep:
        sampler.validate()
    with lock_folder(out, "comparison folder"):
        result = _compare_locked(dataset, ds, out, models, preset, per_model_sets, requested, num_samples, eval_limit,
                                 seed, device, jobs, progress, replace, sweep, plans, features)
    return result


def fd_probe_sets(model: str, train_cfg, sets: list[str], points: int) -> list[str]:
    """`train.fd_every` giving about `points` FD probes over the model's last stage under `train_cfg`
    (none when the request sets train.fd_every itself)."""
    if any(item.split("=", 1)[0].strip() == "train.fd_every" for item in sets):
        return []
    last = train_cfg.for_stage(get_model_class(model).stages[-1]).steps
    return [f"train.fd_every={max(1, math.ceil(last / points))}"]


def _compare_locked(dataset, ds, out, models, preset, per_model_sets, requested, num_samples, eval_limit, seed, device,
                    jobs, progress, replace, sampler_sweep, plans, features) -> dict:
    eval_limit = eval_limit or min(len(ds.test_pixels), 2000)
    t0 = time.perf_counter()
    for m in models:  # before any work: a folder made by another request is never reused silently
        run = RunFolder(out / m)
        if not run.exists():
            continue
        # the sampler is applied at evaluation below: a finished run serves any sampler
        diffs = [d for d in request_differences(run.read_info(), m, dataset, ds.shape, preset, per_model_sets[m])
                 if not d.startswith(SAMPLER_KEYS)]
        if diffs and not replace:
            raise GenbenchError(f"{run.path}: holds a run of another request ({'; '.join(diffs)}); choose another "
                                "--out, or pass --replace to move it aside and train anew")
        if diffs:
            print(f"[compare] {m}: {run.path} held another request; moved to {run.move_aside()}", flush=True)
    pending = [m for m in models if not RunFolder(out / m).is_complete()]
    # the feature network first: the training processes' FD probes load it from the cache
    print(f"[compare] {features} feature network for {ds.name} ...", flush=True)
    feats = get_feature_network(ds, kind=features)
    if jobs > 1 and len(pending) > 1:
        train_in_processes(pending, dataset, ds.shape, out, preset, per_model_sets, jobs, progress=progress,
                           features=features)

    ctx = EvalContext(ds, feats, num_samples=num_samples, eval_limit=eval_limit, seed=seed)
    eval_threads = threads_when_alone()
    with intra_op_threads(eval_threads):
        rows = [ctx.reference_row("train set (floor)", ds.train_pixels),
                ctx.reference_row("uniform noise (ceiling)", None)]
    for m in models:
        run_dir = out / m
        print(f"[compare] {m}: train (or reuse) in {run_dir}", flush=True)
        train_run(m, ds, run_dir, preset=preset, sets=per_model_sets[m], resume=True, progress=progress,
                  dataset_spec=dataset, sampler_elsewhere=True, probe=FDProbe(ds, kind=features))
        print(f"[compare] {m}: evaluate ({eval_threads} threads)", flush=True)
        has_sampler = get_model_class(m).has_sampler
        with intra_op_threads(eval_threads):  # nothing of ours trains beside it now: every core
            rows.append(ctx.evaluate_run(run_dir, device=device, sampler=requested[m].sampler if has_sampler else None,
                                         sweep=list(sampler_sweep) if has_sampler else []))
    result = {
        "protocol_version": PROTOCOL_VERSION,
        "dataset": dataset.to_dict(),
        "preset": preset,
        "num_samples": num_samples,
        "eval_test_images": eval_limit,
        "seed": seed,
        "feature_network": feats.describe(),
        "rows": rows,
        "evaluation_threads": eval_threads,
        "wall_time_s": time.perf_counter() - t0,
    }
    if plans:
        result["budget"] = {"flops": next(iter(plans.values())).budget,
                            "models": {m: {"preset_flops": p.preset_flops, "scale": p.scale, "planned_flops": p.flops,
                                           "steps": p.steps} for m, p in plans.items()}}
    result["reports"] = {k: str(v) for k, v in write_reports(out, result).items()}
    return result


def parse_sampler_sweep(text: str) -> tuple[SamplerConfig, ...]:
    """"dpm++2m:10,ddim:50" (the command line's form) -> sampler configs; "" -> none."""
    sweep = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, steps = item.partition(":")
        if not sep or not steps.strip().isdigit():
            raise GenbenchError(f"--sampler-sweep {item!r}: expected SAMPLER:STEPS, e.g. dpm++2m:10")
        sampler = SamplerConfig(name.strip(), int(steps))
        sampler.validate()
        sweep.append(sampler)
    return tuple(sweep)


def split_model_sets(items: Sequence[str]) -> dict[str, list[str]]:
    """`MODEL:KEY=VALUE` items (the command line's form) -> {model: ["KEY=VALUE", ...]}."""
    per_model: dict[str, list[str]] = {}
    for item in items:
        name, sep, rest = item.partition(":")
        if not sep or name not in available_models():
            raise GenbenchError(f"--set {item!r}: expected MODEL:KEY=VALUE with MODEL one of {available_models()}")
        per_model.setdefault(name, []).append(rest)
    return per_model


def train_in_processes(models: list[str], spec: DatasetSpec, shape: tuple[int, int, int], out: Path, preset: str,
                       per_model_sets: dict[str, list[str]], jobs: int, progress: bool = True,
                       features: str | None = None) -> None:
    """Train `models` with up to `jobs` `genbench train` processes at once (each resumable, its output
    in RUN/train.log). One progress bar over the steps of all models, from their log.jsonl files.
    A failed process stops the comparison with its model, exit status and the end of its log."""
    total = {}
    for m in models:  # also checks every model's --set items before any process starts
        _, cfg = resolve_configs(m, spec.name, shape, preset, per_model_sets[m])
        total[m] = total_steps(m, cfg)
    data_args = ["--dataset", spec.name]
    for value, flag in ((spec.data_dir, "--data-dir"), (spec.image_size, "--image-size"), (spec.limit, "--limit")):
        if value is not None:
            data_args += [flag, str(value)]
    # a clean environment: a child must never join a process group of its parent's
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env["GENBENCH_THREADS"] = str(default_threads())
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
                run = RunFolder(out / m)
                run.path.mkdir(parents=True, exist_ok=True)
                log = open(run.train_log, "ab")
                cmd = [sys.executable, "-m", "genbench", "train", m, *data_args, "--preset", preset, "--out", str(run.path),
                       "--resume", "--no-progress", "--no-images"]
                for item in per_model_sets[m]:
                    cmd += ["--set", item]
                if features is not None:
                    cmd += ["--features", features]
                bar.write(f"[compare] {m}: training in its own process -> {run.train_log}")
                running[m] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log)
            time.sleep(1.0)
            for m in list(running):
                proc, log = running[m]
                if proc.poll() is None:
                    continue
                log.close()
                del running[m]
                if proc.returncode != 0:
                    train_log = RunFolder(out / m).train_log
                    tail = train_log.read_text(errors="replace").strip().splitlines()[-5:]
                    raise GenbenchError(f"training {m} failed (exit status {proc.returncode}); "
                                        f"{train_log} ends with:\n  " + "\n  ".join(tail))
                finished.add(m)
                bar.write(f"[compare] {m}: trained")
            bar.n = sum(total[m] if m in finished else min(total[m], RunFolder(out / m).last_global_step())
                        for m in models)
            bar.refresh()
    finally:
        for proc, log in running.values():  # interrupted or failed: stop the others (their checkpoints stay)
            proc.terminate()
            proc.wait()
            log.close()
        bar.close()
