"""AE and VAE: the VAE's ELBO/IWAE bookkeeping against independent computations, and the AE heuristic."""

import math

import pytest
import scipy.stats as st
import torch

from genbench.core.gaussian import discretized_gaussian_log_likelihood
from genbench.models.ae import AE, AEConfig
from genbench.models.vae import VAE, VAEConfig
from genbench.training.run import train_run


@pytest.mark.parametrize("mu, s", [(0.0, 0.01), (0.3, 0.05), (1.2, 0.2), (-0.4, 3.0), (0.5, 1e-4)])
def test_discretized_gaussian_matches_scipy_and_sums_to_one(mu, s):
    levels = torch.arange(256, dtype=torch.float64) / 255
    lp = discretized_gaussian_log_likelihood(levels[:, None], torch.full((256, 1), mu, dtype=torch.float64),
                                             math.log(s))
    edges = [-math.inf] + [(k + 0.5) / 255 for k in range(255)] + [math.inf]
    # upper-tail bins through the survival function, where differences of CDFs near 1 cancel
    ref = [st.norm.sf(edges[k], mu, s) - st.norm.sf(edges[k + 1], mu, s) if edges[k] > mu
           else st.norm.cdf(edges[k + 1], mu, s) - st.norm.cdf(edges[k], mu, s) for k in range(256)]
    ref_log = torch.log(torch.tensor(ref, dtype=torch.float64))
    finite = torch.isfinite(ref_log) & (ref_log > -600)
    torch.testing.assert_close(lp[finite], ref_log[finite], rtol=1e-6, atol=1e-9)
    assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_discretized_gaussian_gradients_finite_in_tails():
    x = torch.tensor([[0.0, 1.0, 0.5, 0.2]])
    mean = torch.tensor([[0.1, 0.9, 0.5, 30.0]], requires_grad=True)
    log_scale = torch.tensor(-6.0, requires_grad=True)
    out = discretized_gaussian_log_likelihood(x, mean, log_scale)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(mean.grad).all() and torch.isfinite(log_scale.grad)


def _vae(likelihood="discretized_gaussian"):
    torch.manual_seed(0)
    return VAE(VAEConfig(arch="mlp", latent_dim=3, width=32, likelihood=likelihood, iwae_samples=8)).double()


@pytest.mark.parametrize("likelihood", ["discretized_gaussian", "gaussian", "bernoulli"])
def test_vae_loss_is_negative_elbo_by_monte_carlo(likelihood):
    """loss = E_q[-log p(x|z)] + KL: average many single-sample losses and compare with an
    independent ELBO estimate E_q[log p(x,z) - log q(z|x)] from torch.distributions."""
    vae = _vae(likelihood)
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    torch.manual_seed(1)
    # 3000 single-sample losses at once: the loss is a batch mean, so tile the batch 3000 times
    losses = vae.loss(x.repeat(3000, 1, 1, 1))["loss"].reshape(1)
    mean, log_var = vae.posterior(x.float().double())
    q = torch.distributions.Independent(torch.distributions.Normal(mean, (0.5 * log_var).exp()), 1)
    p = torch.distributions.Independent(torch.distributions.Normal(torch.zeros_like(mean), 1.0), 1)
    z = q.sample((3000,))
    log_w = torch.stack([vae.decoder_log_likelihood(x, zk) for zk in z]) + p.log_prob(z) - q.log_prob(z)
    ref = -log_w.mean(0).mean()
    se = 2 * log_w.mean(1).std() / math.sqrt(3000)  # two independent estimates of similar spread
    assert abs(losses.mean() - ref) < 4 * se + 1e-9


