"""Samplers of the reverse diffusion process: small loops over precomputed coefficients.

Each sampler takes the process (genbench.core.diffusion.GaussianDiffusion, whose tables it reads)
and ``model_fn(x_t, t)``, and reads the network output through the one conversion
``x0_and_eps``, so a sampler works for eps-, x0- and v-prediction alike, for pixels and latents.

    DDPM     ancestral sampling over all T steps                      (Ho et al. 2020, Algorithm 2)
    DDIM     deterministic (eta = 0) or stochastic, `steps` timesteps  (Song et al. 2021, eq. 12 and 16)
    DPM++2M  multistep 2nd-order probability-flow ODE solver in data   (Lu et al. 2022, "DPM-Solver++",
             prediction, `steps` timesteps                              Algorithm 2)
    Heun     2nd-order probability-flow ODE solver in sigma, the VE    (Karras et al. 2022, Algorithm 1,
             form x/alpha; 2N - 1 network calls on N noise levels       S_churn = 0)

The ODE solvers step between the exact noise levels of integer timesteps (``solver_timesteps``): a
network trained on integer t is only asked about integer t. Every sampler ends at the clean data:
its last update returns x0_hat at its last timestep (DDIM's step to abar_prev = 1, diffusers'
final_sigmas_type="zero", the Euler step to sigma = 0 of Karras et al.).

``SamplerConfig`` (genbench.core.sampler_config) is the sampler choice a model records in its
config (DDPM and LDM share it); ``sample`` runs the chosen one.

Every sampler takes an optional ``callback(t, x_t, x0_hat)``, called once per grid timestep (Heun:
per noise level, at its first network call) with the integer timestep, the state the network read
and its estimate of x0 (clipped where the sampler clips): the trajectory the report draws. It
changes nothing in the run (no RNG draw, no copy unless the callback makes one), and the x0_hat
of the last call is the sampler's output.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from genbench.errors import GenbenchError

from .diffusion import CONVERSION_TABLES, GaussianDiffusion, ModelFn, gaussian_noise, x0_and_eps
# re-exported: the sampler choice belongs with the samplers for their users
from .sampler_config import SAMPLER_SPACINGS, SamplerConfig, heun_levels, upgrade_sampler_fields  # noqa: F401

StepCallback = Callable[[int, Tensor, Tensor], None]  # (t, x_t, x0_hat), see the module docstring
KARRAS_RHO = 7.0
LAMBDA_MIN = -5.1  # ODE grids of "logsnr"/"karras" spacing start where lambda_t >= LAMBDA_MIN (solver_timesteps)


@torch.inference_mode()
def sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    shape: tuple[int, ...],
    config: SamplerConfig,
    generator: torch.Generator | None = None,
    clip_x0: tuple[float, float] | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    callback: StepCallback | None = None,
) -> Tensor:
    """x_0 of shape ``shape`` by the sampler ``config`` names, from x_T ~ N(0, I) (validated first);
    ``callback(t, x_t, x0_hat)`` sees every step (module docstring)."""
    config.validate(diffusion.num_timesteps)
    kw = dict(generator=generator, clip_x0=clip_x0, device=device, progress=progress, callback=callback)
    spacing = config.resolved_spacing()
    if config.name == "ddim":
        return ddim_sample(diffusion, model_fn, shape, steps=config.steps, eta=config.eta, spacing=spacing, **kw)
    if config.name == "ddpm":
        return ddpm_sample(diffusion, model_fn, shape, **kw)
    if config.name == "dpm++2m":
        return dpmpp_2m_sample(diffusion, model_fn, shape, steps=config.steps, spacing=spacing, **kw)
    return heun_sample(diffusion, model_fn, shape, steps=config.steps, spacing=spacing, **kw)


def _at_step(c: dict[str, Tensor], i: int) -> dict[str, Tensor]:
    """The conversion coefficients of step i from a table already indexed by step."""
    return {k: c[k][i] for k in CONVERSION_TABLES}


def _sample_device(device, generator: torch.Generator | None, x_T: Tensor | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if x_T is not None:
        return x_T.device
    return generator.device if generator is not None else torch.device("cpu")


@torch.inference_mode()
def ddpm_sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    shape: tuple[int, ...],
    generator: torch.Generator | None = None,
    variance: Literal["beta", "beta_tilde"] = "beta_tilde",
    clip_x0: tuple[float, float] | None = (-1.0, 1.0),
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    x_T: Tensor | None = None,
    device: torch.device | str | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Ancestral sampling, Ho et al. 2020 Algorithm 2, over all T steps.

    x_T ~ N(0, I); for t = T..1: x_{t-1} = mu~(x_t, x0_hat) + sigma_t z, z ~ N(0, I), no noise at
    the last step. Noise comes from ``generator`` (global RNG if None); ``x_T`` fixes the starting
    noise. Runs on ``device``, by default x_T's, else the generator's, else the CPU.
    """
    if variance not in ("beta", "beta_tilde"):
        raise GenbenchError(f"reverse variance must be 'beta' or 'beta_tilde', got {variance!r}")
    device = _sample_device(device, generator, x_T)
    x = gaussian_noise(shape, generator, device, dtype) if x_T is None else x_T.to(device, dtype)
    T, prediction = diffusion.num_timesteps, diffusion.config.prediction
    # per-step scalars cast once; the loop only indexes them
    c = {k: v.to(dtype) for k, v in diffusion.tables(device).items()}
    sigma = (c["posterior_variance"] if variance == "beta_tilde" else c["betas"]).sqrt()
    ts = torch.arange(T, device=device).view(T, 1).expand(T, shape[0])
    for i in tqdm(range(T - 1, -1, -1), desc="ddpm", disable=not progress, leave=False):
        out = model_fn(x, ts[i])
        x0, _ = x0_and_eps(prediction, out, x, _at_step(c, i))
        if clip_x0 is not None:
            x0 = x0.clamp(*clip_x0)
        if callback is not None:
            callback(i, x, x0)
        x = c["posterior_mean_coef1"][i] * x0 + c["posterior_mean_coef2"][i] * x
        if i > 0:
            x = x + sigma[i] * gaussian_noise(shape, generator, device, dtype)
    return x


