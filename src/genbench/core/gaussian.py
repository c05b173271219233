"""Gaussian densities, reparameterized sampling, KL divergences and the ELBO, in one place.

Every model in genbench that speaks about probabilities (the VAE's prior, posterior and
decoders, the IWAE bound, the diffusion process' noise) takes its formulas from here. Each
function's docstring gives the formula it implements; the derivations are in docs/elbo.md.

Conventions
- Variances come as ``log_var = log sigma^2``, the way a VAE encoder outputs them: any real
  number is a valid log-variance, so the network needs no positivity constraint.
- Full covariances come either as ``cov`` (checked to be symmetric positive definite, with a
  GenbenchError naming which of the two fails) or as ``scale_tril``, a lower-triangular L with
  cov = L L^T (entries above the diagonal are ignored).
- Batch shapes broadcast like torch's. Functions that return "one number per example" keep
  dim 0 as the batch and sum over all other dims, returning shape (B,).

References
- Kingma & Welling 2014, "Auto-Encoding Variational Bayes" (reparameterization, eq. 10 KL).
- Burda, Grosse & Salakhutdinov 2016, "Importance Weighted Autoencoders" (eq. 8).
- Tipping & Bishop 1999, "Probabilistic Principal Component Analysis".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import reduce
from torch import Tensor

from genbench.errors import GenbenchError

LOG_2PI = math.log(2.0 * math.pi)

# --------------------------------------------------------------------------------------
# tiny helpers


def sum_except_batch(x: Tensor) -> Tensor:
    """Sum over every dim but the first: (B, ...) -> (B,). A (B,) tensor is returned as is."""
    if x.ndim == 0:
        raise GenbenchError("sum_except_batch needs a tensor with a batch dim, got a scalar")
    return reduce(x, "b ... -> b", "sum")


def _check_last_dim(name: str, t: Tensor, dim: int) -> None:
    if t.ndim == 0 or t.shape[-1] != dim:
        raise GenbenchError(f"{name} must have last dim {dim}, got shape {tuple(t.shape)}")


def _check_square(name: str, m: Tensor) -> int:
    if m.ndim < 2 or m.shape[-1] != m.shape[-2]:
        raise GenbenchError(f"{name} must be a (..., D, D) matrix, got shape {tuple(m.shape)}")
    return m.shape[-1]


def _half_log_det(scale_tril: Tensor) -> Tensor:
    """1/2 log det(L L^T) = sum_i log|L_ii| for triangular L."""
    return torch.diagonal(scale_tril, dim1=-2, dim2=-1).abs().log().sum(-1)


def cholesky_spd(matrix: Tensor, name: str = "covariance") -> Tensor:
    """Lower Cholesky factor L of a symmetric positive definite matrix, matrix = L L^T.

    Uses torch.linalg.cholesky_ex so a failure becomes a clear GenbenchError instead of a
    LinAlgError: the message says whether ``matrix`` is not finite, not symmetric (beyond
    rounding: max |A - A^T| > 1000 eps max |A|) or not positive definite.
    """
    _check_square(name, matrix)
    if not torch.isfinite(matrix).all():
        raise GenbenchError(f"{name} contains NaN or inf")
    # products like A A^T are symmetric only up to rounding: judge each matrix relative to its size
    asym = (matrix - matrix.mT).abs().amax((-2, -1))
    tol = 1000 * torch.finfo(matrix.dtype).eps * matrix.abs().amax((-2, -1))
    if (asym > tol).any():
        worst = asym.max().item()
        raise GenbenchError(f"{name} is not symmetric (max |A - A^T| = {worst:.3g})")
    L, info = torch.linalg.cholesky_ex(matrix)
    if (info > 0).any():
        minor = int(info[info > 0].flatten()[0])
        raise GenbenchError(
            f"{name} is not positive definite (Cholesky fails at leading minor of order {minor})"
        )
    return L


# --------------------------------------------------------------------------------------
# densities


def normal_log_prob(x: Tensor, mean: Tensor | float, log_var: Tensor | float) -> Tensor:
    """Elementwise log N(x; mu, sigma^2) = -1/2 [log(2 pi) + log sigma^2 + (x - mu)^2 / sigma^2]."""
    log_var = torch.as_tensor(log_var, dtype=x.dtype, device=x.device)
    return -0.5 * (LOG_2PI + log_var + (x - mean) ** 2 * torch.exp(-log_var))


def normal_log_prob_std(x: Tensor, mean: Tensor | float, std: Tensor | float) -> Tensor:
    """Elementwise log N(x; mu, sigma^2) with sigma = std > 0:
    -1/2 log(2 pi) - log sigma - (x - mu)^2 / (2 sigma^2)."""
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    return -0.5 * LOG_2PI - torch.log(std) - 0.5 * ((x - mean) / std) ** 2


def normal_pdf(x: Tensor, mean: Tensor | float, log_var: Tensor | float) -> Tensor:
    """Elementwise density N(x; mu, sigma^2) = exp(-(x - mu)^2 / (2 sigma^2)) / sqrt(2 pi sigma^2)."""
    return torch.exp(normal_log_prob(x, mean, log_var))


def standard_normal_log_prob(x: Tensor) -> Tensor:
    """Elementwise log N(x; 0, 1) = -1/2 [log(2 pi) + x^2]."""
    return -0.5 * (LOG_2PI + x**2)


def diag_normal_log_prob(
    x: Tensor, mean: Tensor | float, log_var: Tensor | float, event_dims: int = 1
) -> Tensor:
    """log N(x; mu, diag(sigma^2)) of an independent normal whose event is the last
    ``event_dims`` dims: sum over those dims of the univariate log-density,
    -1/2 sum_i [log(2 pi) + log sigma_i^2 + (x_i - mu_i)^2 / sigma_i^2].

    Like torch.distributions.Independent(Normal(...), event_dims); returns the batch shape.
    """
    lp = normal_log_prob(x, mean, log_var)
    if not 0 <= event_dims <= lp.ndim:
        raise GenbenchError(f"event_dims must be in [0, {lp.ndim}], got {event_dims}")
    return lp.sum(dim=tuple(range(-event_dims, 0))) if event_dims else lp


def mvn_log_prob_cholesky(x: Tensor, mean: Tensor, scale_tril: Tensor) -> Tensor:
    """log N(x; mu, L L^T) for lower-triangular L (only its lower triangle is read):

        -1/2 [D log(2 pi) + 2 sum_i log|L_ii| + ||L^{-1} (x - mu)||^2].

    x (..., D), mean (..., D), scale_tril (..., D, D) broadcast; returns the batch shape.
    """
    D = _check_square("scale_tril", scale_tril)
    _check_last_dim("x", x, D)
    _check_last_dim("mean", mean, D)
    diff = (x - mean).unsqueeze(-1)
    # solve_triangular broadcasts batch dims; L^{-1}(x - mu) is the whitened residual
    white = torch.linalg.solve_triangular(scale_tril, diff, upper=False).squeeze(-1)
    return -0.5 * (D * LOG_2PI + (white**2).sum(-1)) - _half_log_det(scale_tril)


def mvn_log_prob(x: Tensor, mean: Tensor, cov: Tensor) -> Tensor:
    """log N(x; mu, Sigma) for a symmetric positive definite Sigma, through its Cholesky
    factor (see mvn_log_prob_cholesky): -1/2 [D log(2 pi) + log det Sigma
    + (x - mu)^T Sigma^{-1} (x - mu)]. Raises GenbenchError if Sigma is not SPD."""
    return mvn_log_prob_cholesky(x, mean, cholesky_spd(cov, "cov"))


# --------------------------------------------------------------------------------------
# reparameterized sampling (Kingma & Welling 2014, sec. 2.4)


def reparameterize(
    mean: Tensor,
    log_var: Tensor,
    generator: torch.Generator | None = None,
    eps: Tensor | None = None,
) -> Tensor:
    """z = mu + sigma * eps with sigma = exp(log_var / 2), eps ~ N(0, I).

    The noise is drawn outside the graph, so gradients flow to mean and log_var. Pass ``eps``
    to fix the noise (tests, common random numbers); otherwise it is drawn with ``generator``.
    """
    if eps is None:
        shape = torch.broadcast_shapes(mean.shape, log_var.shape)
        eps = torch.randn(shape, generator=generator, dtype=mean.dtype, device=mean.device)
    return mean + torch.exp(0.5 * log_var) * eps


def mvn_rsample(
    mean: Tensor,
    scale_tril: Tensor,
    sample_shape: int | Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> Tensor:
    """z = mu + L eps, eps ~ N(0, I_D), so z ~ N(mu, L L^T); differentiable in mu and L.

    Returns shape sample_shape + broadcast(batch of mean, batch of scale_tril) + (D,).
    Only the lower triangle of scale_tril is read, as in mvn_log_prob_cholesky.
    """
    D = _check_square("scale_tril", scale_tril)
    _check_last_dim("mean", mean, D)
    sample_shape = (sample_shape,) if isinstance(sample_shape, int) else tuple(sample_shape)
    batch = torch.broadcast_shapes(mean.shape[:-1], scale_tril.shape[:-2])
    eps = torch.randn(
        sample_shape + batch + (D,), generator=generator, dtype=mean.dtype, device=mean.device
    )
    return mean + (scale_tril.tril() @ eps.unsqueeze(-1)).squeeze(-1)


# --------------------------------------------------------------------------------------
# KL divergences


def kl_to_standard_normal(mean: Tensor, log_var: Tensor) -> Tensor:
    """KL(N(mu, diag sigma^2) || N(0, I)) = -1/2 sum (1 + log sigma^2 - mu^2 - sigma^2)
    (Kingma & Welling 2014, appendix B). Dim 0 is the batch, the sum runs over all other
    dims: (B, ...) -> (B,)."""
    return sum_except_batch(-0.5 * (1 + log_var - mean**2 - torch.exp(log_var)))


def kl_diag_normals(
    mean_q: Tensor, log_var_q: Tensor, mean_p: Tensor | float, log_var_p: Tensor | float
) -> Tensor:
    """KL(q || p) between diagonal normals q = N(mu_q, diag s_q^2), p = N(mu_p, diag s_p^2):

        1/2 sum [log s_p^2 - log s_q^2 + (s_q^2 + (mu_q - mu_p)^2) / s_p^2 - 1].

    p's parameters broadcast against q's (e.g. a scalar prior). Dim 0 is the batch, the sum
    runs over all other dims: (B, ...) -> (B,)."""
    log_var_p = torch.as_tensor(log_var_p, dtype=mean_q.dtype, device=mean_q.device)
    ratio = (torch.exp(log_var_q) + (mean_q - mean_p) ** 2) * torch.exp(-log_var_p)
    kl = 0.5 * (log_var_p - log_var_q + ratio - 1)
    return sum_except_batch(kl)


def kl_mvn(mean_q: Tensor, cov_q: Tensor, mean_p: Tensor, cov_p: Tensor) -> Tensor:
    """KL(N(mu_q, S_q) || N(mu_p, S_p)) in closed form:

        1/2 [tr(S_p^{-1} S_q) + (mu_p - mu_q)^T S_p^{-1} (mu_p - mu_q) - D
             + log det S_p - log det S_q].

    With S = L L^T: tr(S_p^{-1} S_q) = ||L_p^{-1} L_q||_F^2. Inputs broadcast; returns the batch
    shape. Raises GenbenchError if a covariance is not SPD."""
    Lq, Lp = cholesky_spd(cov_q, "cov_q"), cholesky_spd(cov_p, "cov_p")
    D = Lq.shape[-1]
    if Lp.shape[-1] != D:
        raise GenbenchError(f"cov_q is {D}x{D} but cov_p is {Lp.shape[-1]}x{Lp.shape[-1]}")
    _check_last_dim("mean_q", mean_q, D)
    _check_last_dim("mean_p", mean_p, D)
    trace = torch.linalg.solve_triangular(Lp, Lq, upper=False).pow(2).sum((-2, -1))
    white = torch.linalg.solve_triangular(Lp, (mean_p - mean_q).unsqueeze(-1), upper=False)
    maha = white.squeeze(-1).pow(2).sum(-1)
    return 0.5 * (trace + maha - D) + _half_log_det(Lp) - _half_log_det(Lq)


# --------------------------------------------------------------------------------------
# decoder likelihoods and bounds


def bernoulli_log_prob(x: Tensor, logits: Tensor) -> Tensor:
    """log Bernoulli(x; sigmoid(l)) = x log sigmoid(l) + (1 - x) log(1 - sigmoid(l)), summed
    over non-batch dims: (B, ...) -> (B,). Computed as -BCE-with-logits, which stays finite
    for any logit. x may be fractional in [0, 1] (pixel intensities), as is usual for
    Bernoulli pixel decoders."""
    x, logits = torch.broadcast_tensors(x, logits)
    return sum_except_batch(-F.binary_cross_entropy_with_logits(logits, x, reduction="none"))


def gaussian_log_likelihood(x: Tensor, mean: Tensor, log_var: Tensor | float) -> Tensor:
    """log N(x; mu, diag sigma^2) of a Gaussian decoder, summed over non-batch dims:
    -1/2 sum_i [log(2 pi) + log sigma_i^2 + (x_i - mu_i)^2 / sigma_i^2], (B, ...) -> (B,).
    log_var broadcasts (a scalar gives a shared, e.g. learned, noise level)."""
    return sum_except_batch(normal_log_prob(x, mean, log_var))


def iwae_log_likelihood(log_p_xz: Tensor, log_q_zx: Tensor) -> Tensor:
    """Importance-weighted bound (Burda et al. 2016, eq. 8) from K samples z_k ~ q(z|x):

        L_K = log (1/K) sum_k p(x, z_k) / q(z_k|x)
            = logsumexp_k(log p(x, z_k) - log q(z_k|x)) - log K.

    Inputs have shape (K, B) (or (K, ...)); returns (B,). L_1 is the one-sample ELBO estimate,
    E[L_K] increases with K and tends to log p(x)."""
    if log_p_xz.ndim == 0 or log_p_xz.shape != log_q_zx.shape:
        raise GenbenchError(
            "log_p_xz and log_q_zx must both be (K, B), "
            f"got {tuple(log_p_xz.shape)} and {tuple(log_q_zx.shape)}"
        )
    K = log_p_xz.shape[0]
    return torch.logsumexp(log_p_xz - log_q_zx, dim=0) - math.log(K)


def nats_to_bits_per_dim(nats: Tensor | float, num_dims: int) -> Tensor | float:
    """bits/dim = nats / (D ln 2), for a negative log-likelihood (in nats) of D-dim data.

    A density over pixels scaled to [0, 1] is reported as is. It differs from the usual 8-bit
    bits/dim (a density over [0, 256)) by the change of variables, log2 256 = 8 bits/dim, so
    compare such numbers only with each other."""
    if num_dims <= 0:
        raise GenbenchError(f"num_dims must be positive, got {num_dims}")
    return nats / (num_dims * math.log(2.0))


def discretized_gaussian_log_likelihood(
    x: Tensor, mean: Tensor, log_scale: Tensor | float, num_bins: int = 256
) -> Tensor:
    """log P(x) of pixels quantised to ``num_bins`` levels in [0, 1] under a Gaussian N(mu, s^2)
    integrated over each pixel's bin (Ho et al. 2020 sec. 3.3; Kingma et al. 2016 use the logistic):

        P(x = k/(n-1)) = Phi((k + 1/2)/(n-1) - mu)/s) - Phi((k - 1/2)/(n-1) - mu)/s),

    with the first and last bins extended to -inf and +inf, so the masses of the n levels sum to
    1: a proper probability mass, which makes bits/dim of 8-bit images comparable across models.
    x is rounded to the nearest level. Summed over non-batch dims: (B, ...) -> (B,).

    The difference of CDFs is taken on the side of the mean where it does not cancel
    (Phi(b) - Phi(a) = Phi(-a) - Phi(-b)), and in log space via log_ndtr; when even that
    underflows the bin mass is approximated by density * bin width."""
    n = num_bins - 1
    x, mean = torch.broadcast_tensors(x, mean)
    log_scale = torch.as_tensor(log_scale, dtype=mean.dtype, device=mean.device).expand_as(mean)
    k = torch.round(x.clamp(0, 1) * n)
    inv_s = torch.exp(-log_scale)
    lo = ((k - 0.5) / n - mean) * inv_s
    hi = ((k + 0.5) / n - mean) * inv_s
    lo = torch.where(k <= 0, torch.full_like(lo, -math.inf), lo)
    hi = torch.where(k >= n, torch.full_like(hi, math.inf), hi)
    # flip to the lower tail when the bin lies above the mean, where Phi(b) - Phi(a) cancels
    flip = lo > 0
    a = torch.where(flip, -hi, lo)
    b = torch.where(flip, -lo, hi)
    log_b = torch.special.log_ndtr(b)
    log_a = torch.special.log_ndtr(a)
    # log(Phi(b) - Phi(a)) = log Phi(b) + log(1 - exp(log Phi(a) - log Phi(b))); expm1 keeps narrow bins exact
    log_mass = log_b + torch.log(-torch.expm1(log_a - log_b))
    # a bin so narrow against s that the two CDFs coincide in floating point: density * bin width
    centre = (k / n - mean) * inv_s
    approx = -0.5 * (LOG_2PI + centre**2) - log_scale - math.log(n)
    log_mass = torch.where(torch.isfinite(log_mass), log_mass, approx)
    return sum_except_batch(log_mass)


# --------------------------------------------------------------------------------------
# probabilistic PCA (Tipping & Bishop 1999): p(z) = N(0, I_M), p(x|z) = N(W z + b, s^2 I_D)
# The one latent-variable model whose evidence and posterior are exact, so it checks the
# ELBO identity log p(x) = ELBO(q) + KL(q || p(z|x)) to rounding.


def _ppca_checks(x: Tensor, W: Tensor, b: Tensor, noise_var: Tensor | float) -> Tensor:
    if W.ndim != 2:
        raise GenbenchError(f"W must be a (D, M) matrix, got shape {tuple(W.shape)}")
    _check_last_dim("x", x, W.shape[0])
    _check_last_dim("b", b, W.shape[0])
    noise_var = torch.as_tensor(noise_var, dtype=x.dtype, device=x.device)
    if noise_var.ndim != 0 or noise_var <= 0:
        raise GenbenchError(f"noise_var must be a positive scalar, got {noise_var}")
    return noise_var


def ppca_log_marginal(x: Tensor, W: Tensor, b: Tensor, noise_var: Tensor | float) -> Tensor:
    """Exact evidence of pPCA: x ~ N(b, W W^T + s^2 I_D), so
    log p(x) = log N(x; b, W W^T + s^2 I) (Tipping & Bishop 1999). x (..., D)."""
    s2 = _ppca_checks(x, W, b, noise_var)
    cov = W @ W.mT + s2 * torch.eye(W.shape[0], dtype=W.dtype, device=W.device)
    return mvn_log_prob(x, b, cov)


def ppca_posterior(
    x: Tensor, W: Tensor, b: Tensor, noise_var: Tensor | float
) -> tuple[Tensor, Tensor]:
    """Exact posterior p(z|x) = N(m, S) of pPCA (Tipping & Bishop 1999):
    with M = W^T W + s^2 I_M, m = M^{-1} W^T (x - b) and S = s^2 M^{-1}.

    x (..., D) -> mean (..., M) and cov (M, M) (the same for every x)."""
    s2 = _ppca_checks(x, W, b, noise_var)
    eye = torch.eye(W.shape[1], dtype=W.dtype, device=W.device)
    L = cholesky_spd(W.mT @ W + s2 * eye, "W^T W + s^2 I")
    mean = torch.cholesky_solve(((x - b) @ W).unsqueeze(-1), L).squeeze(-1)
    cov = s2 * torch.cholesky_inverse(L)
    return mean, cov


def elbo_gaussian_q(
    x: Tensor, W: Tensor, b: Tensor, noise_var: Tensor | float, q_mean: Tensor, q_cov: Tensor
) -> Tensor:
    """ELBO(q) = E_q[log p(x|z)] - KL(q || p(z)) of pPCA for a Gaussian q(z) = N(m, S),
    in closed form (Kingma & Welling 2014, eq. 3):

        E_q[log p(x|z)] = -1/2 [D log(2 pi s^2) + (||x - b - W m||^2 + tr(W S W^T)) / s^2]
        KL(q || N(0, I)) = 1/2 [tr S + m^T m - M - log det S]   (kl_mvn)

    x (..., D), q_mean (..., M), q_cov (..., M, M) broadcast; returns the batch shape."""
    s2 = _ppca_checks(x, W, b, noise_var)
    D, M = W.shape
    resid = x - b - q_mean @ W.mT
    trace = ((W @ q_cov) * W).sum((-2, -1))  # tr(W S W^T) = sum_ij (W S)_ij W_ij
    expected_ll = -0.5 * (D * torch.log(2 * math.pi * s2) + (resid.pow(2).sum(-1) + trace) / s2)
    zeros = torch.zeros(M, dtype=x.dtype, device=x.device)
    return expected_ll - kl_mvn(q_mean, q_cov, zeros, torch.eye(M, dtype=x.dtype, device=x.device))