@pytest.mark.parametrize("beta", [0.0, 0.25, 4.0])
def test_vae_loss_weights_the_kl_by_beta(beta):
    """loss = mean_b[-log p(x|z) + beta KL(q(z|x) || N(0, I))] at the z = mu + sigma eps of the noise
    the loss draws (same seed), recomputed from the encoder's raw output with torch.distributions
    (Gaussian decoder density, KL between Normals); the logged ELBO stays -(rec + KL), unweighted."""
    torch.manual_seed(0)
    vae = VAE(VAEConfig(arch="mlp", latent_dim=3, width=32, likelihood="gaussian", beta=beta)).double()
    with torch.no_grad():
        vae.decoder_log_var.fill_(math.log(0.3**2))
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64)
    torch.manual_seed(7)
    out = vae.loss(x)
    torch.manual_seed(7)
    eps = torch.randn(5, 3, dtype=torch.float64)
    with torch.no_grad():
        h = vae.encoder(x)
        mean, std = h[:, :3], (0.5 * h[:, 3:]).exp()
        z = mean + std * eps
        N = torch.distributions.Normal
        rec = -N(vae.decoder(z), 0.3).log_prob(x).sum((1, 2, 3))
        kl = torch.distributions.kl_divergence(N(mean, std), N(0.0, 1.0)).sum(1)
    assert kl.mean() > 0.01 and rec.mean() > 1  # both terms matter
    assert out["loss"].item() == pytest.approx((rec + beta * kl).mean().item(), rel=1e-12)
    assert out["rec_nll"].item() == pytest.approx(rec.mean().item(), rel=1e-12)
    assert out["kl"].item() == pytest.approx(kl.mean().item(), rel=1e-12)
    assert out["elbo"].item() == pytest.approx(-(rec + kl).mean().item(), rel=1e-12)


def test_iwae_bound_is_at_least_elbo_and_k1_equals_elbo():
    vae = _vae()
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    elbo, iwae = vae.log_likelihood_bounds(x, 64, generator=g)
    assert (iwae >= elbo - 1e-9).all()  # Jensen: log mean exp >= mean log
    g1 = torch.Generator().manual_seed(3)
    e1, i1 = vae.log_likelihood_bounds(x, 1, generator=g1)
    torch.testing.assert_close(e1, i1)


def test_vae_evaluate_reports_nats_and_bits(digits):
    vae = VAE(VAEConfig(arch="mlp", latent_dim=3, width=32, iwae_samples=4))
    out = vae.evaluate(digits.test[:16], generator=torch.Generator().manual_seed(0))
    assert out["bits_per_dim"] == pytest.approx(-out["test_iwae4_nats"] / (64 * math.log(2)))
    assert out["bits_per_dim"] <= out["test_elbo_bits_per_dim"] + 1e-6


def test_ae_sampling_heuristic_fits_training_latents(tmp_path, tiny_digits):
    run = train_run("ae", tiny_digits, tmp_path / "r", progress=False,
                    sets=["arch=mlp", "latent_dim=4", "width=32", "train.steps=30", "train.batch_size=64"])
    from genbench.models import GenerativeModel

    ae = GenerativeModel.from_pretrained(run / "model")
    with torch.no_grad():
        z = ae.encode(tiny_digits.train)
    torch.testing.assert_close(ae.latent_mean, z.mean(0), atol=1e-4, rtol=1e-4)
    cov = ae.latent_scale_tril @ ae.latent_scale_tril.T
    torch.testing.assert_close(cov, torch.cov(z.T), atol=1e-3, rtol=1e-3)
    s = ae.sample(16, generator=torch.Generator().manual_seed(0))
    assert s.shape == (16, 1, 8, 8) and s.min() >= 0 and s.max() <= 1
    ev = ae.evaluate(tiny_digits.test)
    assert ev["bits_per_dim"] is None and "no density model" in ev["bpd_estimator"]


@pytest.mark.parametrize("cls, cfg", [(AE, AEConfig), (VAE, VAEConfig)])
@pytest.mark.parametrize("size, channels", [(8, 1), (28, 1), (30, 3)])
def test_conv_shapes(cls, cfg, size, channels):
    model = cls(cfg(arch="conv", image_size=size, image_channels=channels, latent_dim=5, width=8))
    x = torch.rand(2, channels, size, size)
    assert model.reconstruct(x).shape == x.shape
    assert model.sample(3).shape == (3, channels, size, size)
    assert torch.isfinite(model.loss(x)["loss"])


