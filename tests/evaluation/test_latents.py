"""The measurements behind the report's pictures of how each family works (evaluation/latents.py), on
untrained tiny models whose answers are known by construction.

References: active units by their definition (Burda et al. 2016 sec. 5.2: Cov_x(E_q[z_u]) > 0.01)
computed here with numpy; the PCA against scikit-learn's PCA; the code histogram against
torch.bincount of the model's own encode(); the trajectory against the sample() of the same seed.
"""

import json

import numpy as np
import pytest
import torch
from torch import nn

from genbench.config import from_dict
from genbench.core.quantizer import codebook_stats
from genbench.evaluation.latents import (ACTIVE_THRESHOLD, active_units, codebook_usage, diffusion_trajectory, pca_2d,
                                         posterior_summary)
from genbench.models.ddpm import DDPM, DDPMConfig
from genbench.models.ldm import LDM, LDMConfig
from genbench.models.vae import VAE, VAEConfig
from genbench.models.vqvae import VQVAE, VQVAEConfig

TINY_UNET = {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [], "num_heads": 1,
             "dropout": 0.0}
TINY_DIFFUSION = {"num_timesteps": 100, "schedule": "linear", "beta_start": 1e-3, "beta_end": 0.1}


class HalfBlindEncoder(nn.Module):
    """A VAE encoder whose means of units 0..D/2-1 read the image (a sum over its pixels, scaled), and
    whose means of units D/2..D-1 are constants: it ignores half its latent dimensions."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.d = latent_dim

    def forward(self, x):
        s = x.flatten(1).sum(1, keepdim=True)  # varies from image to image
        active = s * torch.linspace(0.05, 0.5, self.d // 2, device=x.device)
        blind = torch.full((len(x), self.d - self.d // 2), 0.7, device=x.device)
        return torch.cat([active, blind, torch.zeros(len(x), self.d, device=x.device)], 1)  # means, log-variances


def test_a_vae_that_ignores_half_its_latent_has_exactly_the_other_half_active(digits):
    vae = VAE(VAEConfig(arch="mlp", latent_dim=8, width=16)).eval()
    vae.encoder = HalfBlindEncoder(8)
    summary = posterior_summary(vae, digits.test[:300])
    assert summary["active_units"] == 4 and summary["latent_dims"] == 8
    var = np.asarray(summary["unit_variances"])
    assert (var[:4] > ACTIVE_THRESHOLD).all() and (var[4:] == 0).all()
    # the definition, by hand: population variance over the inputs of each unit's posterior mean
    means = vae.posterior(digits.test[:300])[0].double().numpy()
    np.testing.assert_allclose(var, means.var(0), rtol=1e-10)
    assert summary["pca"].shape == (300, 2) and summary["pca_explained"][0] == pytest.approx(1.0)


def test_active_units_threshold_is_strict_and_counts_grid_latents():
    g = torch.Generator().manual_seed(0)
    unit = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    unit = (unit - unit.mean(0)) / unit.std(0, correction=0)  # exactly variance 1 per column
    means = unit * torch.tensor([0.0101, 0.0099, 2.0]).sqrt()
    count, var = active_units(means)
    assert count == 2 and var[0] > 0.01 > var[1]
    assert active_units(means, threshold=float(var.max()))[0] == 0  # strict: a variance equal to it is not above it
    with pytest.raises(ValueError, match="shape"):
        active_units(torch.zeros(1, 3))
    grid = VAE(VAEConfig(arch="grid", width=8, latent_channels=2, downsample=2, n_res_blocks=0)).eval()
    assert posterior_summary(grid, torch.rand(20, 1, 8, 8, generator=g))["latent_dims"] == 2 * 4 * 4


def test_pca_matches_scikit_learn():
    from sklearn.decomposition import PCA

    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 6, generator=g) @ torch.randn(6, 6, generator=g) + 3.0
    coords, explained = pca_2d(x)
    ref = PCA(n_components=2).fit(x.double().numpy())
    np.testing.assert_allclose(explained, ref.explained_variance_ratio_, rtol=1e-8)
    np.testing.assert_allclose(np.abs(coords), np.abs(ref.transform(x.double().numpy())), atol=1e-8)
    # one dimension: the second coordinate is zero; constant data: nothing explained, no NaN
    assert np.all(pca_2d(x[:, :1])[0][:, 1] == 0)
    assert np.all(pca_2d(torch.ones(10, 3))[1] == 0)


def test_codebook_usage_counts_the_models_codes_and_reads_the_quantizer_log():
    vq = VQVAE(VQVAEConfig(downsample=2, width=16, n_res_blocks=1, codebook_size=16, code_dim=4, prior_layers=1,
                           prior_heads=1, prior_embd=16)).eval()
    x = torch.rand(37, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    log = [{"stage": "autoencoder", "step": 50, "loss": 1.0, "perplexity": 3.5, "usage": 0.25, "window_usage": 0.75},
           {"stage": "autoencoder", "step": 100, "loss": 0.5, "perplexity": 9.0, "usage": 0.5, "window_usage": 1.0},
           {"stage": "prior", "step": 50, "loss": 2.0, "perplexity": 5.0, "usage": 1.0}]  # the prior's tokens
    usage = codebook_usage(vq, x, log)
    ref = torch.bincount(vq.encode(x).reshape(-1), minlength=16)
    assert usage["counts"] == ref.tolist() and sum(usage["counts"]) == 37 * 4 * 4
    assert usage["codes_used"] == int((ref > 0).sum()) and usage["codebook_size"] == 16
    assert usage["perplexity"] == pytest.approx(codebook_stats(vq.encode(x), 16)["perplexity"])
    assert usage["training"] == {"step": [50, 100], "perplexity": [3.5, 9.0], "unused_codes": [4, 0]}
    json.dumps(usage)  # goes into metrics.json as it is


def _ddpm():
    return DDPM(from_dict(DDPMConfig, {"unet": TINY_UNET, "diffusion": TINY_DIFFUSION,
                                       "sampler": {"name": "dpm++2m", "steps": 12}, "bpd_timesteps": 0})).eval()


def _ldm():
    return LDM(from_dict(LDMConfig, {"first_stage": "vae", "vae": {"arch": "mlp", "latent_dim": 16, "width": 32},
                                     "unet": TINY_UNET, "diffusion": TINY_DIFFUSION, "scale_factor": 1.5,
                                     "sampler": {"name": "ddim", "steps": 5}})).eval()


@pytest.mark.parametrize("make,space", [(_ddpm, (1, 8, 8)), (_ldm, (1, 4, 4))])
def test_trajectory_ends_at_the_sample_and_leaves_sampling_unchanged(make, space):
    model = make()
    traj = diffusion_trajectory(model, 3, torch.Generator().manual_seed(4), columns=8)
    plain = model.sample(3, torch.Generator().manual_seed(4))
    assert torch.equal(traj["samples"], plain)  # the callback changed nothing
    steps = model.config.sampler.steps
    assert len(traj["t"]) == min(8, steps) and traj["x_t"].shape == traj["x0_hat"].shape == (len(traj["t"]), 3, *space)
    every = []
    model.sample(1, callback=lambda t, x, x0: every.append(t))
    assert len(every) == steps and set(traj["t"]) <= set(every)
    assert traj["t"] == sorted(traj["t"], reverse=True) and (traj["t"][0], traj["t"][-1]) == (every[0], every[-1])
    # the last x0_hat, shown as images, is the sample
    torch.testing.assert_close(model.diffusion_to_images(traj["x0_hat"][-1]), plain, rtol=0, atol=1e-6)
