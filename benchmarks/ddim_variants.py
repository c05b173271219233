"""Sample quality of one trained DDPM run under DDIM variants (spacing, x0 clipping, eta).

    python benchmarks/ddim_variants.py RUN_DIR [N]

Draws N samples (default 400, same seed) per variant with the run's weights and scores each with
genbench's Fashion-MNIST feature network: FD against the test set, the share of pixels at 1.0 and
the mean pixel, next to the train set's FD at the same N. Used for the diagnosis in
docs/benchmarks.md ("DDPM on Fashion-MNIST"). Fashion-MNIST runs only (28x28, 1 channel).
"""

import sys
import time

import torch

from genbench.core.samplers import ddim_sample
from genbench.data import load_dataset
from genbench.evaluation import metrics
from genbench.evaluation.features import get_feature_network
from genbench.models import GenerativeModel

VARIANTS = [
    ("trailing clip", dict(steps=50)),
    ("leading clip", dict(steps=50, spacing="leading")),
    ("trailing noclip", dict(steps=50, clip_x0=None)),
    ("trailing clip eta1", dict(steps=50, eta=1.0)),
]


def main():
    torch.set_num_threads(1)
    run, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 400
    model = GenerativeModel.from_pretrained(run, device="cpu").eval()
    ds = load_dataset("fashion-mnist")
    feats = get_feature_network(ds)
    real = feats.features(ds.test)
    g = torch.Generator().manual_seed(1)
    ref = ds.train[torch.randperm(len(ds.train), generator=g)[:n]]
    print(f"train-set floor FD at N={n}: {metrics.frechet_distance(feats.features(ref), real):.2f}", flush=True)
    for name, kw in VARIANTS:
        t = time.time()
        with torch.no_grad():
            x = ddim_sample(model.diffusion, model.unet, (n, 1, 28, 28), generator=torch.Generator().manual_seed(0),
                            progress=False, **kw)
        x = ((x + 1) / 2).clamp(0, 1)
        fd = metrics.frechet_distance(feats.features(x), real)
        print(f"{name}: FD {fd:.2f}  pixels at 1.0 {(x >= 0.999).float().mean():.4f}  mean {x.mean():.3f}  "
              f"({time.time() - t:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
