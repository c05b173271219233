"""The sampler choice a diffusion model records in its config (DDPM and LDM share it): which
sampler, how many network calls, DDIM's eta, which timesteps; validated, with the exact count of
network calls per sample. The samplers themselves are in genbench.core.samplers (which re-exports
these names).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from genbench.errors import GenbenchError

SamplerName = Literal["ddim", "ddpm", "dpm++2m", "heun"]
Spacing = Literal["default", "trailing", "leading", "logsnr", "karras"]

# the timestep spacings each sampler accepts; the first is its default ("default" in a config).
# DDPM visits all T steps and ignores the spacing.
SAMPLER_SPACINGS: dict[str, tuple[str, ...]] = {
    "ddim": ("trailing", "leading"),  # trailing: Lin et al. 2024 table 2 (genbench's DDIM default)
    "ddpm": (),
    "dpm++2m": ("logsnr", "trailing", "karras"),  # logSNR-uniform: Lu et al.'s advice for low-resolution images
    "heun": ("karras", "trailing", "logsnr"),  # Karras et al. eq. 5, rho = 7
}


@dataclass
class SamplerConfig:
    """How samples are drawn.

    ``name``: "ddim" (default), "ddpm", "dpm++2m" or "heun".
    ``steps``: the network calls per sample. Exactly that for DDIM and DPM-Solver++(2M) (one call per
      grid timestep); the DDPM sampler always takes all T steps and ignores it; Heun uses
      N = ceil(steps / 2) noise levels and 2N - 1 calls (Karras et al. Algorithm 1: two per level,
      one at the last), i.e. ``steps`` when it is odd and ``steps - 1`` when even. ``network_calls``
      gives the exact count.
    ``eta``: DDIM's noise (0 deterministic, 1 the DDPM posterior on the subsequence); must be 0 for
      the deterministic ODE solvers; DDPM ignores it.
    ``spacing``: which timesteps the sampler visits; "default" is the sampler's own default (the
      first of SAMPLER_SPACINGS[name]): DDIM "trailing" | "leading" (see ``ddim_timesteps``);
      DPM-Solver++(2M) "logsnr" | "trailing" | "karras", Heun "karras" | "trailing" | "logsnr" (see
      ``solver_timesteps``).
    """

    name: SamplerName = "ddim"
    steps: int = 50
    eta: float = 0.0
    spacing: Spacing = "default"

    def resolved_spacing(self) -> str | None:
        """The spacing the sampler uses ("default" replaced by the sampler's own); None for DDPM."""
        options = SAMPLER_SPACINGS.get(self.name)
        if not options:
            return None
        return options[0] if self.spacing == "default" else self.spacing

    def validate(self, num_timesteps: int | None = None) -> None:
        if self.name not in SAMPLER_SPACINGS:
            raise GenbenchError(f"sampler: name must be one of {list(SAMPLER_SPACINGS)}, got {self.name!r}")
        if self.steps < 1:
            raise GenbenchError(f"sampler: steps must be >= 1, got {self.steps}")
        if num_timesteps is not None and self.steps > num_timesteps:
            raise GenbenchError(f"sampler: steps ({self.steps}) must be <= diffusion.num_timesteps ({num_timesteps})")
        if self.eta < 0:
            raise GenbenchError(f"sampler: eta must be >= 0, got {self.eta}")
        if self.name in ("dpm++2m", "heun") and self.eta != 0:
            raise GenbenchError(f"sampler: eta applies to DDIM only ({self.name} is deterministic), got eta={self.eta}")
        options = SAMPLER_SPACINGS[self.name]
        if options and self.spacing != "default" and self.spacing not in options:
            raise GenbenchError(
                f"sampler: spacing {self.spacing!r} is not available for {self.name}; "
                f"use 'default' ({options[0]}) or one of {list(options)}"
            )

    def network_calls(self, num_timesteps: int) -> int:
        """Network evaluations per sample (the cost of one batch of samples, in forward passes)."""
        if self.name == "ddpm":
            return num_timesteps
        if self.name == "heun":
            return 2 * heun_levels(self.steps) - 1
        return self.steps

    def describe(self, num_timesteps: int) -> str:
        if self.name == "ddim":
            return f"DDIM, {self.steps} steps ({self.resolved_spacing()}), eta {self.eta}"
        if self.name == "dpm++2m":
            return f"DPM-Solver++(2M), {self.steps} steps ({self.resolved_spacing()})"
        if self.name == "heun":
            levels = heun_levels(self.steps)
            return (f"Heun (Karras et al. Alg. 1), {levels} noise levels ({self.resolved_spacing()}), "
                    f"{self.network_calls(num_timesteps)} network calls")
        return f"DDPM ancestral, {num_timesteps} steps"


def heun_levels(steps: int) -> int:
    """Noise levels N of Heun's sampler for a budget of ``steps`` network calls: 2N - 1 <= steps."""
    return (steps + 1) // 2


def upgrade_sampler_fields(data: dict) -> dict:
    """A model config saved before SamplerConfig existed held the sampler as flat fields
    (`sampler: "ddim"`, `sample_steps`, `eta`): fold them into the nested `sampler` section."""
    if isinstance(data.get("sampler"), str) or "sample_steps" in data or "eta" in data:
        old = {"name": data.pop("sampler", "ddim"), "steps": data.pop("sample_steps", 50), "eta": data.pop("eta", 0.0)}
        data["sampler"] = old
    return data
