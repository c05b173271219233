"""Tests for genbench.core.gaussian against independent references: scipy.stats, torch.distributions,
Monte Carlo estimates, and the exact evidence and posterior of probabilistic PCA.

Everything is float64 and seeded, so tolerances can be tight (closed forms) or derived from the
sample size (Monte Carlo: a few standard errors).
"""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch.distributions import (
    Bernoulli,
    Independent,
    MultivariateNormal,
    Normal,
    kl_divergence,
)

from genbench.errors import GenbenchError
from genbench.core.gaussian import (
    bernoulli_log_prob,
    cholesky_spd,
    diag_normal_log_prob,
    elbo_gaussian_q,
    gaussian_log_likelihood,
    iwae_log_likelihood,
    kl_diag_normals,
    kl_mvn,
    kl_to_standard_normal,
    mvn_log_prob,
    mvn_log_prob_cholesky,
    mvn_rsample,
    nats_to_bits_per_dim,
    normal_log_prob,
    normal_log_prob_std,
    normal_pdf,
    ppca_log_marginal,
    ppca_posterior,
    reparameterize,
    standard_normal_log_prob,
)

F64 = torch.float64


def t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=F64)


def random_spd(rng: np.random.Generator, d: int, *batch: int) -> np.ndarray:
    """A A^T / d + 0.1 I: a well-conditioned random SPD matrix (batched)."""
    a = rng.normal(size=(*batch, d, d))
    return a @ np.swapaxes(a, -1, -2) / d + 0.1 * np.eye(d)


def random_ppca(rng: np.random.Generator, d: int, m: int, n: int):
    W = t(rng.normal(size=(d, m)))
    b = t(rng.normal(size=d))
    noise_var = float(rng.uniform(0.2, 1.5))
    x = t(rng.normal(size=(n, d)) * 2)
    return x, W, b, noise_var


# ---------------------------------------------------------------------------------------
# densities

# (x shape, mean shape, log_var shape): the three broadcast against each other
BROADCAST_SHAPES = [
    ((7,), (7,), (7,)),
    ((3, 4), (4,), ()),
    ((2, 1, 5), (3, 5), (2, 3, 1)),
    ((6,), (), (6,)),
]


@pytest.mark.parametrize("shapes", BROADCAST_SHAPES)
def test_univariate_normal_matches_scipy(shapes):
    rng = np.random.default_rng(0)
    xs, ms, vs = shapes
    x, mean = rng.normal(size=xs) * 3, rng.normal(size=ms)
    log_var = rng.uniform(-4, 3, size=vs)
    std = np.exp(0.5 * log_var)
    ref = stats.norm.logpdf(x, loc=mean, scale=std)
    got = normal_log_prob(t(x), t(mean), t(log_var))
    assert got.shape == ref.shape
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(normal_log_prob_std(t(x), t(mean), t(std)).numpy(), ref, rtol=1e-12)
    np.testing.assert_allclose(
        normal_pdf(t(x), t(mean), t(log_var)).numpy(), stats.norm.pdf(x, mean, std), rtol=1e-12
    )
    np.testing.assert_allclose(
        standard_normal_log_prob(t(x)).numpy(), stats.norm.logpdf(x), rtol=1e-12
    )


@pytest.mark.parametrize("event_dims", [0, 1, 2, 3])
def test_diag_normal_matches_torch_independent(event_dims):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 5, 2, generator=g, dtype=F64)
    mean = torch.randn(3, 5, 2, generator=g, dtype=F64)
    log_var = torch.randn(4, 1, 5, 2, generator=g, dtype=F64)
    ref = Independent(Normal(mean, torch.exp(0.5 * log_var)), event_dims).log_prob(x)
    got = diag_normal_log_prob(x, mean, log_var, event_dims=event_dims)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_diag_normal_rejects_too_many_event_dims():
    with pytest.raises(GenbenchError, match="event_dims must be in"):
        diag_normal_log_prob(torch.zeros(2, 3), 0.0, 0.0, event_dims=3)


@pytest.mark.parametrize("d", [1, 2, 5])
def test_mvn_matches_scipy(d):
    rng = np.random.default_rng(d)
    covs, means = random_spd(rng, d, 4), rng.normal(size=(4, d))
    x = rng.normal(size=(6, 4, d)) * 2
    got = mvn_log_prob(t(x), t(means), t(covs))
    assert got.shape == (6, 4)
    for i in range(4):  # scipy has no batch of covariances
        ref = stats.multivariate_normal(means[i], covs[i]).logpdf(x[:, i])
        np.testing.assert_allclose(got[:, i].numpy(), np.atleast_1d(ref), rtol=1e-11)


