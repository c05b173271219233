"""Gaussian diffusion: noise schedules, the forward process, training targets and the variational bound.

The scheduler side of DDPM (Ho et al. 2020), kept apart from any network (diffusers-style): every
function takes ``model_fn(x_t, t) -> prediction`` and tensors of any shape ``(B, ...)``, so the same
object drives pixel-space DDPM and latent diffusion. The samplers (DDPM ancestral, DDIM) are small
loops over these tables in genbench.core.samplers; every one of them, the bound and the training
loss read a network output through the one conversion ``x0_and_eps``.

Conventions
-----------
* Time index ``t`` is 0-based: ``t = 0 .. T-1`` here is the paper's ``t = 1 .. T``. Hence
  ``alphas_cumprod[t]`` is the paper's ``alpha_bar_{t+1}`` and ``alphas_cumprod_prev[0] = 1``
  (``alpha_bar_0 = 1``: x_0 is the data).
* ``alpha_t = 1 - beta_t``, ``alpha_bar_t = prod_{s<=t} alpha_s`` (Ho et al. eq. 4):
  ``q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)``.
* The network predicts one of (``DiffusionConfig.prediction``)
  ``eps`` (Ho et al.), ``x0``, or ``v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0``
  (Salimans & Ho 2022, sec. 4).
* Coefficients are computed once in float64 from the config (so they never enter a checkpoint),
  copied once to each device they are used on, and cast per call to the dtype of the tensor they
  multiply.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Mapping

import torch
from torch import Tensor
from tqdm.auto import tqdm

from genbench.core.gaussian import discretized_gaussian_log_likelihood, kl_diag_normals, kl_to_standard_normal

from genbench.errors import GenbenchError

ModelFn = Callable[[Tensor, Tensor], Tensor]
Schedule = Literal["linear", "cosine"]
Prediction = Literal["eps", "x0", "v"]
LossWeighting = Literal["none", "min_snr"]

# --------------------------------------------------------------------------------------------
# config


@dataclass
class DiffusionConfig:
    """Forward process and training objective.

    ``beta_start``/``beta_end`` are used as given for the linear schedule (Ho et al. use 1e-4 and
    0.02 with T = 1000); with fewer steps, raise ``beta_end`` so that alpha_bar_T stays small.
    """

    num_timesteps: int = 1000
    schedule: Schedule = "linear"  # Ho et al. 2020 | Nichol & Dhariwal 2021
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction: Prediction = "eps"  # what the network outputs (see x0_and_eps)
    loss_weighting: LossWeighting = "none"  # "min_snr": Hang et al. 2023
    min_snr_gamma: float = 5.0

    def validate(self) -> None:
        if self.num_timesteps < 2:
            raise GenbenchError(f"diffusion num_timesteps must be >= 2, got {self.num_timesteps}")
        if self.schedule not in ("linear", "cosine"):
            raise GenbenchError(f"diffusion schedule must be 'linear' or 'cosine', got {self.schedule!r}")
        if self.schedule == "linear" and not (0.0 < self.beta_start <= self.beta_end < 1.0):
            raise GenbenchError(
                f"diffusion betas must satisfy 0 < beta_start <= beta_end < 1, "
                f"got beta_start={self.beta_start}, beta_end={self.beta_end}"
            )
        if self.prediction not in ("eps", "x0", "v"):
            raise GenbenchError(f"diffusion prediction must be 'eps', 'x0' or 'v', got {self.prediction!r}")
        if self.loss_weighting not in ("none", "min_snr"):
            raise GenbenchError(
                f"diffusion loss_weighting must be 'none' or 'min_snr', got {self.loss_weighting!r}"
            )
        if not self.min_snr_gamma > 0:
            raise GenbenchError(f"diffusion min_snr_gamma must be > 0, got {self.min_snr_gamma}")


# --------------------------------------------------------------------------------------------
# schedules


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """beta_t evenly spaced from beta_start to beta_end (Ho et al. 2020, sec. 4), float64."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64, device="cpu")


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17), float64.

    alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2);
    beta_t = min(1 - alpha_bar(t) / alpha_bar(t-1), max_beta). The clip at 0.999 avoids the
    singularity at t = T.
    """
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64, device="cpu") / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


# --------------------------------------------------------------------------------------------
# random draws


def uniform_ints(high: int, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """n integers uniform on {0..high-1}, drawn on the generator's device, moved to ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.randint(0, high, (n,), generator=generator, device=gen_device).to(device)


