"""Tests for genbench.diffusion against independent references.

References used: numpy re-derivations of the schedules; Bayes' rule for Gaussians in precision form;
the exact posterior-mean denoiser ("oracle") for Gaussian data, whose sampler output moments follow
from a float64 scalar recursion written here from the papers' update equations; closed-form
expectations of the loss and of the KL terms under that oracle; torch.distributions and scipy.stats
for the prior KL and the discretized decoder.
"""
import math

import numpy as np
import pytest
import torch
from numpy.polynomial.hermite_e import hermegauss
from scipy import stats

from genbench.core.diffusion import DiffusionConfig, GaussianDiffusion, x0_and_eps
from genbench.core.samplers import ddim_sample, ddim_timesteps, ddpm_sample
from genbench.errors import GenbenchError

# per-dimension Gaussian data N(m, s^2) used by the oracle tests
M = np.array([0.5, -0.3, 0.0, 0.2])
S = np.array([0.3, 0.6, 1.0, 0.1])
N_SAMPLES = 20_000


# ---------------------------------------------------------------------------------------------
# independent references


def np_alphas_cumprod(T, schedule, beta_start=1e-4, beta_end=0.02):
    """alpha_bar_t from the papers' formulas, numpy float64 (Ho et al. sec. 4; Nichol & Dhariwal eq. 17)."""
    if schedule == "linear":
        betas = np.linspace(beta_start, beta_end, T)
    else:
        f = np.cos((np.arange(T + 1) / T + 0.008) / 1.008 * np.pi / 2) ** 2
        betas = np.minimum(1 - (f[1:] / f[0]) / (f[:-1] / f[0]), 0.999)
    return np.cumprod(1 - betas)


class GaussianOracle:
    """Exact minimum-MSE predictor for data x0 ~ N(m, diag(s^2)).

    q(x_t) = N(sqrt(a) m, a s^2 + 1 - a) with a = alpha_bar_t, and
      E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) m) / (a s^2 + 1 - a),
      E[x0 | x_t]  = m + sqrt(a) s^2 (x_t - sqrt(a) m) / (a s^2 + 1 - a),
      E[v | x_t]   = sqrt(a) E[eps | x_t] - sqrt(1 - a) E[x0 | x_t].
    Built from its own alpha_bar table, not from the diffusion object under test.
    """

    def __init__(self, alphas_cumprod, m, s, prediction="eps"):
        self.a = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.m, self.s = torch.as_tensor(m, dtype=torch.float64), torch.as_tensor(s, dtype=torch.float64)
        self.prediction = prediction

    def __call__(self, x, t):
        a = self.a[t].unsqueeze(1)
        r = (x.double() - a.sqrt() * self.m) / (a * self.s**2 + 1 - a)
        eps, x0 = (1 - a).sqrt() * r, self.m + a.sqrt() * self.s**2 * r
        out = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[self.prediction]
        return out.to(x.dtype)


def _oracle_step(a, m, s):
    """For the oracle at alpha_bar a: x0_hat = m + k (x - sqrt(a) m), eps_hat = ke (x - sqrt(a) m)."""
    V = a * s**2 + 1 - a
    return np.sqrt(a) * s**2 / V, np.sqrt(1 - a) / V


def exact_ddpm_moments(ab, m, s, variance):
    """Mean/variance of Ho et al. Algorithm 2 output with the oracle, propagated exactly.

    Each step is x_{t-1} = A x_t + B + sigma z (linear-Gaussian), so mean' = A mean + B and
    var' = A^2 var + sigma^2, starting from x_T ~ N(0, 1).
    """
    mu, var = np.zeros_like(m), np.ones_like(m)
    for t in range(len(ab) - 1, -1, -1):
        a, a_prev = ab[t], (ab[t - 1] if t > 0 else 1.0)
        beta = 1 - a / a_prev
        k, _ = _oracle_step(a, m, s)
        c1, c2 = np.sqrt(a_prev) * beta / (1 - a), np.sqrt(1 - beta) * (1 - a_prev) / (1 - a)  # Ho eq. 7
        A, B = c1 * k + c2, c1 * (m - k * np.sqrt(a) * m)
        sigma2 = 0.0 if t == 0 else (beta * (1 - a_prev) / (1 - a) if variance == "beta_tilde" else beta)
        mu, var = A * mu + B, A * A * var + sigma2
    return mu, var