# ----------------------------------------------------------------------------- the grid arch (LDM's KL first stage)

def _grid_vae(**over):
    torch.manual_seed(0)
    cfg = dict(arch="grid", image_size=8, downsample=2, latent_channels=2, width=16, n_res_blocks=1, iwae_samples=8)
    return VAE(VAEConfig(**{**cfg, **over})).double()


def test_grid_vae_loss_is_negative_elbo_over_every_latent_entry():
    """The grid latent (2, 4, 4) is 32 independent Gaussians: the loss must be E_q[-log p(x|z)] + KL
    summed over all of them, checked by Monte Carlo against torch.distributions with a 3-dim event."""
    vae = _grid_vae()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    torch.manual_seed(1)
    losses = vae.loss(x.repeat(2000, 1, 1, 1))["loss"]
    mean, log_var = vae.posterior(x)
    assert mean.shape == (3, 2, 4, 4)
    q = torch.distributions.Independent(torch.distributions.Normal(mean, (0.5 * log_var).exp()), 3)
    p = torch.distributions.Independent(torch.distributions.Normal(torch.zeros_like(mean), 1.0), 3)
    z = q.sample((2000,))
    log_w = torch.stack([vae.decoder_log_likelihood(x, zk) for zk in z]) + p.log_prob(z) - q.log_prob(z)
    ref = -log_w.mean()
    se = 2 * log_w.mean(1).std() / math.sqrt(2000)
    assert abs(losses - ref) < 4 * se + 1e-9


def test_grid_vae_bounds_use_the_whole_grid_as_the_event():
    """log_likelihood_bounds' log q(z|x) must sum over channels and both grid axes (a density over the
    last axis only would give a (B, C, H) tensor or a wrong bound): recomputed with the same draws."""
    vae = _grid_vae()
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    elbo, iwae = vae.log_likelihood_bounds(x, 5, generator=torch.Generator().manual_seed(2))
    assert elbo.shape == iwae.shape == (4,)
    mean, log_var = vae.posterior(x)
    g = torch.Generator().manual_seed(2)
    N = torch.distributions.Normal
    log_w = []
    for _ in range(5):
        z = mean + (0.5 * log_var).exp() * torch.randn(mean.shape, generator=g, dtype=mean.dtype)
        log_w.append(vae.decoder_log_likelihood(x, z) + N(0.0, 1.0).log_prob(z).sum((1, 2, 3))
                     - N(mean, (0.5 * log_var).exp()).log_prob(z).sum((1, 2, 3)))
    log_w = torch.stack(log_w)
    torch.testing.assert_close(elbo, log_w.mean(0))
    torch.testing.assert_close(iwae, torch.logsumexp(log_w, 0) - math.log(5))


@pytest.mark.parametrize("size, channels, f, c", [(8, 1, 2, 2), (28, 1, 4, 4), (32, 3, 4, 3)])
def test_grid_vae_shapes(size, channels, f, c):
    model = VAE(VAEConfig(arch="grid", image_size=size, image_channels=channels, downsample=f, latent_channels=c,
                          width=16))
    x = torch.rand(2, channels, size, size)
    assert model.config.latent_shape == (c, size // f, size // f)
    assert model.encode_latents(x).shape == model.encode_latents(x, sample=True).shape == (2, c, size // f, size // f)
    assert model.reconstruct(x).shape == x.shape
    assert model.sample(3).shape == (3, channels, size, size)
    assert torch.isfinite(model.loss(x)["loss"])


@pytest.mark.parametrize("over, match", [
    ({"arch": "unet"}, "arch must be 'mlp', 'conv' or 'grid'"),
    ({"arch": "grid", "downsample": 3}, "downsample must be a power of 2"),
    ({"arch": "grid", "image_size": 28, "downsample": 8}, "image_size 28 is not divisible by downsample 8"),
    ({"arch": "grid", "latent_channels": 0}, "latent_channels must be >= 1"),
])
def test_grid_vae_config_errors(over, match):
    from genbench.errors import GenbenchError
    with pytest.raises(GenbenchError, match=match):
        VAE(VAEConfig(**over))
