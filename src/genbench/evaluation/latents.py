"""Inside the families: the measurements behind the report's pictures of how each model works.

    posterior_summary   the VAE's latent space: active units (Burda et al. 2016 sec. 5.2) and a
                        2-D PCA projection of the test set's posterior means, with the class labels
    codebook_usage      a VQ model's code frequencies over the test set, and its batch perplexity
                        and unused codes over training (from the run's log)
    diffusion_trajectory  x_t and the network's x0_hat at several steps of one sampling run

Each takes a trained model through its contract (genbench.models.base: has_posterior,
has_codebook, has_sampler) and returns plain tensors and numbers; genbench.evaluation.figures
draws them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from genbench.core.quantizer import histogram_stats
from genbench.models.base import GenerativeModel

ACTIVE_THRESHOLD = 0.01  # Burda et al. 2016: unit u is active if Cov_x(E_q[z_u]) > 0.01
BATCH = 500


def active_units(means: Tensor, threshold: float = ACTIVE_THRESHOLD) -> tuple[int, Tensor]:
    """(A_u count, per-unit variances): A_u = #{u : Cov_x(E_{q(z|x)}[z_u]) > threshold} (Burda et al.
    2016, "Importance Weighted Autoencoders", sec. 5.2), from posterior means (N, D) of N inputs; the
    variance over the inputs is the population one (1/N)."""
    if means.ndim != 2 or len(means) < 2:
        raise ValueError(f"active_units: need posterior means of shape (N >= 2, D), got {tuple(means.shape)}")
    var = means.double().var(0, correction=0)
    return int((var > threshold).sum()), var


def pca_2d(x: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(coordinates (N, 2) on the first two principal axes, fraction of the variance each explains),
    by SVD of the centred data (N, D); a single-dimension input gets a zero second coordinate. The
    sign of each axis is fixed so that its largest loading is positive (SVD leaves it arbitrary)."""
    a = x.detach().double().cpu().numpy().reshape(len(x), -1)
    a = a - a.mean(0)
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    sign = np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(1)])
    coords = (u * s * np.where(sign == 0, 1, sign))[:, :2]
    if coords.shape[1] < 2:
        coords = np.concatenate([coords, np.zeros((len(a), 2 - coords.shape[1]))], 1)
    total = float((s**2).sum())
    explained = (s[:2] ** 2) / total if total > 0 else np.zeros(min(2, len(s)))
    return coords, np.pad(explained, (0, 2 - len(explained)))


@torch.no_grad()
def posterior_summary(model: GenerativeModel, x: Tensor) -> dict:
    """Active units and the PCA projection of the posterior means E_q[z|x] of images x (a model
    with has_posterior). "means" is (N, D): a grid latent is flattened."""
    means = torch.cat([model.posterior(b)[0].float().flatten(1).cpu() for b in x.split(BATCH)])
    count, var = active_units(means)
    coords, explained = pca_2d(means)
    return {"active_units": count, "latent_dims": means.shape[1], "active_threshold": ACTIVE_THRESHOLD,
            "unit_variances": var.tolist(), "pca": coords, "pca_explained": explained.tolist()}


@torch.no_grad()
def codebook_usage(model: GenerativeModel, x: Tensor, log: list[dict]) -> dict:
    """Code frequencies over the images x (a model with has_codebook), with their perplexity and the
    number of codes used; and, from the run's log records of its quantizer stage (those with
    "window_usage"), the batch perplexity and the codes not chosen in the dead-code window per step."""
    k = model.codebook_size
    counts = torch.zeros(k, dtype=torch.long)
    for b in x.split(BATCH):
        counts += torch.bincount(model.encode(b).reshape(-1).long().cpu(), minlength=k)
    perplexity, usage = histogram_stats(counts)
    records = [r for r in log if isinstance(r.get("window_usage"), (int, float)) and isinstance(r.get("step"), int)]
    return {
        "codebook_size": k, "counts": counts.tolist(), "perplexity": float(perplexity),
        "codes_used": int((counts > 0).sum()), "usage": float(usage),
        "training": {"step": [r["step"] for r in records], "perplexity": [r.get("perplexity") for r in records],
                     "unused_codes": [round(k * (1 - r["window_usage"])) for r in records]},
    }


@torch.no_grad()
def diffusion_trajectory(model: GenerativeModel, n: int, generator: torch.Generator | None = None,
                         columns: int = 8) -> dict:
    """One sampling run of n samples (a model with has_sampler), seen through the sampler's callback:
    "t" (S,) the timesteps kept, "x_t" and "x0_hat" (S, n, ...) in the diffusion's space, at most
    `columns` steps evenly spread over the run, the first and the last always kept; and "samples", what
    sample() returned (the decoded x0_hat of the last step)."""
    steps: list[tuple[int, Tensor, Tensor]] = []
    samples = model.sample(n, generator, callback=lambda t, x, x0: steps.append((t, x.float().cpu(), x0.float().cpu())))
    keep = sorted(set(np.linspace(0, len(steps) - 1, min(columns, len(steps))).round().astype(int).tolist()))
    return {"t": [steps[i][0] for i in keep], "x_t": torch.stack([steps[i][1] for i in keep]),
            "x0_hat": torch.stack([steps[i][2] for i in keep]), "samples": samples.float().cpu()}