def exact_ddim_moments(ab, tau, eta, m, s):
    """Mean/variance of the DDIM update (Song et al. eq. 12) with the oracle, propagated exactly."""
    mu, var = np.zeros_like(m), np.ones_like(m)
    for i, t in enumerate(tau):
        a, a_prev = ab[t], (ab[tau[i + 1]] if i + 1 < len(tau) else 1.0)
        sigma = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        k, ke = _oracle_step(a, m, s)
        c_eps = np.sqrt(1 - a_prev - sigma**2)
        A = np.sqrt(a_prev) * k + c_eps * ke
        B = np.sqrt(a_prev) * (m - k * np.sqrt(a) * m) - c_eps * ke * np.sqrt(a) * m
        mu, var = A * mu + B, A * A * var + sigma**2
    return mu, var


def assert_moments(x, mean, var, n_se=4.5):
    """Sample mean/variance of Gaussian samples x (N, D) within n_se standard errors of (mean, var)."""
    n = x.shape[0]
    x = x.double().numpy()
    z_mean = (x.mean(0) - mean) / np.sqrt(var / n)
    z_var = (x.var(0, ddof=1) - var) / (var * np.sqrt(2 / (n - 1)))
    assert np.all(np.abs(z_mean) < n_se), f"mean off by {z_mean} SE"
    assert np.all(np.abs(z_var) < n_se), f"variance off by {z_var} SE"


def make(T=200, schedule="cosine", prediction="eps", **kw):
    return GaussianDiffusion(DiffusionConfig(num_timesteps=T, schedule=schedule, prediction=prediction, **kw))


# ---------------------------------------------------------------------------------------------
# config and schedules


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("num_timesteps", 1, "num_timesteps must be >= 2"),
        ("schedule", "quadratic", "schedule must be"),
        ("beta_end", 5e-5, "beta_start <= beta_end"),
        ("prediction", "score", "prediction must be"),
        ("loss_weighting", "p2", "loss_weighting must be"),
        ("min_snr_gamma", 0.0, "min_snr_gamma must be > 0"),
    ],
)
def test_config_validation(field, value, match):
    cfg = DiffusionConfig(**{field: value})
    with pytest.raises(GenbenchError, match=match):
        cfg.validate()
    with pytest.raises(GenbenchError, match=match):
        GaussianDiffusion(cfg)


def test_schedule_that_does_not_reach_noise_is_rejected():
    with pytest.raises(GenbenchError, match="alpha_bar_T = .* increase num_timesteps or beta_end"):
        make(T=100, schedule="linear")  # sum of betas ~ 1 -> alpha_bar_T ~ e^-1


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedules_match_numpy_formulas(schedule):
    d = make(T=1000, schedule=schedule)
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), np_alphas_cumprod(1000, schedule), rtol=1e-12)
    assert d.alphas_cumprod.dtype == torch.float64


def test_cosine_schedule_properties():
    d = make(T=1000, schedule="cosine")
    assert (d.betas > 0).all() and (d.betas <= 0.999).all()
    assert d.betas[-1] == 0.999  # the clip is active at t = T
    assert (d.alphas_cumprod.diff() < 0).all()
    assert d.betas[0] < 1e-4  # tiny first step (Nichol & Dhariwal fig. 5)


# ---------------------------------------------------------------------------------------------
# forward process, posterior, parameterizations


def test_q_sample_moments():
    torch.manual_seed(0)
    d = make(T=1000, schedule="linear")
    x0 = torch.tensor([0.9, -0.5, 0.1], dtype=torch.float64)
    n = 40_000
    for t_val in (0, 100, 500, 999):
        t = torch.full((n,), t_val)
        xt = d.q_sample(x0.expand(n, 3), t)
        ab = np_alphas_cumprod(1000, "linear")[t_val]
        assert_moments(xt, np.sqrt(ab) * x0.numpy(), np.full(3, 1 - ab), n_se=4.0)