def test_mvn_broadcasts_like_torch_multivariate_normal():
    rng = np.random.default_rng(3)
    d = 3
    cov, mean = t(random_spd(rng, d, 4)), t(rng.normal(size=d))  # batch (4,), shared mean
    x = t(rng.normal(size=(5, 1, d)))  # broadcasts against the batch of covariances
    ref = MultivariateNormal(mean, covariance_matrix=cov).log_prob(x)
    got = mvn_log_prob(x, mean, cov)
    assert got.shape == ref.shape == (5, 4)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    L = torch.linalg.cholesky(cov)
    torch.testing.assert_close(mvn_log_prob_cholesky(x, mean, L), ref, rtol=1e-12, atol=1e-12)


def test_mvn_cholesky_ignores_upper_triangle_and_diagonal_sign():
    rng = np.random.default_rng(4)
    cov, x, mean = t(random_spd(rng, 4)), t(rng.normal(size=(3, 4))), t(rng.normal(size=4))
    L = torch.linalg.cholesky(cov)
    ref = mvn_log_prob(x, mean, cov)
    garbage_above = L + torch.triu(t(rng.normal(size=(4, 4))), diagonal=1)
    flipped = L * t([1.0, -1.0, 1.0, -1.0])  # L D with D = diag(+-1): same L L^T
    torch.testing.assert_close(mvn_log_prob_cholesky(x, mean, garbage_above), ref)
    torch.testing.assert_close(mvn_log_prob_cholesky(x, mean, flipped), ref)


def test_non_spd_covariance_gets_clear_error():
    x, mean = torch.zeros(2, dtype=F64), torch.zeros(2, dtype=F64)
    with pytest.raises(GenbenchError, match="cov is not symmetric"):
        mvn_log_prob(x, mean, t([[2.0, 1.0], [0.0, 2.0]]))
    with pytest.raises(GenbenchError, match="cov is not positive definite"):
        mvn_log_prob(x, mean, t([[1.0, 2.0], [2.0, 1.0]]))  # eigenvalues 3 and -1
    with pytest.raises(GenbenchError, match="cov is not positive definite"):
        mvn_log_prob(x, mean, torch.zeros(2, 2, dtype=F64))
    with pytest.raises(GenbenchError, match=r"cov must be a \(\.\.\., D, D\) matrix"):
        mvn_log_prob(x, mean, torch.eye(2, 3, dtype=F64))
    with pytest.raises(GenbenchError, match="cov contains NaN or inf"):
        mvn_log_prob(x, mean, t([[1.0, float("nan")], [float("nan"), 1.0]]))
    with pytest.raises(GenbenchError, match="x must have last dim 2"):
        mvn_log_prob(torch.zeros(3, dtype=F64), mean, torch.eye(2, dtype=F64))
    with pytest.raises(GenbenchError, match="cov_p is not positive definite"):
        kl_mvn(mean, torch.eye(2, dtype=F64), mean, t([[1.0, 2.0], [2.0, 1.0]]))


