"""The `genbench` command line: it parses arguments and calls the library, nothing else.

    models                      genbench.models.available_models
    train MODEL                 genbench.training.train_run (+ TrainedRun.write_images)
    sample / reconstruct / evaluate RUN
                                genbench.evaluation.trained_run.TrainedRun
    compare                     genbench.evaluation.compare.run_comparison
    features train              genbench.evaluation.features.get_feature_network

Every user mistake (unknown model, bad --set, missing dataset, corrupt file) is a GenbenchError:
printed as one line, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .errors import GenbenchError
from .files import check_output_file


def _dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="digits | fashion-mnist | mnist | folder | emoji")
    p.add_argument("--data-dir", default=None,
                   help="folder of the idx files (or images for 'folder', or NotoColorEmoji.ttf for 'emoji'); "
                        "default: $GENBENCH_DATA, then /usr/share/datasets/<name> (Debian package "
                        "dataset-fashion-mnist) or /usr/share/fonts/truetype/noto (fonts-noto-color-emoji)")
    p.add_argument("--image-size", type=int, default=None, help="resize images to this side")
    p.add_argument("--limit", type=int, default=None, help="use only the first N train/test images")


def _dataset_spec(args):
    from .data import DatasetSpec

    return DatasetSpec(args.dataset, args.data_dir, args.image_size, args.limit)


# ---------------------------------------------------------------- commands


def cmd_models(args) -> int:
    from .models import available_models, get_model_class

    for name in available_models():
        cls = get_model_class(name)
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        print(f"{name:8s} {doc}")
    return 0


def cmd_train(args) -> int:
    """Train (or resume) a run. Under torchrun every process runs this; rank 0 alone writes the
    run folder, the sample images and the final line (see genbench.training.distributed)."""
    from .evaluation.features import check_kind
    from .evaluation.trained_run import TrainedRun
    from .models import get_model_class
    from .training import distributed, load_training_data, train_run
    from .utils import check_seed

    get_model_class(args.model)  # unknown model or seed: fail before loading data
    check_seed(args.seed)
    if args.fd_samples < 2:
        raise GenbenchError(f"--fd-samples must be >= 2, got {args.fd_samples}")
    if args.fd_every is not None:
        args.set = [*(args.set or []), f"train.fd_every={args.fd_every}"]
    spec = _dataset_spec(args)
    ds = load_training_data(spec, progress=not args.no_progress)  # under torchrun: this process's shard
    check_kind(ds, args.features)
    out = Path(args.out or f"runs/{args.model}-{args.dataset}")
    t0 = time.perf_counter()
    from .evaluation.probe import FDProbe

    # the probe runs only where train.fd_every > 0 (--fd-every N, or genbench compare's own --set)
    probe = FDProbe(ds, num_samples=args.fd_samples, kind=args.features)
    train_run(args.model, ds, out, preset=args.preset, sets=args.set, resume=args.resume,
              progress=not args.no_progress, dataset_spec=spec, probe=probe)
    if not distributed.is_main_process():
        return 0
    if not args.no_images:
        TrainedRun(out).write_images(seed=args.seed)
    world = distributed.world_size()
    on = f" with {world} processes" if world > 1 else ""
    print(f"trained {args.model} on {args.dataset}{on} in {time.perf_counter() - t0:.1f}s -> {out}")
    return 0


def cmd_sample(args) -> int:
    from .evaluation.trained_run import TrainedRun
    from .images import save_images

    out = check_output_file(args.out)
    if out.suffix.lower() not in (".png", ".npz"):
        raise GenbenchError(f"{out}: --out must end in .png (image grid) or .npz (raw samples)")
    if args.n < 1:
        raise GenbenchError(f"-n must be >= 1, got {args.n}")
    run = TrainedRun(args.run_dir, args.device)
    chosen = dict(name=args.sampler, steps=args.steps, spacing=args.spacing, eta=args.eta)
    if any(v is not None for v in chosen.values()):
        run.with_sampler(**chosen)
    t0 = time.perf_counter()
    images = run.sample(args.n, seed=args.seed, batch_size=args.batch_size)
    dt = time.perf_counter() - t0
    save_images(images, out)
    how = f" with {run.model.config.sampler.describe(run.model.diffusion.num_timesteps)}" if run.model.has_sampler else ""
    print(f"{args.n} samples{how} in {dt:.2f}s ({dt / args.n * 1000:.1f} ms/image) -> {out}")
    return 0


def cmd_reconstruct(args) -> int:
    from .evaluation.trained_run import TrainedRun, interleave
    from .images import save_grid

    run = TrainedRun(args.run_dir, args.device)
    out = check_output_file(args.out or run.run.reconstructions_png)
    x, x_hat = run.reconstruct_test(args.n)
    mse = torch.mean((x_hat - x) ** 2).item()
    save_grid(interleave(x, x_hat), out, nrow=8)
    print(f"reconstruction MSE {mse:.5f} on {len(x)} test images -> {out}")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluation.trained_run import TrainedRun

    run = TrainedRun(args.run_dir, args.device)
    out = check_output_file(args.out or run.run.path / "eval.json")
    result = run.evaluate(limit=args.limit, seed=args.seed, out=out)
    print(json.dumps(result, indent=2))
    return 0


def cmd_compare(args) -> int:
    from .evaluation.compare import parse_sampler_sweep, run_comparison, split_model_sets

    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    result = run_comparison(_dataset_spec(args), args.out, models=models, preset=args.preset,
                            sets=split_model_sets(args.set), num_samples=args.num_samples,
                            eval_limit=args.eval_limit, seed=args.seed, device=args.device, jobs=args.jobs,
                            progress=not args.no_progress, replace=args.replace,
                            sampler_sweep=None if args.sampler_sweep is None else parse_sampler_sweep(args.sampler_sweep),
                            budget=_budget(args.budget), fd_points=args.fd_points, features=args.features)
    print(f"[compare] done in {result['wall_time_s']:.0f}s; report: {result['reports']['html']}")
    return 0


def _budget(text: str | None) -> float | None:
    """--budget: training FLOPs per model, e.g. 2e12 or 2T (k, M, G, T, P suffixes)."""
    if text is None:
        return None
    units = {"k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
    scale = units.get(text[-1:], 1.0)
    try:
        value = float(text[:-1] if text[-1:] in units else text) * scale
    except ValueError:
        raise GenbenchError(f"--budget {text!r}: expected training FLOPs per model, e.g. 2e12 or 2T") from None
    if not value > 0 or value == float("inf"):
        raise GenbenchError(f"--budget {text!r}: must be a positive, finite number of FLOPs")
    return value


def cmd_features_train(args) -> int:
    from .evaluation.features import get_feature_network

    net = get_feature_network(_dataset_spec(args).load(), kind=args.kind)
    print(f"{net.kind} feature network for {args.dataset}: {net.score_name} {net.test_accuracy:.4f} "
          f"({net.train_cpu_seconds:.0f} CPU s to train; {net.directory})")
    return 0


# ---------------------------------------------------------------- parser


FEATURES_HELP = ("the feature network of FD/KID/PRDC: classifier (trained on the labels; the default for labelled "
                 "data) | contrastive (self-supervised; the default for data without labels)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genbench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the available models")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("train", help="train a model into a run folder (resumable)")
    p.add_argument("model", help="ae | vae | vqvae | vqgan | ddpm | ldm (see `genbench models`)")
    _dataset_args(p)
    p.add_argument("--preset", default=None,
                   help="quick | standard (default: quick; with --resume: the run's own)")
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help="override a config field, e.g. --set latent_dim=8 --set train.lr=1e-3 (repeatable; "
                        "with --resume they must be the run's own)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<model>-<dataset>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished run in --out (refused if it was made by another request)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample grid written after training")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-images", action="store_true", help="skip samples.png / reconstructions.png after training")
    p.add_argument("--fd-every", type=int, default=None, metavar="N",
                   help="log the FD of --fd-samples samples every N steps of the last stage, with the training "
                        "compute spent (= --set train.fd_every=N; default off)")
    p.add_argument("--fd-samples", type=int, default=500, help="samples per FD probe (default 500)")
    p.add_argument("--features", default=None, metavar="KIND", help=FEATURES_HELP)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="draw samples from a trained run")
    p.add_argument("run_dir")
    p.add_argument("-n", type=int, default=64)
    p.add_argument("--out", required=True, help="FILE.png (grid) or FILE.npz (key images, float32 NCHW in [0,1])")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--sampler", default=None, help="diffusion models: ddim | ddpm | dpm++2m | heun (default: the run's)")
    p.add_argument("--steps", type=int, default=None, help="diffusion models: network calls per sample")
    p.add_argument("--spacing", default=None, help="diffusion models: timestep grid (default: the sampler's own)")
    p.add_argument("--eta", type=float, default=None, help="DDIM only: 0 deterministic, 1 DDPM-like noise")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("reconstruct", help="test images beside their reconstructions")
    p.add_argument("run_dir")
    p.add_argument("-n", type=int, default=32)
    p.add_argument("--out", default=None, help="PNG file (default: RUN_DIR/reconstructions.png)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("evaluate", help="likelihood / reconstruction metrics of a run (JSON)")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="JSON file (default: RUN_DIR/eval.json)")
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_evaluate)

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
    p.add_argument("--sampler-sweep", default=None, metavar="SAMPLER:STEPS,...",
                   help="diffusion models: also measure FD with these samplers, for the report's FD against "
                        "network calls (default: dpm++2m:5,dpm++2m:10,dpm++2m:20,ddim:10,ddim:20,ddim:50; '' for none)")
    p.add_argument("--replace", action="store_true",
                   help="a model folder in --out made by another request is moved aside (MODEL.replaced-K) and "
                        "trained anew, instead of an error")
    p.add_argument("--budget", default=None, metavar="FLOPS",
                   help="equal compute: every model trains this many FLOPs (all stages), its preset's steps scaled "
                        "by one factor, e.g. --budget 2T (deterministic: FLOPs are counted, not timed)")
    p.add_argument("--fd-points", type=int, default=8,
                   help="FD probes during each model's last stage, for the report's FD against training "
                        "compute (default 8; 0: none)")
    p.add_argument("--features", default=None, metavar="KIND", help=FEATURES_HELP)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("features", help="the feature network used by the evaluation")
    fsub = p.add_subparsers(dest="features_command", required=True)
    p = fsub.add_parser("train", help="train (or load from the cache) the feature network of a dataset")
    _dataset_args(p)
    p.add_argument("--kind", default=None, help=FEATURES_HELP)
    p.set_defaults(func=cmd_features_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .utils import default_threads

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        torch.set_num_threads(default_threads())
        return args.func(args)
    except GenbenchError as e:
        print(f"genbench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("genbench: interrupted; continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