def test_posterior_matches_bayes_rule():
    """q(x_{t-1} | x_t, x0) from precision-weighted Bayes on q(x_{t-1}|x0) = N(sqrt(ab_{t-1}) x0, 1-ab_{t-1})
    and q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t):
    precision = 1/(1-ab_{t-1}) + alpha_t/beta_t, mean = var (sqrt(ab_{t-1}) x0/(1-ab_{t-1}) + sqrt(alpha_t) x_t/beta_t).
    """
    T = 1000
    d = make(T=T, schedule="linear")
    ab = np_alphas_cumprod(T, "linear")
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    alpha = ab / ab_prev
    beta = 1 - alpha
    t = np.arange(1, T)
    var = 1 / (1 / (1 - ab_prev[t]) + alpha[t] / beta[t])
    np.testing.assert_allclose(d.posterior_variance[1:].numpy(), var, rtol=1e-9)
    np.testing.assert_allclose(d.posterior_mean_coef1[1:].numpy(), var * np.sqrt(ab_prev[t]) / (1 - ab_prev[t]), rtol=1e-9)
    np.testing.assert_allclose(d.posterior_mean_coef2[1:].numpy(), var * np.sqrt(alpha[t]) / beta[t], rtol=1e-9)
    # t = 1 (index 0): x_0 is known given x0, so the "posterior" is a point mass at x0
    assert math.isclose(d.posterior_mean_coef1[0], 1.0, rel_tol=1e-12)
    assert d.posterior_mean_coef2[0] == 0 and d.posterior_variance[0] == 0
    assert math.isclose(d.posterior_log_variance_clipped[0], math.log(var[0]), rel_tol=1e-12)
    x0, xt, tt = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64), torch.tensor([1, 2, 10, 500, 999])
    mean, v, log_v = d.q_posterior(x0, xt, tt)
    ref = var[tt - 1][:, None] * (
        np.sqrt(ab_prev[tt])[:, None] * x0.numpy() / (1 - ab_prev[tt])[:, None]
        + np.sqrt(alpha[tt])[:, None] * xt.numpy() / beta[tt][:, None]
    )
    np.testing.assert_allclose(mean.numpy(), ref, rtol=1e-9)
    np.testing.assert_allclose(log_v.exp().numpy()[:, 0], var[tt - 1], rtol=1e-9)


def test_parameterization_conversions_invert_each_other():
    torch.manual_seed(1)
    d = make(T=1000, schedule="cosine")
    x0, eps = torch.randn(64, 3, 4, 4, dtype=torch.float64), torch.randn(64, 3, 4, 4, dtype=torch.float64)
    t = torch.randint(0, 1000, (64,))
    xt = d.q_sample(x0, t, eps)
    v = d.v_target(x0, t, eps)
    coef = d.coefficients_at(t, xt)
    # the exact network output of each prediction type maps back to the true (x0, eps)
    for kind, out, atol_x0, atol_eps in [("eps", eps, 1e-8, 0), ("x0", x0, 0, 1e-6), ("v", v, 1e-10, 1e-10)]:
        x0_hat, eps_hat = x0_and_eps(kind, out, xt, coef)  # x0 -> eps divides by sqrt(1/ab - 1), small near t = 0
        torch.testing.assert_close(x0_hat, x0, rtol=0, atol=atol_x0)
        torch.testing.assert_close(eps_hat, eps, rtol=0, atol=atol_eps)
    with pytest.raises(GenbenchError, match="prediction must be"):
        x0_and_eps("score", eps, xt, coef)
    # v = alpha_t eps - sigma_t x0 with (alpha_t, sigma_t) = (sqrt(ab), sqrt(1-ab)) on the unit circle (Salimans & Ho)
    ab = d.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(v, ab.sqrt() * eps - (1 - ab).sqrt() * x0)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_min_snr_weight_equals_clipped_snr_times_x0_error(prediction):
    """Hang et al. 2023: the weighted loss of every parameterization equals min(SNR, gamma) ||x0 - x0_hat||^2."""
    torch.manual_seed(2)
    d = make(T=1000, schedule="linear", prediction=prediction, loss_weighting="min_snr", min_snr_gamma=5.0)
    x0, eps = torch.randn(256, 6, dtype=torch.float64), torch.randn(256, 6, dtype=torch.float64)
    t = torch.randint(0, 1000, (256,))
    xt = d.q_sample(x0, t, eps)
    out = torch.randn(256, 6, dtype=torch.float64)  # an arbitrary network output
    lhs = d.loss_weight(t).double() * ((d.training_target(x0, eps, t) - out) ** 2).sum(1)
    ab = torch.as_tensor(np_alphas_cumprod(1000, "linear"))[t]
    rhs = (ab / (1 - ab)).clamp(max=5.0) * ((x0 - d.predict_x0(out, xt, t)) ** 2).sum(1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-9)  # loss_weight is float32


