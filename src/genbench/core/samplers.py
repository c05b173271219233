"""Samplers of the reverse diffusion process: small loops over precomputed coefficients.

Each sampler takes the process (genbench.core.diffusion.GaussianDiffusion, whose tables it reads)
and ``model_fn(x_t, t)``, and reads the network output through the one conversion
``x0_and_eps``, so a sampler works for eps-, x0- and v-prediction alike, for pixels and latents.

    DDPM  ancestral sampling over all T steps            (Ho et al. 2020, Algorithm 2)
    DDIM  deterministic (eta = 0) or stochastic, on a    (Song et al. 2021, eq. 12 and 16)
          subsequence of `steps` timesteps

``SamplerConfig`` is the sampler choice a model records in its config (DDPM and LDM share it);
``sample`` runs the chosen one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from genbench.errors import GenbenchError

from .diffusion import CONVERSION_TABLES, GaussianDiffusion, ModelFn, gaussian_noise, x0_and_eps

SamplerName = Literal["ddim", "ddpm"]
Spacing = Literal["trailing", "leading"]


@dataclass
class SamplerConfig:
    """How samples are drawn. ``steps`` is the number of network calls of DDIM; the DDPM sampler
    always takes all T steps. ``eta``: DDIM's noise (0 deterministic, 1 the DDPM posterior on the
    subsequence). ``spacing``: which timesteps DDIM visits (see ``ddim_timesteps``)."""

    name: SamplerName = "ddim"
    steps: int = 50
    eta: float = 0.0
    spacing: Spacing = "trailing"

    def validate(self, num_timesteps: int | None = None) -> None:
        if self.steps < 1:
            raise GenbenchError(f"sampler: steps must be >= 1, got {self.steps}")
        if num_timesteps is not None and self.steps > num_timesteps:
            raise GenbenchError(f"sampler: steps ({self.steps}) must be <= diffusion.num_timesteps ({num_timesteps})")
        if self.eta < 0:
            raise GenbenchError(f"sampler: eta must be >= 0, got {self.eta}")

    def describe(self, num_timesteps: int) -> str:
        if self.name == "ddim":
            return f"DDIM, {self.steps} steps ({self.spacing}), eta {self.eta}"
        return f"DDPM ancestral, {num_timesteps} steps"


def upgrade_sampler_fields(data: dict) -> dict:
    """A model config saved before SamplerConfig existed held the sampler as flat fields
    (`sampler: "ddim"`, `sample_steps`, `eta`): fold them into the nested `sampler` section."""
    if isinstance(data.get("sampler"), str) or "sample_steps" in data or "eta" in data:
        old = {"name": data.pop("sampler", "ddim"), "steps": data.pop("sample_steps", 50), "eta": data.pop("eta", 0.0)}
        data["sampler"] = old
    return data


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
) -> Tensor:
    """x_0 of shape ``shape`` by the sampler ``config`` names, from x_T ~ N(0, I)."""
    kw = dict(generator=generator, clip_x0=clip_x0, device=device, progress=progress)
    if config.name == "ddim":
        return ddim_sample(diffusion, model_fn, shape, steps=config.steps, eta=config.eta, spacing=config.spacing, **kw)
    if config.name == "ddpm":
        return ddpm_sample(diffusion, model_fn, shape, **kw)
    raise GenbenchError(f"sampler must be one of 'ddim', 'ddpm', got {config.name!r}")


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
