"""Which feature spaces side with which ranking? More judges of the same samples (issue 16).

    python benchmarks/bench_feature_ranking.py RUN_DIR ... --samples SAMPLES --out ranking.json
    python benchmarks/bench_feature_judges.py SAMPLES --dataset fashion-mnist [--bootstrap 50] \
        [--out judges.json]

The classifier and the contrastive network rank the six Fashion-MNIST baselines differently in one
place (docs/benchmarks.md). Is that the contrastive network's fault, or a split between what labels
teach and what appearance shows? This scores the very same saved samples (`bench_feature_ranking.py
--samples`, one .npy per model) by FD against the test split in more feature spaces, none of them
tuned here:

- the cached classifier and contrastive network (genbench.evaluation.features);
- two more classifiers, trained now on the labels like the cached one: seed 1 at the same widths,
  seed 2 at twice the widths (32/64/128);
- the contrastive network's architecture untrained (random weights, two seeds), standardised on
  10,000 train images: features no objective has shaped;
- pixels, through a fixed random projection to 256 dimensions (FD needs a covariance it can invert).

For the cached pair it also draws `--bootstrap` resamples (samples and test images with replacement)
and reports, for every pair of models, the fraction of resamples in which the first scores lower:
which differences are real and which are ties.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from genbench.data import DatasetSpec
from genbench.evaluation import features, metrics
from genbench.evaluation.features import _accuracy, _TrainImages, get_feature_network, train_feature_cnn
from genbench.nets.classifier import ContrastiveCNN, ContrastiveNetConfig, FeatureNetConfig


def load_samples(directory: Path) -> dict[str, torch.Tensor]:
    """{model: (N, C, H, W)} from bench_feature_ranking's files, named <model>__<run>-<n>-<seed>-<sampler>.npy."""
    samples = {}
    for f in sorted(directory.glob("*__*.npy")):
        model = f.name.split("__")[0]
        if model in samples:
            raise SystemExit(f"{directory}: two sample files of {model} ({f.name}); keep one run per model there")
        samples[model] = torch.from_numpy(np.load(f))
    return samples


@torch.no_grad()
def fd_table(extract, samples: dict, test: torch.Tensor) -> dict[str, float]:
    def feats(x):
        return np.concatenate([np.asarray(extract(x[i: i + 512])) for i in range(0, len(x), 512)])

    real = feats(test)
    return {name: metrics.frechet_distance(feats(x), real) for name, x in samples.items()}


def bootstrap_pairs(net, samples: dict, test: torch.Tensor, draws: int, seed: int = 0) -> dict:
    """P(FD_a < FD_b) over resamples of both the samples and the test images, for every pair a, b."""
    rng = np.random.default_rng(seed)
    real, fake = net.features(test), {n: net.features(x) for n, x in samples.items()}
    fds = {n: [] for n in samples}
    for _ in range(draws):
        r = real[rng.integers(0, len(real), len(real))]
        for n, f in fake.items():
            fds[n].append(metrics.frechet_distance(f[rng.integers(0, len(f), len(f))], r))
    names = list(samples)
    return {"std": {n: float(np.std(v)) for n, v in fds.items()},
            "p_lower": {f"{a}<{b}": float(np.mean(np.array(fds[a]) < np.array(fds[b])))
                        for i, a in enumerate(names) for b in names[i + 1:]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("samples", type=Path)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--bootstrap", type=int, default=50)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    ds = DatasetSpec(args.dataset).load()
    samples = load_samples(args.samples)
    if not samples:
        raise SystemExit(f"{args.samples}: no .npy samples (write them with bench_feature_ranking.py --samples)")
    test = ds.float_images("test")
    judges, bootstrap = {}, {}
    for kind in features.KINDS:
        net = get_feature_network(ds, kind=kind)
        judges[f"{kind} (cached)"] = fd_table(net.features, samples, test)
        if args.bootstrap:
            bootstrap[kind] = bootstrap_pairs(net, samples, test, args.bootstrap)
    base = features.default_train_config(ds.name)
    for seed, widths in ((1, (16, 32, 64)), (2, (32, 64, 128))):
        t0 = time.process_time()
        model = train_feature_cnn(_TrainImages(ds), ds.train_labels,
                                  FeatureNetConfig(tuple(ds.shape), num_classes=ds.num_classes, widths=widths),
                                  replace(base, seed=seed))
        model.eval()
        acc = _accuracy(model, test, ds.test_labels)
        judges[f"classifier, seed {seed}, widths {widths} (test accuracy {acc:.3f})"] = fd_table(model.features, samples, test)
        print(f"classifier seed {seed}: {time.process_time() - t0:.0f} CPU s", flush=True)
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = ContrastiveCNN(ContrastiveNetConfig(tuple(ds.shape))).eval()
        model.fit_feature_standardization(ds.float_images("train", slice(0, 10_000)))
        judges[f"untrained network, seed {seed}"] = fd_table(model.features, samples, test)
    projection = torch.randn(int(np.prod(ds.shape)), 256, generator=torch.Generator().manual_seed(0))
    judges["pixels (random projection to 256-d)"] = fd_table(lambda x: x.flatten(1) @ projection, samples, test)

    names = list(samples)
    reference = judges["classifier (cached)"]
    print(f"\n{ds.name}: FD of each model's {len(next(iter(samples.values())))} samples, per judge\n")
    print("| judge | order, best first | Spearman vs classifier |\n|---|---|---:|")
    result = {"dataset": ds.name, "judges": {}, "bootstrap": bootstrap}
    for judge, fd in judges.items():
        order = sorted(names, key=fd.get)
        rho = spearmanr([reference[n] for n in names], [fd[n] for n in names]).statistic
        result["judges"][judge] = {"fd": fd, "order": order, "spearman_vs_classifier": rho}
        print(f"| {judge} | {' < '.join(f'{n} {fd[n]:.3g}' for n in order)} | {rho:.2f} |")
    for kind, b in bootstrap.items():
        print(f"\n{kind}: bootstrap std {({n: round(s, 3) for n, s in b['std'].items()})}")
        print(f"  P(first lower) {b['p_lower']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