@pytest.mark.parametrize("prediction,weighting", [("eps", "none"), ("x0", "none"), ("v", "none"), ("eps", "min_snr")])
def test_training_loss_expectation_under_the_oracle(prediction, weighting):
    """With the exact posterior-mean predictor, E[loss] = E_t mean_d w(t) Var(target | x_t), with
    Var(eps|x_t) = a s^2/V, Var(x0|x_t) = s^2 (1-a)/V, Var(v|x_t) = a + (1-a) s^2 - a (1-a) (1-s^2)^2 / V,
    V = a s^2 + 1 - a (Gaussian conditioning). Checked over 30 independent batches (SE from their spread).
    """
    T = 1000
    ab = np_alphas_cumprod(T, "linear")[:, None]
    d = make(T=T, schedule="linear", prediction=prediction, loss_weighting=weighting)
    V = ab * S**2 + 1 - ab
    cond_var = {
        "eps": ab * S**2 / V,
        "x0": S**2 * (1 - ab) / V,
        "v": ab + (1 - ab) * S**2 - ab * (1 - ab) * (1 - S**2) ** 2 / V,
    }[prediction]
    snr = ab / (1 - ab)
    w = np.minimum(snr, 5.0) / snr if weighting == "min_snr" else np.ones_like(snr)
    expected = (w * cond_var).mean()
    oracle = GaussianOracle(np_alphas_cumprod(T, "linear"), M, S, prediction)
    torch.manual_seed(3)
    losses = []
    for _ in range(30):
        x0 = torch.from_numpy(M + S * np.random.default_rng(len(losses)).standard_normal((4096, 4))).float()
        losses.append(d.training_loss(oracle, x0).item())
    se = np.std(losses, ddof=1) / np.sqrt(len(losses))
    assert abs(np.mean(losses) - expected) < 4.5 * se, (np.mean(losses), expected, se)
    # and a wrong predictor is clearly worse
    assert d.training_loss(lambda x, t: torch.zeros_like(x), x0).item() > expected * 1.2


def test_training_loss_draws_from_the_global_rng_or_the_generator():
    d = make(T=1000, schedule="linear")
    x0 = torch.rand(8, 1, 4, 4) * 2 - 1
    net = lambda x, t: 0.5 * x  # noqa: E731
    torch.manual_seed(7)
    a = d.training_loss(net, x0)
    b = d.training_loss(net, x0)
    torch.manual_seed(7)
    assert torch.equal(d.training_loss(net, x0), a) and not torch.equal(a, b)
    state = torch.get_rng_state()
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(d.training_loss(net, x0, g1), d.training_loss(net, x0, g2))
    assert torch.equal(torch.get_rng_state(), state)  # a generator leaves the global RNG alone


# ---------------------------------------------------------------------------------------------
# samplers with the oracle


def _sample(d, sampler, kwargs, prediction="eps", m=M, s=S, seed=0, n=N_SAMPLES):
    oracle = GaussianOracle(d.alphas_cumprod.numpy(), m, s, prediction)
    g = torch.Generator().manual_seed(seed)
    fn = ddpm_sample if sampler == "ddpm" else ddim_sample
    return fn(d, oracle, (n, len(m)), generator=g, clip_x0=None, progress=False, **kwargs)


SAMPLER_CASES = [
    ("ddpm", {"variance": "beta_tilde"}),
    ("ddpm", {"variance": "beta"}),
    ("ddim", {"steps": 50, "eta": 0.0}),
    ("ddim", {"steps": 100, "eta": 0.0, "spacing": "leading"}),
    ("ddim", {"steps": 50, "eta": 1.0, "spacing": "leading"}),
    ("ddim", {"steps": 100, "eta": 1.0}),
]


@pytest.mark.parametrize("sampler,kwargs", SAMPLER_CASES)
def test_oracle_sampler_output_matches_its_exact_distribution(sampler, kwargs):
    """THE ORACLE. With the exact denoiser for N(m, s^2) data each sampler is a linear-Gaussian chain,
    so its output is exactly N(mu, var) with (mu, var) from exact_*_moments (the papers' updates,
    re-implemented in numpy float64). 20k samples must match within 4.5 SE.

    (mu, var) is not exactly (m, s^2): ancestral sampling with beta~ (beta) under- (over-) disperses
    and DDIM's first-order steps shrink the variance (see test_oracle_sampler_error_is_discretization).
    """
    d = make(T=200, schedule="cosine")
    x = _sample(d, sampler, kwargs)
    ab = np_alphas_cumprod(200, "cosine")
    if sampler == "ddpm":
        mean, var = exact_ddpm_moments(ab, M, S, kwargs["variance"])
    else:
        tau = ddim_timesteps(200, kwargs["steps"], kwargs.get("spacing", "trailing")).numpy()
        mean, var = exact_ddim_moments(ab, tau, kwargs["eta"], M, S)
    assert_moments(x, mean, var)