@torch.inference_mode()
def ddim_sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    shape: tuple[int, ...],
    steps: int = 50,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    clip_x0: tuple[float, float] | None = (-1.0, 1.0),
    progress: bool = True,
    spacing: Literal["trailing", "leading"] = "trailing",
    dtype: torch.dtype = torch.float32,
    x_T: Tensor | None = None,
    device: torch.device | str | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """DDIM sampling over a subsequence tau of the T steps (Song et al. 2021, eq. 12).

    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z,
    sigma = eta * sqrt((1 - abar_prev)/(1 - abar_t)) * sqrt(1 - abar_t/abar_prev)  (eq. 16);
    eta = 0 is the deterministic DDIM, eta = 1 the DDPM posterior on the subsequence. The last
    step goes to abar_prev = 1, i.e. returns x0_hat. When x0_hat is clipped, eps_hat is recomputed
    from the clipped x0_hat so that the two stay consistent (as in improved-diffusion).

    ``spacing`` (0-based timesteps, descending; cf. Lin et al. 2024, table 2):
      * "trailing": round(T - k*T/steps) - 1, k = 0..steps-1: starts at t = T-1 (the paper's T, the
        step whose marginal the N(0, I) prior matches) and ends at T/steps - 1. Default.
      * "leading": k*(T // steps), k = steps-1..0: the DDIM paper's uniform tau, starts at
        T - T//steps and ends at t = 0.
    """
    T, prediction = diffusion.num_timesteps, diffusion.config.prediction
    if not 1 <= steps <= T:
        raise GenbenchError(f"DDIM steps must be in [1, num_timesteps={T}], got {steps}")
    if eta < 0:
        raise GenbenchError(f"DDIM eta must be >= 0, got {eta}")
    device = _sample_device(device, generator, x_T)
    tau = ddim_timesteps(T, steps, spacing).to(device)
    x = gaussian_noise(shape, generator, device, dtype) if x_T is None else x_T.to(device, dtype)
    ac = diffusion.tables(device)["alphas_cumprod"]
    a_t = ac[tau]
    a_prev = torch.cat([ac[tau[1:]], ac.new_ones(1)])
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    # cast once: coefficient of x0_hat, of eps_hat, noise scale, and the x0/eps conversions at tau
    c_x0, c_eps = a_prev.sqrt().to(dtype), (1 - a_prev - sigma**2).clamp_min(0).sqrt().to(dtype)
    sigma = sigma.to(dtype)
    c = {k: v[tau].to(dtype) for k, v in diffusion.tables(device).items()}
    ts = tau.view(steps, 1).expand(steps, shape[0])
    for i in tqdm(range(steps), desc="ddim", disable=not progress, leave=False):
        out = model_fn(x, ts[i])
        coef = _at_step(c, i)
        x0, eps = x0_and_eps(prediction, out, x, coef)
        if clip_x0 is not None:  # keep eps_hat consistent with the clipped x0_hat
            x0, eps = x0_and_eps("x0", x0.clamp(*clip_x0), x, coef)
        if callback is not None:
            callback(int(tau[i]), x, x0)
        x = c_x0[i] * x0 + c_eps[i] * eps
        if eta > 0 and i < steps - 1:
            x = x + sigma[i] * gaussian_noise(shape, generator, device, dtype)
    return x


