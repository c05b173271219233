"""Variants of the contrastive feature network, judged by the ladder and the ranking (issue 16).

    python benchmarks/bench_contrastive_variants.py NAME --samples SAMPLES --ranking ranking.json \
        [--dataset fashion-mnist] [--set steps=3000] [--set max_shift=5] [--blur-max 0.5] [--noise-max 0.1] \
        [--out-dir variants]

Trains a contrastive network (genbench.evaluation.contrastive, not cached) with the dataset's train
config changed by `--set FIELD=VALUE` and, optionally, two view augmentations the shipped network
leaves out on purpose: a Gaussian blur of one random sigma in [0, --blur-max] px per step, on a random
half of the views, and Gaussian noise of a random sigma in [0, --noise-max] per view on a random half.
Then: its view-retrieval accuracy, the FD of the saved samples (`bench_feature_ranking.py --samples`)
with the rank correlation against the classifier's FD (from that script's `--out` JSON), and the
degradation ladder (genbench.evaluation.ladder) with whether each rung rises.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from scipy.stats import kendalltau, spearmanr

from genbench.data import DatasetSpec
from genbench.evaluation import contrastive, features, metrics
from genbench.evaluation.ladder import degradation_ladder, gaussian_blur, is_increasing

from bench_feature_judges import load_samples


def augmented_views(blur_max: float, noise_max: float):
    plain = contrastive.random_views

    def views(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
        out = plain(x, max_shift, generator)
        if blur_max > 0:
            sigma = float(torch.rand((), generator=generator)) * blur_max
            half = torch.rand(len(x), generator=generator) < 0.5
            if sigma > 0.05:  # below this the 3-sigma kernel is a single tap
                out = torch.where(half.view(-1, 1, 1, 1), gaussian_blur(out, sigma), out)
        if noise_max > 0:
            sigma = torch.rand(len(x), 1, 1, 1, generator=generator) * noise_max
            half = (torch.rand(len(x), generator=generator) < 0.5).view(-1, 1, 1, 1)
            noisy = (out + sigma * torch.randn(out.shape, generator=generator)).clamp(0, 1)
            out = torch.where(half, noisy, out)
        return out

    return views


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("--samples", type=Path, required=True)
    ap.add_argument("--ranking", type=Path, required=True, help="bench_feature_ranking.py's --out JSON")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    ap.add_argument("--blur-max", type=float, default=0.0)
    ap.add_argument("--noise-max", type=float, default=0.0)
    ap.add_argument("--out-dir", type=Path, default=Path("variants"))
    args = ap.parse_args()
    config = contrastive.default_train_config(args.dataset)
    for item in args.set:
        key, value = item.split("=", 1)
        config = replace(config, **{key: type(getattr(config, key))(value)})
    # the variant reaches train_feature_network through the module's own lookups
    contrastive.TRAIN_PRESETS[args.dataset] = config
    contrastive.random_views = augmented_views(args.blur_max, args.noise_max)

    ds = DatasetSpec(args.dataset).load()
    t0 = time.process_time()
    net = features.train_feature_network(ds, kind="contrastive")
    print(f"{args.name}: trained in {time.process_time() - t0:.0f} CPU s, view retrieval {net.test_accuracy:.3f}")
    samples = load_samples(args.samples)
    real = net.features(ds.test)
    fd = {n: metrics.frechet_distance(net.features(x), real) for n, x in samples.items()}
    ranking = json.loads(args.ranking.read_text())["fd"]["classifier"]
    classifier = {n: v for row, v in ranking.items() for n in samples if row.startswith(f"{n} (")}
    names = list(samples)
    a, b = [classifier[n] for n in names], [fd[n] for n in names]
    rho, tau = spearmanr(a, b).statistic, kendalltau(a, b).statistic
    print("  contrastive:", " < ".join(f"{n} {fd[n]:.3g}" for n in sorted(names, key=fd.get)))
    print("  classifier: ", " < ".join(f"{n} {classifier[n]:.3g}" for n in sorted(names, key=classifier.get)))
    print(f"  Spearman {rho:.3f}, Kendall {tau:.3f}")
    ladder = degradation_ladder(net, ds)
    rises = {k: is_increasing([ladder["test"]] + ladder[k]) for k in ("blur", "noise", "modes")}
    print(f"  ladder: floor {ladder['floor']:.3g}, test {ladder['test']:.3g}, ceiling {ladder['ceiling']:.3g}; "
          + "; ".join(f"{k} {[round(v, 3) for v in ladder[k]]} rises: {rises[k]}" for k in rises))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps({
        "name": args.name, "dataset": args.dataset, "train_config": asdict(config), "blur_max": args.blur_max,
        "noise_max": args.noise_max, "view_retrieval": net.test_accuracy, "fd": fd, "classifier_fd": classifier,
        "spearman": rho, "kendall": tau, "ladder": ladder, "rises": rises}, indent=2) + "\n")


if __name__ == "__main__":
    main()