def test_oracle_sampler_error_is_discretization():
    """The exact output moments approach (m, s^2) as steps grow, and Ho et al.'s two variance choices
    bracket the truth (beta~ is the lower, beta the upper bound on the reverse variance)."""
    ab = np_alphas_cumprod(1000, "linear")
    _, var_lo = exact_ddpm_moments(ab, M, S, "beta_tilde")
    _, var_hi = exact_ddpm_moments(ab, M[[0, 1, 3]], S[[0, 1, 3]], "beta")  # s = 1 is the equality case, below
    assert np.all(var_lo < S**2) and np.all(var_hi > S[[0, 1, 3]] ** 2)
    errors = []
    for steps in (50, 100, 1000):
        tau = ddim_timesteps(1000, steps).numpy()
        mean, var = exact_ddim_moments(ab, tau, 0.0, M, S)
        np.testing.assert_allclose(mean, M, atol=2e-3)  # only the N(0,1)-vs-q(x_T) prior mismatch
        errors.append(np.abs(var / S**2 - 1))
    assert np.all(errors[0] > errors[1]) and np.all(errors[1] > errors[2])
    assert np.all(errors[2][S >= 0.3] < 0.01)


def test_oracle_exact_cases_reproduce_the_data():
    """Two cases where a sampler is exact: sigma_t^2 = beta_t is the optimal reverse variance for
    N(m, 1) data (Ho et al. sec. 3.2), and DDIM is exact for a point mass (x0_hat is constant)."""
    d = make(T=200, schedule="cosine")
    m = np.array([0.4, -0.7])
    x = _sample(d, "ddpm", {"variance": "beta"}, m=m, s=np.ones(2))
    assert_moments(x, m, np.ones(2))
    for eta in (0.0, 1.0):
        x = _sample(d, "ddim", {"steps": 20, "eta": eta}, m=m, s=np.zeros(2))
        torch.testing.assert_close(x, torch.tensor(m, dtype=torch.float32).expand_as(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_parameterizations_give_the_same_samples(prediction):
    """The x0 and v oracles are the eps oracle re-expressed, so with the same noise the samples agree."""
    d_eps, d_other = make(T=200), make(T=200, prediction=prediction)
    for sampler, kwargs in [("ddpm", {"variance": "beta_tilde"}), ("ddim", {"steps": 50, "eta": 1.0})]:
        a = _sample(d_eps, sampler, kwargs, seed=5, n=2000)
        b = _sample(d_other, sampler, kwargs, prediction=prediction, seed=5, n=2000)
        torch.testing.assert_close(a, b, rtol=0, atol=2e-4)


def test_ddim_eta0_is_deterministic_given_x_T():
    d = make(T=200)
    oracle = GaussianOracle(d.alphas_cumprod.numpy(), M, S)
    x_T = torch.randn(100, 4)
    kw = dict(shape=(100, 4), steps=25, clip_x0=None, progress=False, x_T=x_T)
    a = ddim_sample(d, oracle, generator=torch.Generator().manual_seed(1), **kw)
    b = ddim_sample(d, oracle, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(a, b)
    c = ddim_sample(d, oracle, eta=1.0, generator=torch.Generator().manual_seed(2), **kw)
    assert not torch.allclose(a, c, atol=1e-3)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_clipping_bounds_the_output(sampler):
    """Data far outside [-1, 1]: clipped x0_hat keeps the final sample (= x0_hat) in range; None does not."""
    d = make(T=200)
    oracle = GaussianOracle(d.alphas_cumprod.numpy(), [3.0], [0.5])
    fn = ddpm_sample if sampler == "ddpm" else ddim_sample
    kw = dict(shape=(500, 1), progress=False)
    clipped = fn(d, oracle, generator=torch.Generator().manual_seed(0), **kw)
    assert clipped.min() >= -1 and clipped.max() <= 1
    free = fn(d, oracle, generator=torch.Generator().manual_seed(0), clip_x0=None, **kw)
    assert abs(free.mean().item() - 3.0) < 0.1
    narrow = fn(d, oracle, generator=torch.Generator().manual_seed(0), clip_x0=(-0.5, 0.25), **kw)
    assert narrow.min() >= -0.5 and narrow.max() <= 0.25


def test_sampler_argument_errors():
    d = make(T=200)
    net = lambda x, t: x  # noqa: E731
    with pytest.raises(GenbenchError, match="DDIM steps must be in"):
        ddim_sample(d, net, (2, 2), steps=201, progress=False)
    with pytest.raises(GenbenchError, match="eta must be >= 0"):
        ddim_sample(d, net, (2, 2), eta=-0.1, progress=False)
    with pytest.raises(GenbenchError, match="spacing must be"):
        ddim_sample(d, net, (2, 2), spacing="linspace", progress=False)
    with pytest.raises(GenbenchError, match="reverse variance must be"):
        ddpm_sample(d, net, (2, 2), variance="learned", progress=False)


def test_ddim_timesteps_spacing():
    assert ddim_timesteps(1000, 50)[:2].tolist() == [999, 979] and ddim_timesteps(1000, 50)[-1] == 19
    assert ddim_timesteps(1000, 50, "leading")[:2].tolist() == [980, 960] and ddim_timesteps(1000, 50, "leading")[-1] == 0
    assert ddim_timesteps(1000, 3).tolist() == [999, 666, 332]
    assert ddim_timesteps(200, 200).tolist() == list(range(199, -1, -1))


# ---------------------------------------------------------------------------------------------
# variational bound


def discretized_data(n, rng):
    """8-bit quantized N(M, S^2) data (S scaled down to stay mostly inside [-1, 1]) mapped to [-1, 1]."""
    s = np.array([0.3, 0.2, 0.4, 0.25])
    x = M * 0.6 + s * rng.standard_normal((n, 4))
    levels = np.clip(np.round((x + 1) * 127.5), 0, 255)
    return torch.from_numpy(levels / 127.5 - 1), M * 0.6, s


def test_prior_kl_matches_torch_distributions():
    d = make(T=1000, schedule="linear")
    x0 = torch.rand(5, 3, 2, 2, dtype=torch.float64) * 2 - 1
    ab = torch.as_tensor(np_alphas_cumprod(1000, "linear"))[-1]
    q = torch.distributions.Normal(ab.sqrt() * x0, (1 - ab).sqrt())
    ref = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(d.prior_kl(x0), ref, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_decoder_term_is_a_distribution_over_256_levels(variance):
    """L_0 for every 8-bit level with a network that predicts a fixed x0_hat = c (so the decoder mean is c
    whatever x_1 is): exp(-L_0) over the levels sums to 1 and matches scipy's normal-CDF bin masses on
    [-1, 1] (bin half-width 1/255, scale sigma_1 = sqrt(beta_1) or sqrt(beta~_2), edge bins open)."""
    T = 1000
    d = make(T=T, schedule="linear", prediction="x0")
    ab = np_alphas_cumprod(T, "linear")
    scale = math.sqrt(1 - ab[0] if variance == "beta" else (1 - ab[1] / ab[0]) * (1 - ab[0]) / (1 - ab[1]))
    levels = (torch.arange(256, dtype=torch.float64) / 127.5 - 1).view(256, 1)
    for c in (0.0, 0.3, -0.99, 1.0, 1.4):
        net = lambda x, t: torch.full_like(x, c)  # noqa: E731
        nll = d.vlb_terms(net, levels, torch.zeros(256, dtype=torch.long), variance=variance)
        assert torch.isfinite(nll).all()
        torch.testing.assert_close(torch.exp(-nll).sum(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-9)
        lo = np.r_[-np.inf, levels.numpy()[1:, 0] - 1 / 255]
        hi = np.r_[levels.numpy()[:-1, 0] + 1 / 255, np.inf]
        # above the mean, difference the survival functions (1 - cdf cancels there)
        with np.errstate(divide="ignore"):  # masses that underflow to 0 are masked out below
            ref = -np.log(np.where(lo > c, stats.norm.sf(lo, c, scale) - stats.norm.sf(hi, c, scale),
                                   stats.norm.cdf(hi, c, scale) - stats.norm.cdf(lo, c, scale)))
        ok = np.isfinite(ref) & (ref < 600)
        np.testing.assert_allclose(nll.numpy()[ok], ref[ok], rtol=1e-6)
        assert ok.sum() > (20 if abs(c) <= 1 else 0)


def _closed_form_expected_kl(ab, x0, m, s, t, variance):
    """E_eps[L_{t-1} | x0] for the oracle (0-based t >= 1), per dimension.

    mu_q - mu_p = c1 (x0 - x0_hat) with x0_hat = m + k (x_t - sqrt(a) m), x_t = sqrt(a) x0 + sqrt(1-a) eps, so
    E (x0 - x0_hat)^2 = (x0 - m)^2 (1 - k sqrt(a))^2 + k^2 (1 - a); KL(N(mu_q, bt) || N(mu_p, sp2)) =
    0.5 (log(sp2/bt) + bt/sp2 - 1 + E(mu_q - mu_p)^2 / sp2).
    """
    a, a_prev = ab[t], ab[t - 1]
    beta = 1 - a / a_prev
    bt = beta * (1 - a_prev) / (1 - a)
    sp2 = bt if variance == "beta_tilde" else beta
    c1 = np.sqrt(a_prev) * beta / (1 - a)
    k, _ = _oracle_step(a, m, s)
    sq = (x0 - m) ** 2 * (1 - k * np.sqrt(a)) ** 2 + k**2 * (1 - a)
    return 0.5 * (np.log(sp2 / bt) + bt / sp2 - 1 + c1**2 * sq / sp2)


def _quadrature_expected_decoder_nll(ab, x0, m, s, variance, nodes=80):
    """E_eps[-log p(x0 | x_1)] by Gauss-Hermite quadrature over eps, scipy normal CDF, per dimension.

    Decoder mean = x0_hat(x_1) (the posterior mean at t=1 is x0_hat itself); its scale is sqrt(beta~_2)
    ("beta_tilde", beta~_1 = 0 is clipped) or sqrt(beta_1) ("beta").
    """
    z, w = hermegauss(nodes)
    w = w / w.sum()
    a = ab[0]
    bt2 = (1 - ab[1] / ab[0]) * (1 - ab[0]) / (1 - ab[1])
    scale = np.sqrt(bt2 if variance == "beta_tilde" else 1 - a)
    x0 = x0[..., None]  # (..., D, nodes)
    x1 = np.sqrt(a) * x0 + np.sqrt(1 - a) * z
    k, _ = _oracle_step(a, m[:, None], s[:, None])
    mean = m[:, None] + k * (x1 - np.sqrt(a) * m[:, None])
    lo = np.where(x0 < -1 + 1e-9, -np.inf, (x0 - 1 / 255 - mean) / scale)
    hi = np.where(x0 > 1 - 1e-9, np.inf, (x0 + 1 / 255 - mean) / scale)
    mass = np.where(lo > 0, stats.norm.sf(lo) - stats.norm.sf(hi), stats.norm.cdf(hi) - stats.norm.cdf(lo))
    return -(np.log(mass) * w).sum(-1)


@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_vlb_kl_terms_match_closed_form_expectation(variance):
    torch.manual_seed(4)
    T = 1000
    d = make(T=T, schedule="linear")
    ab = np_alphas_cumprod(T, "linear")
    x0, m, s = discretized_data(1, np.random.default_rng(1))
    oracle = GaussianOracle(ab, m, s)
    n = 20_000
    for t_val in (1, 5, 50, 300, 800, 999):
        terms = d.vlb_terms(oracle, x0.expand(n, 4), torch.full((n,), t_val), variance=variance).numpy()
        ref = _closed_form_expected_kl(ab, x0.numpy()[0], m, s, t_val, variance).sum()
        assert abs(terms.mean() - ref) < 4.5 * terms.std() / np.sqrt(n) + 1e-12, (t_val, terms.mean(), ref)


def test_vlb_decoder_term_matches_scipy_for_fixed_noise():
    T = 1000
    d = make(T=T, schedule="linear")
    ab = np_alphas_cumprod(T, "linear")
    x0, m, s = discretized_data(64, np.random.default_rng(2))
    x0[0, 0], x0[1, 1] = -1.0, 1.0  # the open-ended edge bins
    oracle = GaussianOracle(ab, m, s)
    eps = torch.randn(64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = d.vlb_terms(oracle, x0, torch.zeros(64, dtype=torch.long), eps, variance="beta_tilde").numpy()
    a = ab[0]
    x1 = np.sqrt(a) * x0.numpy() + np.sqrt(1 - a) * eps.numpy()
    k, _ = _oracle_step(a, m, s)
    mean = m + k * (x1 - np.sqrt(a) * m)
    scale = np.sqrt((1 - ab[1] / ab[0]) * (1 - ab[0]) / (1 - ab[1]))
    lo = np.where(x0.numpy() == -1, -np.inf, x0.numpy() - 1 / 255)
    hi = np.where(x0.numpy() == 1, np.inf, x0.numpy() + 1 / 255)
    ref = -np.log(stats.norm.cdf(hi, mean, scale) - stats.norm.cdf(lo, mean, scale)).sum(1)
    np.testing.assert_allclose(got, ref, rtol=1e-8)


def _expected_bound_per_dim(ab, x, m, s, variance):
    """E_eps[bound | x0] per dimension, nats: closed-form L_T + closed-form KL terms + quadrature L_0."""
    prior = 0.5 * (ab[-1] * x**2 + (1 - ab[-1]) - 1 - np.log(1 - ab[-1]))
    kl = sum(_closed_form_expected_kl(ab, x, m, s, t, variance) for t in range(1, len(ab)))
    return prior + kl + _quadrature_expected_decoder_nll(ab, x, m, s, variance)


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_bits_per_dim_against_exact_expected_bound(variance):
    """Full-T and stratified estimates of the bound vs an independently computed expectation.

    Reference per image: L_T in closed form (Gaussian KL) + the 999 KL terms' closed-form expectations
    over eps + E[L_0] by Gauss-Hermite quadrature with scipy's normal CDF, float64 numpy; / (D ln 2).
    The estimators' per-image errors are zero-mean noise, so their mean over 256 images is within
    4.5 SE (SE from the spread of the per-image differences).
    """
    T, n, D = 1000, 256, 4
    d = make(T=T, schedule="linear")
    ab = np_alphas_cumprod(T, "linear")
    x0, m, s = discretized_data(n, np.random.default_rng(3))
    oracle = GaussianOracle(ab, m, s)
    ref = _expected_bound_per_dim(ab, x0.numpy(), m, s, variance).sum(1) / (D * np.log(2))
    full = d.bits_per_dim(oracle, x0, generator=torch.Generator().manual_seed(0), variance=variance)
    ab_T = ab[-1]
    prior = (0.5 * (ab_T * x0.numpy() ** 2 + (1 - ab_T) - 1 - np.log(1 - ab_T))).sum(1) / (D * np.log(2))
    np.testing.assert_allclose(full["prior_bpd"].numpy(), prior, rtol=1e-7)
    subset = d.bits_per_dim(oracle, x0, num_timesteps=25, generator=torch.Generator().manual_seed(1), variance=variance)
    for est in (full, subset):
        diff = est["bpd"].numpy() - ref
        assert abs(diff.mean()) < 4.5 * diff.std(ddof=1) / np.sqrt(n), (diff.mean(), diff.std())
        torch.testing.assert_close(est["prior_bpd"] + est["diffusion_bpd"] + est["decoder_bpd"], est["bpd"])


def test_expected_bound_is_above_the_data_entropy():
    """The bound is a cross-entropy, so under the data distribution it is >= the entropy of the quantized
    Gaussian data (computed exactly from the 256 level probabilities). Both are separable over
    dimensions, so E_data[bound] is an exact sum over the levels, no sampling. With the exact denoiser
    sigma^2 = beta is tight (< 0.1 bit/dim above the entropy) and beta~ is ~0.8 bit/dim looser, from
    the first steps (known for fixed variances: Nichol & Dhariwal 2021, fig. 2)."""
    T = 1000
    ab = np_alphas_cumprod(T, "linear")
    _, m, s = discretized_data(1, np.random.default_rng(0))
    levels = np.arange(256) / 127.5 - 1
    edges = (np.arange(257) - 0.5) / 127.5 - 1
    edges[0], edges[-1] = -np.inf, np.inf
    p = np.diff(stats.norm.cdf(edges[:, None], m, s), axis=0)  # (256 levels, D)
    entropy = -(p * np.log2(np.where(p > 0, p, 1))).sum(0).mean()
    bound = {
        v: (p * _expected_bound_per_dim(ab, np.repeat(levels[:, None], 4, 1), m, s, v)).sum(0).mean() / np.log(2)
        for v in ("beta", "beta_tilde")
    }
    assert entropy < bound["beta"] < entropy + 0.1
    assert entropy + 0.5 < bound["beta_tilde"] < entropy + 1.0


def test_bits_per_dim_argument_errors():
    d = make(T=200)
    net = lambda x, t: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(GenbenchError, match=r"scaled to \[-1, 1\]"):
        d.bits_per_dim(net, torch.full((2, 3), 1.5))
    with pytest.raises(GenbenchError, match="num_timesteps must be in"):
        d.bits_per_dim(net, torch.zeros(2, 3), num_timesteps=200)