def ddim_timesteps(num_timesteps: int, steps: int, spacing: str = "trailing") -> Tensor:
    """Descending 0-based timesteps tau for DDIM (see ``ddim_sample``)."""
    T = num_timesteps
    if spacing == "trailing":
        tau = torch.round(T - torch.arange(steps, dtype=torch.float64) * (T / steps)).long() - 1
    elif spacing == "leading":
        tau = torch.arange(steps - 1, -1, -1) * (T // steps)
    else:
        raise GenbenchError(f"DDIM spacing must be 'trailing' or 'leading', got {spacing!r}")
    return tau


# --------------------------------------------------------------------------------------------
# ODE solvers: DPM-Solver++(2M) and Heun


def solver_timesteps(diffusion: GaussianDiffusion, steps: int, spacing: str) -> Tensor:
    """Descending 0-based integer timesteps at which an ODE solver calls the network (CPU tensor).

    With sigma_t = sqrt((1 - abar_t)/abar_t) = exp(-lambda_t), lambda_t the half log-SNR (Lu et al. sec. 2):
      * "trailing": as ``ddim_timesteps``, uniform in t from T-1 down to T/steps - 1;
      * "logsnr": lambda uniform from lambda_{t_max} to lambda_0, both included (Lu et al.'s logSNR);
      * "karras": sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
        rho = 7, sigma_max = sigma_{t_max}, sigma_min = sigma_0 (Karras et al. 2022, eq. 5).
    t_max is the last t with lambda_t >= LAMBDA_MIN = -5.1 (diffusers' lambda_min_clipped for the
    cosine schedule), or steps - 1 if larger: T-1 for the linear schedule, T-5 for the cosine one, whose
    sigma climbs from ~160 there to 640 at T-2 and, beta clipped at 0.999, 2e4 at T-1 (a grid up to
    there would put half its points at t >= T-6). A target level maps to the t where log sigma_t,
    linear between integers, meets it (diffusers' _sigma_to_t), rounded: the network is only asked
    about integer t, and the solver steps between the exact levels of the rounded t. Targets that
    round to the same t (near t = 0, where the table is coarse) are pushed apart to keep t distinct.
    """
    T = diffusion.num_timesteps
    if not 1 <= steps <= T:
        raise GenbenchError(f"solver steps must be in [1, num_timesteps={T}], got {steps}")
    if spacing == "trailing":
        return ddim_timesteps(T, steps, "trailing")
    ac = diffusion.alphas_cumprod
    log_sigma = 0.5 * (torch.log1p(-ac) - torch.log(ac))  # increasing in t
    t_max = max(int((log_sigma <= -LAMBDA_MIN).sum()) - 1, steps - 1)
    log_sigma = log_sigma[: t_max + 1]
    lo, hi = log_sigma[0].item(), log_sigma[-1].item()
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64, device="cpu")
    if spacing == "logsnr":
        targets = hi + ramp * (lo - hi)
    elif spacing == "karras":  # sigma_max^(1/rho) + ramp (sigma_min^(1/rho) - sigma_max^(1/rho)), to the power rho
        top, bottom = math.exp(hi / KARRAS_RHO), math.exp(lo / KARRAS_RHO)
        targets = KARRAS_RHO * torch.log(top + ramp * (bottom - top))
    else:
        raise GenbenchError(f"solver spacing must be 'trailing', 'logsnr' or 'karras', got {spacing!r}")
    # the fractional t where log sigma_t, linear between integers, meets the target; then the nearest integer
    j = torch.searchsorted(log_sigma, targets.contiguous()).clamp(1, t_max)
    t = (j - 1 + (targets - log_sigma[j - 1]) / (log_sigma[j] - log_sigma[j - 1])).round().long().clamp(0, t_max)
    i = torch.arange(steps, device="cpu")
    # make them distinct: t_i >= t_{i+1} + 1 going up from the end, then t_i <= t_{i-1} - 1 (and
    # t_0 <= t_max) going down from the start; the second pass cannot go below 0 as steps <= t_max + 1
    t = ((t + i).flip(0).cummax(0).values.flip(0) - i).clamp(max=t_max)
    return (t + i).cummin(0).values - i