def test_cholesky_accepts_rounding_level_asymmetry():
    rng = np.random.default_rng(5)
    cov = torch.as_tensor(random_spd(rng, 3), dtype=torch.float32)
    cov[0, 1] += 1e-6 * cov.abs().max()  # float32 round-off, not a modelling error
    L = cholesky_spd(cov)
    torch.testing.assert_close(L @ L.mT, cov, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# KL divergences


def test_kl_closed_forms_match_torch_distributions():
    g = torch.Generator().manual_seed(6)
    mq, lq, mp, lp = torch.randn(4, 4, 2, 3, 3, generator=g, dtype=F64)  # (B, C, H, W) each
    q = Independent(Normal(mq, torch.exp(0.5 * lq)), 3)
    p = Independent(Normal(mp, torch.exp(0.5 * lp)), 3)
    prior = Independent(Normal(torch.zeros_like(mq), torch.ones_like(mq)), 3)
    torch.testing.assert_close(kl_diag_normals(mq, lq, mp, lp), kl_divergence(q, p))
    torch.testing.assert_close(kl_to_standard_normal(mq, lq), kl_divergence(q, prior))
    assert kl_to_standard_normal(mq, lq).shape == (4,)

    rng = np.random.default_rng(6)
    cq, cp = t(random_spd(rng, 3, 5)), t(random_spd(rng, 3))  # batch of q, one p
    mq, mp = t(rng.normal(size=(5, 3))), t(rng.normal(size=3))
    ref = kl_divergence(MultivariateNormal(mq, cq), MultivariateNormal(mp, cp))
    torch.testing.assert_close(kl_mvn(mq, cq, mp, cp), ref, rtol=1e-11, atol=1e-11)
    # a diagonal covariance is a diagonal normal
    lq2, lp2 = t(rng.normal(size=(5, 3))), t(rng.normal(size=3))
    diag = kl_mvn(mq, torch.diag_embed(lq2.exp()), mp, torch.diag_embed(lp2.exp()))
    torch.testing.assert_close(diag, kl_diag_normals(mq, lq2, mp, lp2))


def _assert_mc_kl(z, log_q, log_p, closed_form):
    """KL = E_q[log q(z) - log p(z)]: the sample mean within 4 standard errors."""
    diff = log_q - log_p  # (N, B)
    est, se = diff.mean(0), diff.std(0) / math.sqrt(diff.shape[0])
    assert torch.all((est - closed_form).abs() < 4 * se), (est, closed_form, se)


def test_kl_to_standard_normal_monte_carlo():
    g = torch.Generator().manual_seed(7)
    n, mean = 200_000, torch.randn(3, 4, generator=g, dtype=F64)
    log_var = torch.randn(3, 4, generator=g, dtype=F64)
    z = reparameterize(mean.expand(n, 3, 4), log_var.expand(n, 3, 4), generator=g)
    log_q = diag_normal_log_prob(z, mean, log_var)
    log_p = standard_normal_log_prob(z).sum(-1)
    _assert_mc_kl(z, log_q, log_p, kl_to_standard_normal(mean, log_var))


def test_kl_diag_normals_monte_carlo():
    g = torch.Generator().manual_seed(8)
    n = 200_000
    mq, lq, mp, lp = (torch.randn(3, 4, generator=g, dtype=F64) for _ in range(4))
    z = reparameterize(mq.expand(n, 3, 4), lq.expand(n, 3, 4), generator=g)
    log_q, log_p = diag_normal_log_prob(z, mq, lq), diag_normal_log_prob(z, mp, lp)
    _assert_mc_kl(z, log_q, log_p, kl_diag_normals(mq, lq, mp, lp))


def test_kl_needs_a_batch_dim():
    with pytest.raises(GenbenchError, match="needs a tensor with a batch dim"):
        kl_to_standard_normal(torch.tensor(0.0), torch.tensor(0.0))


# ---------------------------------------------------------------------------------------
# reparameterized sampling


def test_reparameterize_gradcheck_and_formula():
    g = torch.Generator().manual_seed(9)
    mean = torch.randn(3, 4, generator=g, dtype=F64, requires_grad=True)
    log_var = torch.randn(3, 4, generator=g, dtype=F64, requires_grad=True)
    eps = torch.randn(3, 4, generator=g, dtype=F64)
    assert torch.autograd.gradcheck(lambda m, lv: reparameterize(m, lv, eps=eps), (mean, log_var))
    expected = mean + torch.exp(0.5 * log_var) * eps
    torch.testing.assert_close(reparameterize(mean, log_var, eps=eps), expected)
    # the generator draws the noise reproducibly
    a = reparameterize(mean, log_var, generator=torch.Generator().manual_seed(0))
    b = reparameterize(mean, log_var, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def random_scale_tril(g: torch.Generator, d: int) -> torch.Tensor:
    a = torch.randn(d, d, generator=g, dtype=F64).tril(-1)
    return a + torch.diag(torch.rand(d, generator=g, dtype=F64) + 0.5)


def test_mvn_rsample_gradcheck():
    g = torch.Generator().manual_seed(10)
    mean = torch.randn(3, generator=g, dtype=F64, requires_grad=True)
    L = random_scale_tril(g, 3).requires_grad_()
    fn = lambda m, s: mvn_rsample(m, s, 4, generator=torch.Generator().manual_seed(0))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (mean, L))


def test_mvn_rsample_shapes():
    g = torch.Generator().manual_seed(11)
    L = random_scale_tril(g, 3)
    assert mvn_rsample(torch.zeros(2, 3, dtype=F64), L, 7, generator=g).shape == (7, 2, 3)
    batch_L = L.expand(4, 3, 3)
    z = mvn_rsample(torch.zeros(3, dtype=F64), batch_L, (5, 2), generator=g)
    assert z.shape == (5, 2, 4, 3)
    assert mvn_rsample(torch.zeros(3, dtype=F64), L, generator=g).shape == (3,)


def test_mvn_rsample_moments():
    g = torch.Generator().manual_seed(12)
    n, d = 100_000, 3
    mean, L = torch.randn(d, generator=g, dtype=F64), random_scale_tril(g, d)
    cov = L @ L.T
    z = mvn_rsample(mean, L, n, generator=g)
    # standard errors of a Gaussian sample mean and covariance: Var(S_ij) = (S_ii S_jj + S_ij^2) / n
    var = torch.diagonal(cov)
    mean_se = (var / n).sqrt()
    cov_se = ((var[:, None] * var[None, :] + cov**2) / n).sqrt()
    assert torch.all((z.mean(0) - mean).abs() < 4.5 * mean_se)
    assert torch.all((torch.cov(z.T) - cov).abs() < 4.5 * cov_se)


# ---------------------------------------------------------------------------------------
# decoder likelihoods, IWAE, bits/dim


def test_bernoulli_log_prob_matches_torch_and_is_stable():
    g = torch.Generator().manual_seed(13)
    logits = 4 * torch.randn(5, 1, 4, 4, generator=g, dtype=F64)
    x_binary = torch.randint(0, 2, (5, 1, 4, 4), generator=g).to(F64)
    ref = Bernoulli(logits=logits).log_prob(x_binary).sum((1, 2, 3))
    torch.testing.assert_close(bernoulli_log_prob(x_binary, logits), ref)
    # fractional pixel intensities: x log sigmoid(l) + (1 - x) log(1 - sigmoid(l)), in numpy
    x = torch.rand(5, 1, 4, 4, generator=g, dtype=F64)
    p = 1 / (1 + np.exp(-logits.numpy()))
    manual = (x.numpy() * np.log(p) + (1 - x.numpy()) * np.log1p(-p)).sum((1, 2, 3))
    np.testing.assert_allclose(bernoulli_log_prob(x, logits).numpy(), manual, rtol=1e-10)
    # saturated logits stay finite: log sigmoid(-200) = -200 to double precision
    extreme = bernoulli_log_prob(t([[0.0, 1.0]]), t([[200.0, -200.0]]))
    torch.testing.assert_close(extreme, t([-400.0]))


def test_gaussian_log_likelihood_matches_torch_independent():
    g = torch.Generator().manual_seed(14)
    x, mean = torch.randn(2, 3, 3, 4, 4, generator=g, dtype=F64)
    log_var = torch.randn(3, 3, 4, 4, generator=g, dtype=F64)
    ref = Independent(Normal(mean, torch.exp(0.5 * log_var)), 3).log_prob(x)
    torch.testing.assert_close(gaussian_log_likelihood(x, mean, log_var), ref)
    shared = Independent(Normal(mean, torch.full_like(mean, math.exp(0.5 * -1.3))), 3).log_prob(x)
    torch.testing.assert_close(gaussian_log_likelihood(x, mean, -1.3), shared)


def test_iwae_log_likelihood_k1_and_brute_force():
    g = torch.Generator().manual_seed(15)
    log_p, log_q = torch.randn(2, 1, 6, generator=g, dtype=F64)
    assert torch.equal(iwae_log_likelihood(log_p, log_q), (log_p - log_q)[0])
    log_p, log_q = torch.randn(2, 50, 6, generator=g, dtype=F64)
    ref = np.log(np.mean(np.exp(log_p.numpy() - log_q.numpy()), axis=0))
    np.testing.assert_allclose(iwae_log_likelihood(log_p, log_q).numpy(), ref, rtol=1e-12)
    with pytest.raises(GenbenchError, match=r"must both be \(K, B\)"):
        iwae_log_likelihood(log_p, log_q[:, :3])


def test_nats_to_bits_per_dim():
    assert nats_to_bits_per_dim(3 * 784 * math.log(2), 784) == pytest.approx(3.0)
    bpd = nats_to_bits_per_dim(torch.tensor([0.0, 784 * math.log(2)]), 784)
    torch.testing.assert_close(bpd, torch.tensor([0.0, 1.0]))
    with pytest.raises(GenbenchError, match="num_dims must be positive"):
        nats_to_bits_per_dim(1.0, 0)


# ---------------------------------------------------------------------------------------
# probabilistic PCA: the ELBO identity log p(x) = ELBO(q) + KL(q || p(z|x)), see docs/elbo.md


def test_ppca_marginal_and_posterior_match_gaussian_conditioning():
    rng = np.random.default_rng(16)
    x, W, b, s2 = random_ppca(rng, d=5, m=2, n=4)
    C = W.numpy() @ W.numpy().T + s2 * np.eye(5)
    ref = stats.multivariate_normal(b.numpy(), C).logpdf(x.numpy())
    np.testing.assert_allclose(ppca_log_marginal(x, W, b, s2).numpy(), ref, rtol=1e-11)
    # conditioning the joint Gaussian of (z, x), Cov(z, x) = W^T:
    # E[z|x] = W^T C^{-1} (x - b), Cov[z|x] = I - W^T C^{-1} W
    Cinv = np.linalg.inv(C)
    mean, cov = ppca_posterior(x, W, b, s2)
    Wn = W.numpy()
    np.testing.assert_allclose(mean.numpy(), (x.numpy() - b.numpy()) @ (Wn.T @ Cinv).T, atol=1e-12)
    np.testing.assert_allclose(cov.numpy(), np.eye(2) - Wn.T @ Cinv @ Wn, atol=1e-12)
    with pytest.raises(GenbenchError, match="noise_var must be a positive scalar"):
        ppca_log_marginal(x, W, b, 0.0)


@pytest.mark.parametrize("d,m,seed", [(5, 2, 0), (8, 3, 1), (3, 3, 2), (10, 1, 3)])
def test_elbo_identity_ppca(d, m, seed):
    """log p(x) = ELBO(q) + KL(q || p(z|x)) for an arbitrary Gaussian q, and ELBO = log p(x)
    when q is the exact posterior."""
    rng = np.random.default_rng(seed)
    x, W, b, s2 = random_ppca(rng, d, m, n=6)
    log_px = ppca_log_marginal(x, W, b, s2)
    post_mean, post_cov = ppca_posterior(x, W, b, s2)
    q_mean, q_cov = t(rng.normal(size=(6, m)) * 2), t(random_spd(rng, m, 6) * 3)
    elbo = elbo_gaussian_q(x, W, b, s2, q_mean, q_cov)
    gap = kl_mvn(q_mean, q_cov, post_mean, post_cov)
    assert torch.all(gap > 1e-3)  # q really is mismatched, so the identity is not 0 = 0
    torch.testing.assert_close(elbo + gap, log_px, rtol=0, atol=1e-9)
    exact = elbo_gaussian_q(x, W, b, s2, post_mean, post_cov)
    torch.testing.assert_close(exact, log_px, rtol=0, atol=1e-9)


def test_iwae_bound_tightens_with_k_on_ppca():
    """Importance-weighted bound with a mismatched diagonal q (Burda et al. 2016): E[L_K] equals
    the closed-form ELBO at K = 1, increases with K, stays below log p(x) and approaches it."""
    g = torch.Generator().manual_seed(17)
    x, W, b, s2 = random_ppca(np.random.default_rng(17), d=6, m=2, n=3)
    log_px = ppca_log_marginal(x, W, b, s2)
    post_mean, post_cov = ppca_posterior(x, W, b, s2)
    # shifted and over-dispersed: a ~30-nat KL gap at K = 1, bounded importance weights
    q_mean = post_mean + 1.5
    q_log_var = (torch.diagonal(post_cov).log() + 2.5).expand_as(q_mean)
    reps, ks = 400, (1, 10, 100, 1000)
    shape = (ks[-1], reps, *q_mean.shape)  # (K, reps, B, M)
    z = reparameterize(q_mean.expand(shape), q_log_var.expand(shape), generator=g)
    log_q = diag_normal_log_prob(z, q_mean, q_log_var)  # (K, reps, B)
    log_prior = standard_normal_log_prob(z).sum(-1)
    log_joint = log_prior + diag_normal_log_prob(x, z @ W.T + b, math.log(s2))
    # nested: L_K uses the first K of the same 1000 samples, so the differences are less noisy;
    # bounds has shape (len(ks), reps, B)
    bounds = torch.stack([iwae_log_likelihood(log_joint[:k], log_q[:k]) for k in ks])
    est, se = bounds.mean(1), bounds.std(1) / math.sqrt(reps)

    elbo = elbo_gaussian_q(x, W, b, s2, q_mean, torch.diag_embed(q_log_var.exp()))
    assert torch.all((est[0] - elbo).abs() < 4 * se[0])
    assert torch.all(est <= log_px + 4 * se)
    step = (bounds[1:] - bounds[:-1]).mean(-1)  # (3, reps): averaged over the 3 data points
    assert torch.all(step.mean(1) > 4 * step.std(1) / math.sqrt(reps)), step.mean(1)
    gap = log_px - est  # ~47 nats at K = 1, ~0.1 at K = 1000
    assert torch.all(gap[-1] < 0.01 * gap[0]), gap
