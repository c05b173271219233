"""The exponential moving average of a model's parameters that the trainer keeps and exports."""

from __future__ import annotations

import torch


class EMA:
    """Exponential moving average of parameters (buffers are copied, not averaged)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._params = dict(model.named_parameters())

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        params = [p.detach() for k, p in self._params.items()]
        shadows = [self.shadow[k] for k in self._params]
        torch._foreach_lerp_(shadows, params, 1.0 - self.decay)
        for k, b in model.named_buffers():
            if k in self.shadow:  # non-persistent buffers (precomputed tables) are not state
                self.shadow[k].copy_(b)

    def copy_to(self, model: torch.nn.Module) -> None:
        model.load_state_dict(self.shadow)
