"""The `genbench` command line: train, sample, reconstruct, evaluate, models (and compare).

Every user mistake (unknown model, bad --set, missing dataset, corrupt file) is a GenbenchError:
printed as one line, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from .errors import GenbenchError


def _dataset_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--dataset", required=required, help="digits | fashion-mnist | mnist | folder")
    p.add_argument("--data-dir", default=None,
                   help="folder of the idx files (or images for 'folder'); default: $GENBENCH_DATA, "
                        "then /usr/share/datasets/<name> (Debian package dataset-fashion-mnist)")
    p.add_argument("--image-size", type=int, default=None, help="resize images to this side")
    p.add_argument("--limit", type=int, default=None, help="use only the first N train/test images")


def dataset_spec(args) -> dict:
    return {"name": args.dataset, "data_dir": args.data_dir, "image_size": args.image_size, "limit": args.limit}


def load_from_spec(spec: dict):
    from .data import load_dataset

    return load_dataset(spec["name"], data_dir=spec.get("data_dir"), image_size=spec.get("image_size"),
                        limit=spec.get("limit"))


def _run_info(run_dir: Path) -> dict:
    from .checkpoint import read_json

    if not run_dir.is_dir():
        raise GenbenchError(f"{run_dir}: run folder not found")
    info = read_json(run_dir / "run.json")
    if info.get("status") != "complete" or not (run_dir / "model" / "config.json").exists():
        raise GenbenchError(f"{run_dir}: training has not finished; continue it with `genbench train ... --resume`")
    return info


def _load_run(run_dir: Path, device: str):
    from .checkpoint import load_pretrained
    from .utils import select_device

    info = _run_info(run_dir)
    dev = select_device(device)
    return info, load_pretrained(run_dir / "model", device=dev), dev


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


# ---------------------------------------------------------------- commands


def cmd_models(args) -> int:
    from .registry import available_models, get_model_class

    for name in available_models():
        cls = get_model_class(name)
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        print(f"{name:8s} {doc}")
    return 0


def cmd_train(args) -> int:
    """Train (or resume) a run. Under torchrun every process runs this; rank 0 alone writes the
    run folder, the sample images and the final line (see genbench.distributed)."""
    from . import distributed
    from .registry import get_model_class
    from .trainer import train_run

    get_model_class(args.model)  # unknown model: fail before loading data
    spec = dataset_spec(args)
    ds = load_from_spec(spec)
    out = Path(args.out or f"runs/{args.model}-{args.dataset}")
    t0 = time.perf_counter()
    train_run(args.model, ds, out, preset=args.preset, sets=args.set, resume=args.resume,
              progress=not args.no_progress, dataset_spec=spec)
    if not distributed.is_main_process():
        return 0
    if not args.no_images:
        write_run_images(out, seed=args.seed)
    world = distributed.world_size()
    on = f" with {world} processes" if world > 1 else ""
    print(f"trained {args.model} on {args.dataset}{on} in {time.perf_counter() - t0:.1f}s -> {out}")
    return 0


def write_run_images(run_dir: Path, seed: int = 0, n: int = 64, device: str = "auto") -> None:
    """samples.png and (where the model reconstructs) reconstructions.png beside the run."""
    from .images import save_grid

    info, model, dev = _load_run(run_dir, device)
    save_grid(model.sample(n, generator=_generator(dev, seed)), run_dir / "samples.png")
    if hasattr(model, "reconstruct"):
        ds = load_from_spec(info["dataset"])
        x = ds.test[:32].to(dev)
        with torch.no_grad():
            pairs = torch.stack([x, model.reconstruct(x)], 1).flatten(0, 1)  # test / reconstruction interleaved
        save_grid(pairs, run_dir / "reconstructions.png", nrow=8)


def cmd_sample(args) -> int:
    from .images import save_images

    _, model, dev = _load_run(Path(args.run_dir), args.device)
    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".npz"):
        raise GenbenchError(f"{out}: --out must end in .png (image grid) or .npz (raw samples)")
    if args.n < 1:
        raise GenbenchError(f"-n must be >= 1, got {args.n}")
    t0 = time.perf_counter()
    images = torch.cat([model.sample(min(args.batch_size, args.n - i), generator=_generator(dev, args.seed + i))
                        for i in range(0, args.n, args.batch_size)])
    dt = time.perf_counter() - t0
    save_images(images, out)
    print(f"{args.n} samples in {dt:.2f}s ({dt / args.n * 1000:.1f} ms/image) -> {out}")
    return 0


def cmd_reconstruct(args) -> int:
    from .images import save_grid

    info, model, dev = _load_run(Path(args.run_dir), args.device)
    if not hasattr(model, "reconstruct"):
        raise GenbenchError(f"{info['model']} has no reconstruction (it does not encode images)")
    x = load_from_spec(info["dataset"]).test[: args.n].to(dev)
    with torch.no_grad():
        x_hat = model.reconstruct(x)
    mse = torch.mean((x_hat - x) ** 2).item()
    out = Path(args.out or Path(args.run_dir) / "reconstructions.png")
    save_grid(torch.stack([x, x_hat], 1).flatten(0, 1), out, nrow=8)
    print(f"reconstruction MSE {mse:.5f} on {len(x)} test images -> {out}")
    return 0


def cmd_evaluate(args) -> int:
    from .checkpoint import write_json

    run_dir = Path(args.run_dir)
    info, model, dev = _load_run(run_dir, args.device)
    test = load_from_spec(info["dataset"]).test
    if args.limit:
        test = test[: args.limit]
    test = test.to(dev)
    result = {"model": info["model"], "dataset": info["dataset"]["name"], "num_test_images": len(test)}
    with torch.no_grad():
        if hasattr(model, "reconstruct"):
            rec = torch.cat([model.reconstruct(x) for x in test.split(500)])
            result["reconstruction_mse"] = torch.mean((rec - test) ** 2).item()
        evaluate = getattr(model, "evaluate", None)
        if callable(evaluate):
            result.update(evaluate(test, generator=_generator(dev, args.seed)))
    result["training"] = info.get("summary", {})
    text = json.dumps(result, indent=2)
    print(text)
    write_json(Path(args.out) if args.out else run_dir / "eval.json", result)
    return 0


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genbench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the available models")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("train", help="train a model into a run folder (resumable)")
    p.add_argument("model", help="ae | vae | vqvae | vqgan | ddpm | ldm (see `genbench models`)")
    _dataset_args(p)
    p.add_argument("--preset", default="quick", help="quick | standard (default: quick)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set latent_dim=8 --set train.lr=1e-3 (repeatable)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<model>-<dataset>)")
    p.add_argument("--resume", action="store_true", help="continue the unfinished run in --out")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample grid written after training")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-images", action="store_true", help="skip samples.png / reconstructions.png after training")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="draw samples from a trained run")
    p.add_argument("run_dir")
    p.add_argument("-n", type=int, default=64)
    p.add_argument("--out", required=True, help="FILE.png (grid) or FILE.npz (key images, float32 NCHW in [0,1])")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
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
    from .compare import add_compare_parser

    add_compare_parser(sub)
    return parser


def default_threads() -> int:
    """Intra-op threads: 1 on machines with at most 2 cores, else torch's default.

    Measured on the 2-core development machine: with any other process running, 2 threads made
    small-op training steps 5-20x slower than 1 (OpenMP workers spin waiting for a core), while
    on an idle machine 1 thread costs little for these small models. GENBENCH_THREADS overrides."""
    env = os.environ.get("GENBENCH_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise GenbenchError(f"GENBENCH_THREADS={env!r}: expected a positive integer") from None
        if n < 1:
            raise GenbenchError(f"GENBENCH_THREADS={env!r}: expected a positive integer")
        return n
    return 1 if (os.cpu_count() or 1) <= 2 else torch.get_num_threads()


def main(argv: list[str] | None = None) -> int:
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
