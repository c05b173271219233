"""The exponential moving average of a model's parameters that the trainer keeps and exports."""

from __future__ import annotations

import torch


class EMA:
    """Exponential moving average of parameters (buffers are copied, not averaged).

    With ``warmup`` the average starts short and lengthens: the n-th update uses the decay
    min(decay, (1 + n) / (10 + n)) (TensorFlow's ExponentialMovingAverage with num_updates; close to
    EDM2's power-function EMA, Karras et al. 2024 eq. 3, beta_n = (1 - 1/n)^(gamma + 1) with gamma = 8),
    so after n steps the shadow averages roughly the last n/9 of them instead of still holding
    decay^n of the random initial weights (0.995^600 = 5 %): what a short run needs."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = False):
        self.decay = decay
        self.warmup = warmup
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._params = dict(model.named_parameters())

    @torch.no_grad()
    def update(self, model: torch.nn.Module, num_updates: int | None = None) -> None:
        """One step of the average; ``num_updates`` (1 for the first update) sets the warm-up decay."""
        params = [p.detach() for k, p in self._params.items()]
        shadows = [self.shadow[k] for k in self._params]
        torch._foreach_lerp_(shadows, params, 1.0 - self.decay_at(num_updates))
        for k, b in model.named_buffers():
            if k in self.shadow:  # non-persistent buffers (precomputed tables) are not state
                self.shadow[k].copy_(b)

    def decay_at(self, num_updates: int | None) -> float:
        if not self.warmup or num_updates is None:
            return self.decay
        return min(self.decay, (1 + num_updates) / (10 + num_updates))

    def copy_to(self, model: torch.nn.Module) -> None:
        model.load_state_dict(self.shadow)