def _read(prediction, clip_x0, c: dict[str, Tensor], out: Tensor, x: Tensor, i: int) -> tuple[Tensor, Tensor]:
    """(x0_hat, eps_hat) of the network output at grid point i (``c``: the CONVERSION_TABLES on the
    grid); a clipped x0_hat gets eps_hat recomputed from it, so x = alpha x0_hat + sigma eps_hat holds."""
    x0, eps = x0_and_eps(prediction, out, x, _at_step(c, i))
    if clip_x0 is not None:
        x0, eps = x0_and_eps("x0", x0.clamp(*clip_x0), x, _at_step(c, i))
    return x0, eps


@torch.inference_mode()
def dpmpp_2m_sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    shape: tuple[int, ...],
    steps: int = 20,
    spacing: str = "logsnr",
    generator: torch.Generator | None = None,
    clip_x0: tuple[float, float] | None = (-1.0, 1.0),
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    x_T: Tensor | None = None,
    device: torch.device | str | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """DPM-Solver++(2M): multistep second-order solver of the probability-flow ODE in data
    prediction (Lu et al. 2022, "DPM-Solver++", Algorithm 2), ``steps`` network calls.

    On the grid t_0 > ... > t_{S-1} (``solver_timesteps``) with alpha_i = sqrt(abar_i), sigma_i = sqrt(1 - abar_i),
    lambda_i = log(alpha_i/sigma_i), h_i = lambda_{i+1} - lambda_i, x0_i = x0_hat(x_i, t_i):
      x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} (e^{-h_i} - 1) D_i,
      D_i = (1 + 1/(2 r_i)) x0_i - 1/(2 r_i) x0_{i-1},  r_i = h_{i-1}/h_i        (Algorithm 2, second order)
    with D_0 = x0_0 at the first step (first order: DPM-Solver++1, which is DDIM, Lu et al. eq. 6).
    The last step goes to sigma_S = 0, alpha_S = 1 (lambda_S = inf, diffusers' final_sigmas_type =
    "zero") and is first order, so it returns x0_{S-1} as DDIM's last step does. (A second-order
    step is undefined there: r = h_{S-2}/inf = 0. Hence diffusers' lower_order_final, which for
    steps < 15 makes the last step first order, is always in effect and needs no switch.)

    x0_hat is clipped to ``clip_x0`` when given (pixel models; latents pass None). ``generator``
    only draws x_T (the solver is deterministic); ``x_T`` fixes it. Runs on ``device``, by default
    x_T's, else the generator's, else the CPU.
    """
    t = solver_timesteps(diffusion, steps, spacing)
    S, prediction = len(t), diffusion.config.prediction
    device = _sample_device(device, generator, x_T)
    x = gaussian_noise(shape, generator, device, dtype) if x_T is None else x_T.to(device, dtype)
    ac = diffusion.alphas_cumprod[t]
    alpha, sigma = ac.sqrt(), (1 - ac).sqrt()
    lam = alpha.log() - sigma.log()
    alpha_next, sigma_next = torch.cat([alpha[1:], alpha.new_ones(1)]), torch.cat([sigma[1:], sigma.new_zeros(1)])
    h = torch.cat([lam[1:] - lam[:-1], lam.new_full((1,), float("inf"))])
    # x_{i+1} = a_i x_i + b_i D_i; D_i = (1 + c_i) x0_i - c_i x0_{i-1}, c_i = 1/(2 r_i) = h_i/(2 h_{i-1})
    a, b = sigma_next / sigma, -alpha_next * torch.expm1(-h)
    second = [0 < i < S - 1 for i in range(S)]
    c_prev = torch.cat([h.new_zeros(1), h[1:] / (2 * h[:-1])])
    a, b, c_prev = (v.to(device, dtype) for v in (a, b, c_prev))
    c = {k: getattr(diffusion, k)[t].to(device, dtype) for k in CONVERSION_TABLES}
    ts = t.to(device).view(S, 1).expand(S, shape[0])
    x0_prev = None
    for i in tqdm(range(S), desc="dpm++2m", disable=not progress, leave=False):
        x0, _ = _read(prediction, clip_x0, c, model_fn(x, ts[i]), x, i)
        if callback is not None:
            callback(int(t[i]), x, x0)
        d = (1 + c_prev[i]) * x0 - c_prev[i] * x0_prev if second[i] else x0
        x = a[i] * x + b[i] * d
        x0_prev = x0
    return x


