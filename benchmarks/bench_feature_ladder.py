"""Does FD behave in a feature network's space? The degradation ladder (issue 16).

    python benchmarks/bench_feature_ladder.py --dataset fashion-mnist [--kinds classifier,contrastive] \
        [--num-images 2000] [--out ladder.json]

For each feature network kind (genbench.evaluation.features; the classifier needs labels), trains or
loads it from the cache, then scores by FD against train images (genbench.evaluation.ladder): a
disjoint train sample (the floor), the test split, the test split blurred (sigma 0.5..2 px), noised
(sigma 0.02..0.2), and cut to fewer modes (8..2 of 10 classes, or of k-means clusters of the pixels
without labels), and uniform noise (the ceiling). Prints a Markdown table (FD and FD / ceiling) and
whether every ladder rises at every rung; writes the numbers as JSON with the machine's CPU flags.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench_time_to_quality import cpu_flags

from genbench.data import DatasetSpec
from genbench.evaluation.features import get_feature_network
from genbench.evaluation.ladder import degradation_ladder, is_increasing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--kinds", default=None, help="comma-separated (default: both where the dataset has labels)")
    ap.add_argument("--num-images", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    ds = DatasetSpec(args.dataset, args.data_dir, args.image_size).load()
    labelled = ds.train_labels is not None
    kinds = args.kinds.split(",") if args.kinds else (["classifier", "contrastive"] if labelled else ["contrastive"])
    results = {"dataset": args.dataset, "cpu_flags": cpu_flags(), "ladders": {}}
    for kind in kinds:
        t0 = time.process_time()
        net = get_feature_network(ds, kind=kind, log_every=100)
        load_cpu_s = time.process_time() - t0
        lad = degradation_ladder(net, ds, num_images=args.num_images)
        lad.update(score_name=net.score_name, score=net.test_accuracy, train_cpu_s=net.train_cpu_seconds,
                   load_or_train_cpu_s=load_cpu_s,
                   increasing={r: is_increasing([lad["test"], *lad[r]]) for r in ("blur", "noise", "modes")})
        results["ladders"][kind] = lad
        print(f"{kind}: {net.score_name} {net.test_accuracy:.3f}, trained in {net.train_cpu_seconds:.0f} CPU s", flush=True)
    print(f"\n{args.dataset}, {results['ladders'][kinds[0]]['num_images']} images each; FD (FD / ceiling)\n")
    print("| rung | " + " | ".join(kinds) + " |")
    print("|---|" + "---|" * len(kinds))

    def row(name, values):
        cells = [f"{v:.3g} ({v / results['ladders'][k]['ceiling']:.2g})" for k, v in zip(kinds, values)]
        print(f"| {name} | " + " | ".join(cells) + " |")

    ladders = [results["ladders"][k] for k in kinds]
    row("train (floor)", [lad["floor"] for lad in ladders])
    row("test split", [lad["test"] for lad in ladders])
    for rung, label, unit in (("blur", "blur_sigmas", "blur sigma {} px"), ("noise", "noise_sigmas", "noise sigma {}"),
                              ("modes", "modes_kept", "{} of 10 modes")):
        for i, p in enumerate(ladders[0][label]):
            row(unit.format(p), [lad[rung][i] for lad in ladders])
    row("uniform noise (ceiling)", [lad["ceiling"] for lad in ladders])
    print("\nrises at every rung: " + "; ".join(f"{k}: {results['ladders'][k]['increasing']}" for k in kinds))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
