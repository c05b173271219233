"""Do two feature networks rank the same models alike? (issue 16: on Fashion-MNIST, where both exist.)

    python benchmarks/bench_feature_ranking.py RUN_DIR [RUN_DIR ...] [--num-samples 5000] [--seed 0] \
        [--out ranking.json] [--samples DIR]

Every run (finished `genbench train` / `compare` folders of one dataset) draws the same number of
samples with the same seed (diffusion models with DPM-Solver++(2M) at 10 calls unless --sampler
says otherwise); their FD to the test
split is computed in the classifier's features and in the self-supervised network's
(genbench.evaluation.features, both from the cache or trained now). Prints a Markdown table (FD and
rank under each) and Spearman's rho and Kendall's tau between the two rankings (scipy.stats);
the same with the train split and uniform noise added as reference rows. With --samples DIR the
samples are kept there as .npy (float32) and reused by a later call with the same count, seed and
sampler, so other feature networks can judge the very same images.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kendalltau, rankdata, spearmanr

from genbench.data import DatasetSpec, unit_float
from genbench.evaluation import metrics
from genbench.evaluation.features import KINDS, get_feature_network
from genbench.evaluation.trained_run import TrainedRun


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--num-samples", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sampler", default="dpm++2m:10", metavar="NAME:STEPS",
                    help="diffusion models sample with this (default dpm++2m:10; '' keeps each run's own)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--samples", type=Path, default=None, metavar="DIR", help="keep/reuse the samples here")
    args = ap.parse_args()
    runs = [TrainedRun(path, device="cpu") for path in args.runs]
    if args.sampler:
        name, steps = args.sampler.split(":")
        runs = [r.with_sampler(name, int(steps)) if r.model.has_sampler else r for r in runs]
    specs = {json.dumps(r.info["dataset"], sort_keys=True) for r in runs}
    if len(specs) != 1:
        raise SystemExit(f"the runs were trained on different datasets: {sorted(specs)}")
    ds = DatasetSpec.from_dict(runs[0].info["dataset"]).load()
    nets = {kind: get_feature_network(ds, kind=kind) for kind in KINDS}
    real = {kind: net.features(ds.test) for kind, net in nets.items()}
    g = torch.Generator().manual_seed(args.seed)
    images = {"train set": unit_float(ds.train_pixels[torch.randperm(len(ds.train_pixels), generator=g)[:args.num_samples]]),
              "uniform noise": torch.rand((args.num_samples, *ds.shape), generator=g)}
    for path, run in zip(args.runs, runs):
        t0 = time.perf_counter()
        # <model>__...: the model name (no "__" in it) is what bench_feature_judges.load_samples reads back
        kept = args.samples / (f"{run.name}__{path.parent.name}-{path.name}-{args.num_samples}-{args.seed}-"
                               f"{args.sampler or 'own'}.npy") if args.samples else None
        if kept and kept.is_file():
            x = torch.from_numpy(np.load(kept))
        else:
            x = run.sample(args.num_samples, seed=args.seed).clamp(0, 1)
            if kept:
                kept.parent.mkdir(parents=True, exist_ok=True)
                np.save(kept, x.numpy().astype(np.float32))
        images[f"{run.name} ({path.name})"] = x
        print(f"{path}: {args.num_samples} samples in {time.perf_counter() - t0:.0f} s", flush=True)
    fd = {kind: {name: metrics.frechet_distance(net.features(x), real[kind]) for name, x in images.items()}
          for kind, net in nets.items()}
    models = [name for name in images if name not in ("train set", "uniform noise")]
    result = {"dataset": ds.name, "num_samples": args.num_samples, "seed": args.seed, "fd": fd,
              "scores": {k: {"name": n.score_name, "value": n.test_accuracy} for k, n in nets.items()}}
    for label, names in (("models", models), ("models + references", list(images))):
        a, b = [fd["classifier"][n] for n in names], [fd["contrastive"][n] for n in names]
        result[label] = {"spearman_rho": spearmanr(a, b).statistic, "kendall_tau": kendalltau(a, b).statistic,
                         "same_order": list(rankdata(a)) == list(rankdata(b))}
    ranks = {k: dict(zip(models, rankdata([fd[k][n] for n in models]).astype(int).tolist())) for k in KINDS}
    print(f"\n{ds.name}, {args.num_samples} samples per row, seed {args.seed}\n")
    print("| row | FD, classifier | rank | FD, contrastive | rank |\n|---|---|---|---|---|")
    for name in images:
        rc = ranks["classifier"].get(name, "-")
        rs = ranks["contrastive"].get(name, "-")
        print(f"| {name} | {fd['classifier'][name]:.3f} | {rc} | {fd['contrastive'][name]:.3f} | {rs} |")
    for label in ("models", "models + references"):
        r = result[label]
        print(f"\n{label}: Spearman rho {r['spearman_rho']:.3f}, Kendall tau {r['kendall_tau']:.3f}, "
              f"same order: {r['same_order']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