@torch.inference_mode()
def heun_sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    shape: tuple[int, ...],
    steps: int = 35,
    spacing: str = "karras",
    generator: torch.Generator | None = None,
    clip_x0: tuple[float, float] | None = (-1.0, 1.0),
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    x_T: Tensor | None = None,
    device: torch.device | str | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Heun's second-order solver of the probability-flow ODE (Karras et al. 2022, Algorithm 1,
    deterministic: S_churn = 0), at most ``steps`` network calls.

    In the VE form of the process, x~ = x/alpha_t with sigma_t = sqrt((1 - abar_t)/abar_t), the ODE is
    dx~/dsigma = (x~ - D(x~; sigma))/sigma (Karras et al. eq. 1 and 3, s(t) = 1, sigma(t) = t) with
    D = x0_hat. On N = ceil(steps/2) levels sigma_0 > ... > sigma_{N-1} (those of the timesteps
    ``solver_timesteps`` gives for N points) and sigma_N = 0:
      d_i = (x~_i - D(x~_i; sigma_i))/sigma_i,   x~' = x~_i + (sigma_{i+1} - sigma_i) d_i     (Euler, l. 5-6)
      if sigma_{i+1} != 0:  d' = (x~' - D(x~'; sigma_{i+1}))/sigma_{i+1},
                            x~_{i+1} = x~_i + (sigma_{i+1} - sigma_i) (d_i + d')/2           (trapezoid, l. 7-8)
    so 2N - 1 network calls; the last step (to sigma = 0) is Euler and returns D(x~_{N-1}). The
    loop keeps x = alpha x~ (what the network takes; x_T ~ N(0, I) is x~_0 = x_T/alpha_0, the VP
    prior), and uses d = eps_hat (x~ = x0_hat + sigma eps_hat), so the Euler step is the DDIM step
    x' = alpha_{i+1} x0_hat + sqrt(1 - abar_{i+1}) eps_hat and the corrector adds
    alpha_{i+1} (sigma_{i+1} - sigma_i)/2 (eps_hat' - eps_hat); no term of size sigma_max appears.

    ``clip_x0``, ``generator``, ``x_T``, ``device`` as in ``dpmpp_2m_sample``.
    """
    t = solver_timesteps(diffusion, heun_levels(steps), spacing)
    N, prediction = len(t), diffusion.config.prediction
    device = _sample_device(device, generator, x_T)
    x = gaussian_noise(shape, generator, device, dtype) if x_T is None else x_T.to(device, dtype)
    ac = diffusion.alphas_cumprod[t]
    ac_next = torch.cat([ac[1:], ac.new_ones(1)])
    sig = ((1 - ac) / ac).sqrt()
    sig_next = torch.cat([sig[1:], sig.new_zeros(1)])
    c_x0, c_eps = ac_next.sqrt(), (1 - ac_next).sqrt()
    c_corr = c_x0 * (sig_next - sig) / 2
    c_x0, c_eps, c_corr = (v.to(device, dtype) for v in (c_x0, c_eps, c_corr))
    c = {k: getattr(diffusion, k)[t].to(device, dtype) for k in CONVERSION_TABLES}
    ts = t.to(device).view(N, 1).expand(N, shape[0])
    for i in tqdm(range(N), desc="heun", disable=not progress, leave=False):
        x0, eps = _read(prediction, clip_x0, c, model_fn(x, ts[i]), x, i)
        if callback is not None:
            callback(int(t[i]), x, x0)
        x_next = c_x0[i] * x0 + c_eps[i] * eps
        if i < N - 1:
            _, eps_next = _read(prediction, clip_x0, c, model_fn(x_next, ts[i + 1]), x_next, i + 1)
            x_next = x_next + c_corr[i] * (eps_next - eps)
        x = x_next
    return x