def gaussian_noise(shape, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype) -> Tensor:
    """N(0, I) drawn on the generator's device (so a CPU generator gives the same numbers whatever
    device the model is on), then moved to ``device``; torch's global RNG when ``generator`` is None."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


# --------------------------------------------------------------------------------------------
# reading a network output

CONVERSION_TABLES = ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                     "sqrt_recipm1_alphas_cumprod")


def x0_and_eps(prediction: Prediction, out: Tensor, x_t: Tensor, coef: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """A network output at x_t as (x0_hat, eps_hat), for each prediction type.

    ``coef`` holds the CONVERSION_TABLES at x_t's timestep (scalars, or shaped to broadcast against
    x_t). With x_t = sqrt(abar) x0 + sqrt(1 - abar) eps (Ho et al. eq. 4):
      eps: eps_hat = out,  x0_hat = x_t / sqrt(abar) - sqrt(1/abar - 1) eps_hat          (Ho et al. eq. 15)
      x0:  x0_hat = out,   eps_hat = (x_t / sqrt(abar) - x0_hat) / sqrt(1/abar - 1)
      v:   x0_hat = sqrt(abar) x_t - sqrt(1 - abar) v,  eps_hat = sqrt(1 - abar) x_t + sqrt(abar) v
           (Salimans & Ho 2022, sec. 4: (x_t, v) is a rotation of (x0, eps))
    Samplers that clip x0_hat re-derive eps_hat from the clipped value with prediction="x0".
    """
    if prediction == "eps":
        eps = out.to(x_t.dtype)
        return coef["sqrt_recip_alphas_cumprod"] * x_t - coef["sqrt_recipm1_alphas_cumprod"] * eps, eps
    if prediction == "x0":
        x0 = out.to(x_t.dtype)
        return x0, (coef["sqrt_recip_alphas_cumprod"] * x_t - x0) / coef["sqrt_recipm1_alphas_cumprod"]
    if prediction == "v":
        a, s = coef["sqrt_alphas_cumprod"], coef["sqrt_one_minus_alphas_cumprod"]
        return a * x_t - s * out, s * x_t + a * out
    raise GenbenchError(f"diffusion prediction must be 'eps', 'x0' or 'v', got {prediction!r}")


# --------------------------------------------------------------------------------------------
# the process


class GaussianDiffusion:
    """Precomputed DDPM coefficients and everything that uses them.

    A plain object, not an nn.Module: the tables are derived from the config, so they belong in no
    state_dict or checkpoint. They live on the CPU in float64 (attributes below) and are copied once per
    device on first use there (``tables``); each use casts them to the dtype of the tensor at hand.

    Tables (float64, length T, 0-based t; see module docstring):
      betas, alphas, alphas_cumprod (alpha_bar_t), alphas_cumprod_prev (alpha_bar_{t-1}, = 1 at t=0),
      sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, log_one_minus_alphas_cumprod,
      sqrt_recip_alphas_cumprod (1/sqrt(alpha_bar)), sqrt_recipm1_alphas_cumprod (sqrt(1/alpha_bar - 1)),
      posterior_variance  beta~_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t   (Ho eq. 7),
      posterior_log_variance_clipped  log beta~_t with beta~_1 (= 0) replaced by beta~_2,
      posterior_mean_coef1 = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t)            (Ho eq. 7),
      posterior_mean_coef2 = sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t).
    """

    def __init__(self, config: DiffusionConfig | None = None):
        config = config if config is not None else DiffusionConfig()
        config.validate()
        self.config = config
        T = config.num_timesteps
        if config.schedule == "linear":
            betas = linear_betas(T, config.beta_start, config.beta_end)
        else:
            betas = cosine_betas(T)
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, dim=0)
        if ac[-1] > 0.01:
            raise GenbenchError(
                f"diffusion schedule ends at alpha_bar_T = {ac[-1]:.3g} > 0.01, so x_T is far from N(0, I); "
                f"increase num_timesteps or beta_end"
            )
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        buffers = dict(
            betas=betas,
            alphas=alphas,
            alphas_cumprod=ac,
            alphas_cumprod_prev=ac_prev,
            sqrt_alphas_cumprod=ac.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1.0 - ac).sqrt(),
            log_one_minus_alphas_cumprod=torch.log1p(-ac),
            sqrt_recip_alphas_cumprod=ac.rsqrt(),
            sqrt_recipm1_alphas_cumprod=(1.0 / ac - 1.0).sqrt(),
            posterior_variance=post_var,
            posterior_log_variance_clipped=torch.log(torch.cat([post_var[1:2], post_var[1:]])),
            posterior_mean_coef1=betas * ac_prev.sqrt() / (1.0 - ac),
            posterior_mean_coef2=alphas.sqrt() * (1.0 - ac_prev) / (1.0 - ac),
            snr=ac / (1.0 - ac),
        )
        for name, value in buffers.items():
            setattr(self, name, value)
        self._tables: dict[torch.device, dict[str, Tensor]] = {torch.device("cpu"): buffers}

    def tables(self, device: torch.device | str) -> dict[str, Tensor]:
        """All coefficient tables on ``device`` (float64), copied there once."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._tables:
            self._tables[device] = {k: v.to(device) for k, v in self._tables[torch.device("cpu")].items()}
        return self._tables[device]

    def _at(self, name: str, t: Tensor, x: Tensor) -> Tensor:
        """table[t] in x's dtype, shaped (B, 1, 1, ...) to broadcast against x of shape (B, ...)."""
        return self.tables(t.device)[name][t].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))

    @property
    def num_timesteps(self) -> int:
        return self.config.num_timesteps

    # --- forward process and parameterizations ----------------------------------------------

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps  (Ho et al. eq. 4, reparameterized)."""
        noise = torch.randn_like(x0) if noise is None else noise
        return self._at("sqrt_alphas_cumprod", t, x0) * x0 + self._at("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def coefficients_at(self, t: Tensor, x: Tensor) -> dict[str, Tensor]:
        """The four tables ``x0_and_eps`` reads, at t, in x's dtype, shaped to broadcast against x."""
        return {name: self._at(name, t, x) for name in CONVERSION_TABLES}

    def predict_x0(self, model_out: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """x0 estimate from a network output of the configured prediction type."""
        return x0_and_eps(self.config.prediction, model_out, xt, self.coefficients_at(t, xt))[0]

    def v_target(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """v = sqrt(abar) eps - sqrt(1 - abar) x0  (Salimans & Ho 2022, sec. 4)."""
        return self._at("sqrt_alphas_cumprod", t, x0) * noise - self._at("sqrt_one_minus_alphas_cumprod", t, x0) * x0

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the network regresses on: eps, x0 or v, per ``config.prediction``."""
        kind = self.config.prediction
        if kind == "eps":
            return noise
        if kind == "x0":
            return x0
        return self.v_target(x0, t, noise)

    def loss_weight(self, t: Tensor) -> Tensor:
        """Min-SNR-gamma weight per sample (Hang et al. 2023, sec. 3.4), float32, shape (B,).

        The intended loss is min(SNR_t, gamma) * ||x0 - x0_hat||^2. Written in the regression target
        of each parameterization (||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2,
        ||v - v_hat||^2 = (SNR + 1) ||x0 - x0_hat||^2) the weight is
        min(SNR, gamma) / SNR for eps, min(SNR, gamma) for x0, min(SNR, gamma) / (SNR + 1) for v.
        """
        snr = self.tables(t.device)["snr"][t]
        gamma = self.config.min_snr_gamma
        clipped = snr.clamp(max=gamma)
        kind = self.config.prediction
        if kind == "eps":
            w = (gamma / snr).clamp(max=1.0)  # = min(SNR, gamma) / SNR without 0/0 as SNR -> 0
        elif kind == "x0":
            w = clipped
        else:
            w = clipped / (snr + 1.0)
        return w.float()

    def training_loss(self, model_fn: ModelFn, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """L_simple = E_{t ~ U{1..T}, eps ~ N(0, I)} || target - model(x_t, t) ||^2  (Ho et al. eq. 14).

        Mean over all elements (optionally min-SNR weighted per sample). Draws t and eps from
        torch's global RNG when ``generator`` is None, so a seeded trainer resumes bit-identically.
        The squared error is taken in float32 even when the network runs under bf16 autocast.
        """
        b = x0.shape[0]
        t = uniform_ints(self.num_timesteps, b, generator, x0.device)
        noise = gaussian_noise(x0.shape, generator, x0.device, x0.dtype)
        xt = self.q_sample(x0, t, noise)
        target = self.training_target(x0, noise, t)
        err = (model_fn(xt, t).float() - target.float()) ** 2
        if self.config.loss_weighting == "none":
            return err.mean()
        per_sample = err.reshape(b, -1).mean(dim=1)
        return (self.loss_weight(t) * per_sample).mean()

    # --- reverse process --------------------------------------------------------------------

    def q_posterior(self, x0: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q(x_{t-1} | x_t, x0) = N(mu~, beta~ I)  (Ho et al. eq. 6-7).

        mu~ = coef1 * x0 + coef2 * x_t. Returns (mean, variance, clipped log-variance), the last two
        broadcastable to x_t.
        """
        mean = self._at("posterior_mean_coef1", t, xt) * x0 + self._at("posterior_mean_coef2", t, xt) * xt
        return mean, self._at("posterior_variance", t, xt), self._at("posterior_log_variance_clipped", t, xt)

    def p_mean_variance(
        self,
        model_out: Tensor,
        xt: Tensor,
        t: Tensor,
        clip_x0: tuple[float, float] | None = (-1.0, 1.0),
        variance: Literal["beta", "beta_tilde"] = "beta_tilde",
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """p(x_{t-1} | x_t) = N(mu~(x_t, x0_hat), sigma_t^2 I)  (Ho et al. sec. 3.2).

        x0_hat comes from the network output (clamped to ``clip_x0`` unless None), the mean is the
        posterior mean q_posterior(x0_hat, x_t) (equal to Ho eq. 11 for eps-prediction), and
        sigma_t^2 = beta_t ("beta", the upper bound) or beta~_t ("beta_tilde", the lower bound; its
        log is clipped at t = 1 where beta~_1 = 0). Returns (mean, variance, log_variance, x0_hat).
        """
        x0_hat = self.predict_x0(model_out, xt, t)
        if clip_x0 is not None:
            x0_hat = x0_hat.clamp(*clip_x0)
        mean, post_var, post_log_var = self.q_posterior(x0_hat, xt, t)
        if variance == "beta_tilde":
            return mean, post_var, post_log_var, x0_hat
        if variance == "beta":
            var = self._at("betas", t, xt)
            return mean, var, var.log(), x0_hat
        raise GenbenchError(f"reverse variance must be 'beta' or 'beta_tilde', got {variance!r}")

    # --- variational bound ------------------------------------------------------------------

    def prior_kl(self, x0: Tensor) -> Tensor:
        """L_T = KL(q(x_T | x0) || N(0, I)) summed over non-batch dims, nats, float64, shape (B,)."""
        x0 = x0.double()
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, device=x0.device, dtype=torch.long)
        return kl_to_standard_normal(self._at("sqrt_alphas_cumprod", t, x0) * x0,
                                     self._at("log_one_minus_alphas_cumprod", t, x0))

    def vlb_terms(
        self,
        model_fn: ModelFn,
        x0: Tensor,
        t: Tensor,
        noise: Tensor | None = None,
        variance: Literal["beta", "beta_tilde"] = "beta",
        clip_x0: tuple[float, float] | None = None,
    ) -> Tensor:
        """One term of the bound per sample, summed over dims, nats, float64, shape (B,).

        For 0-based t >= 1 (the paper's t >= 2): L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))
        with x_t = q_sample(x0, t, noise) (Ho et al. eq. 5; closed form, both Gaussian).
        For t = 0: L_0 = -log p(x0 | x_1), the discretized Gaussian decoder (Ho et al. sec. 3.3,
        genbench.core.gaussian.discretized_gaussian_log_likelihood: 256 bins, edge bins open to +-inf) with
        mean x0_hat and log-scale 0.5 * log sigma_1^2 (clipped beta~ or beta_1).
        x0 must be 8-bit data scaled to [-1, 1]. The network runs in x0's dtype; the bound
        arithmetic is float64.
        """
        xt = self.q_sample(x0, t, noise)
        out = model_fn(xt, t)
        x0d, xtd = x0.double(), xt.double()
        mean, _, log_var, _ = self.p_mean_variance(out.double(), xtd, t, clip_x0, variance)
        is_decoder = t == 0
        terms = torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)
        if is_decoder.any():  # bits_per_dim asks for all-decoder or all-KL batches: compute only what is needed
            # the [0, 1]-pixel decoder of genbench.gaussian; x in [-1, 1] is (pixel * 2 - 1), so scales double
            nll = -discretized_gaussian_log_likelihood((x0d + 1) / 2, (mean + 1) / 2, 0.5 * log_var - math.log(2.0))
            terms = torch.where(is_decoder, nll, terms)
        if not is_decoder.all():
            true_mean, _, true_log_var = self.q_posterior(x0d, xtd, t)
            terms = torch.where(is_decoder, terms, kl_diag_normals(true_mean, true_log_var, mean, log_var))
        return terms

    @torch.inference_mode()
    def bits_per_dim(
        self,
        model_fn: ModelFn,
        x0: Tensor,
        num_timesteps: int | None = None,
        generator: torch.Generator | None = None,
        variance: Literal["beta", "beta_tilde"] = "beta",
        clip_x0: tuple[float, float] | None = None,
        progress: bool = False,
    ) -> dict[str, Tensor]:
        """Negative variational bound in bits per dimension (Ho et al. 2020, eq. 5), per sample.

        -log p(x0) <= L = L_T + sum_{t=2}^{T} L_{t-1} + L_0, and bpd = L / (D ln 2) with D the number
        of dimensions of one x0. Because L_0 is a probability mass over the 256 levels of 8-bit data
        (the [0, 255] -> [-1, 1] scaling is inside the bin edges), this is the bits/dim of the 8-bit
        data with no extra change-of-variables term.

        ``num_timesteps=None`` evaluates all T-1 KL terms (one noise draw each). Otherwise the sum
        over the T-1 KL terms is estimated by stratified sampling: {2..T} is cut into K =
        num_timesteps contiguous strata S_k, one t_k is drawn uniformly from each (independently per
        sample), and sum_t L_{t-1} ~= sum_k |S_k| L_{t_k - 1}; each stratum's term is unbiased, so the
        sum is (T * mean over t when the strata are equal). L_T (closed form) and L_0 (one noise draw)
        are always computed exactly and not sampled, since L_0 dominates and differs in kind.

        ``variance`` defaults to sigma_t^2 = beta_t (Ho et al.'s CIFAR-10 choice): with the exact
        denoiser for Gaussian data it gives a far tighter bound than beta~, whose too-small reverse
        variance at small t costs ~0.8 bits/dim there (tests/test_diffusion.py); cf. Nichol & Dhariwal
        2021, fig. 2, on the first steps dominating the bound.

        Returns float64 tensors of shape (B,): "bpd" and its parts "prior_bpd" (L_T),
        "diffusion_bpd" (the KL sum), "decoder_bpd" (L_0).
        """
        T = self.num_timesteps
        b, device = x0.shape[0], x0.device
        per_dim = 1.0 / (x0[0].numel() * math.log(2.0))
        if x0.min() < -1 - 1e-6 or x0.max() > 1 + 1e-6:
            raise GenbenchError("bits_per_dim expects data scaled to [-1, 1] (8-bit levels mapped by x/127.5 - 1)")

        def term(t: Tensor) -> Tensor:
            noise = gaussian_noise(x0.shape, generator, device, x0.dtype)
            return self.vlb_terms(model_fn, x0, t, noise, variance, clip_x0)

        decoder = term(torch.zeros(b, dtype=torch.long, device=device))
        if num_timesteps is None:
            starts, sizes = torch.arange(1, T), torch.ones(T - 1, dtype=torch.long)
        else:
            if not 1 <= num_timesteps <= T - 1:
                raise GenbenchError(f"bits_per_dim num_timesteps must be in [1, {T - 1}] or None, got {num_timesteps}")
            edges = torch.div(torch.arange(num_timesteps + 1) * (T - 1), num_timesteps, rounding_mode="floor") + 1
            starts, sizes = edges[:-1], edges[1:] - edges[:-1]
        diffusion = torch.zeros(b, dtype=torch.float64, device=device)
        strata = list(zip(starts.tolist(), sizes.tolist()))
        for start, size in tqdm(strata, desc="vlb", disable=not progress, leave=False):
            diffusion += size * term(start + uniform_ints(size, b, generator, device))
        prior = self.prior_kl(x0)
        parts = {"prior_bpd": prior * per_dim, "diffusion_bpd": diffusion * per_dim, "decoder_bpd": decoder * per_dim}
        parts["bpd"] = parts["prior_bpd"] + parts["diffusion_bpd"] + parts["decoder_bpd"]
        return parts
