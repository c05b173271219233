"""Quality during training: the protocol's FD, cheaply, at intervals of training.

`FDProbe` is the callable the trainer's `probe` hook takes (genbench.training.loop, `train.fd_every`):
given a copy of the model as it would be exported at that step, it draws `num_samples` samples with
a fixed seed (diffusion models with a fast sampler, DPM-Solver++(2M) with 10 calls unless told
otherwise) and returns their Frechet distance to the test set in the feature space of the
comparison's feature network (genbench.evaluation.features), the same space as the final row's FD.
Fewer samples than the protocol's make the intermediate points cheaper and biased upward (FD's
finite-sample bias); the report plots them as a curve and the full-protocol FD as the end point.
"""

from __future__ import annotations

import torch

from genbench.core.samplers import SamplerConfig
from genbench.models.base import GenerativeModel

from . import metrics
from .features import get_feature_network

PROBE_SAMPLER = SamplerConfig("dpm++2m", 10)


class FDProbe:
    """model -> {"fd": ..., "fd_samples": n, "fd_sampler": ...}; the feature network and the test
    features are built on the first call (the network is cached on disk, genbench.nets.local)."""

    def __init__(self, ds, num_samples: int = 500, seed: int = 0, sampler: SamplerConfig | None = PROBE_SAMPLER,
                 batch_size: int = 500, kind: str | None = None):
        self.ds, self.num_samples, self.seed, self.sampler, self.batch_size = ds, num_samples, seed, sampler, batch_size
        self.kind = kind  # the feature network's (genbench.evaluation.features.KINDS; None: the dataset's default)
        self._feats = self._real = None

    def _features(self):
        if self._feats is None:
            self._feats = get_feature_network(self.ds, kind=self.kind)
            self._real = self._feats.features(self.ds.test)
        return self._feats, self._real

    @torch.no_grad()
    def __call__(self, model: GenerativeModel) -> dict:
        feats, real = self._features()
        if model.has_sampler and self.sampler is not None:
            model.set_sampler(self.sampler)  # the trainer hands over a copy: the run's own sampler is kept
        device = next(model.parameters()).device
        gen = torch.Generator(device=device).manual_seed(self.seed)
        images = torch.cat([model.sample(min(self.batch_size, self.num_samples - i), generator=gen).float().cpu()
                            for i in range(0, self.num_samples, self.batch_size)]).clamp(0, 1)
        result = {"fd": metrics.frechet_distance(feats.features(images), real), "fd_samples": self.num_samples,
                  "fd_features": feats.kind}
        if model.has_sampler:
            result["fd_sampler"] = model.config.sampler.describe(model.diffusion.num_timesteps)
        return result
