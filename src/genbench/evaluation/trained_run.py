"""What one does with a finished run: load it, sample from it, reconstruct, evaluate, draw its pictures.

These are the library side of `genbench sample`, `reconstruct` and `evaluate`, and of the
samples.png / reconstructions.png written after `genbench train`.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from genbench.data import DatasetSpec
from genbench.errors import GenbenchError
from genbench.files import write_json
from genbench.images import save_grid
from genbench.models.base import GenerativeModel
from genbench.training.run_folder import RunFolder
from genbench.limits import check_memory
from genbench.utils import check_seed, select_device


class TrainedRun:
    """A finished run's record and exported model, loaded on `device` ("auto": CUDA when available)."""

    def __init__(self, run_dir: str | os.PathLike, device: str = "auto"):
        self.run = RunFolder(run_dir)
        self.info = self.run.require_complete()
        self.device = select_device(device)
        self.model = GenerativeModel.from_pretrained(self.run.model_dir, device=self.device)

    @property
    def name(self) -> str:
        return self.info["model"]

    def dataset(self):
        return DatasetSpec.from_dict(self.info["dataset"], where=f"{self.run.run_json}: dataset").load()

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(check_seed(seed))

    def with_sampler(self, name: str | None = None, steps: int | None = None, spacing: str | None = None,
                     eta: float | None = None) -> TrainedRun:
        """Sample from now on with the run's sampler changed where an argument is given (diffusion
        models only; e.g. name="dpm++2m", steps=10)."""
        if not self.model.has_sampler:
            self.model.set_sampler(None)  # the model's own error: it has none
        current = self.model.config.sampler
        changes = {k: v for k, v in dict(name=name, steps=steps, spacing=spacing, eta=eta).items() if v is not None}
        if "name" in changes and changes["name"] != current.name and "spacing" not in changes:
            changes["spacing"] = "default"  # another sampler: its own default grid
        self.model.set_sampler(replace(current, **changes))
        return self

    def sample(self, n: int, seed: int = 0, batch_size: int = 256) -> torch.Tensor:
        """n samples in batches of `batch_size`; batch i is drawn with seed `seed + i * batch_size`.
        Refused before any work when the n images would not fit the memory limit."""
        if n < 1:
            raise GenbenchError(f"-n must be >= 1, got {n}")
        if batch_size < 1:
            raise GenbenchError(f"--batch-size must be >= 1, got {batch_size}")
        check_seed(seed)
        c, s = self.model.config.image_channels, self.model.config.image_size
        check_memory(2.0 * n * c * s * s * 4, f"{n} samples of {c}x{s}x{s} (float32, and their output file)")
        return torch.cat([self.model.sample(min(batch_size, n - i), generator=self.generator(seed + i)).cpu()
                          for i in range(0, n, batch_size)])

    def _require_reconstruction(self) -> None:
        if not self.model.has_reconstruction:
            raise GenbenchError(f"{self.name} has no reconstruction (it does not encode images)")

    @torch.no_grad()
    def reconstruct_test(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n test images and their reconstructions."""
        self._require_reconstruction()
        x = self.dataset().float_images("test", slice(0, n)).to(self.device)
        return x, self.model.reconstruct(x)

    @torch.no_grad()
    def evaluate(self, limit: int | None = None, seed: int = 0, out: str | os.PathLike | None = None) -> dict:
        """Reconstruction MSE (where the model reconstructs), the model's own likelihood figures and
        the training summary, on the first `limit` test images; written to `out` (default
        RUN/eval.json)."""
        check_seed(seed)
        test = self.dataset().float_images("test", slice(0, limit or None)).to(self.device)
        result = {"model": self.name, "dataset": self.info["dataset"]["name"], "num_test_images": len(test)}
        if self.model.has_reconstruction:
            rec = torch.cat([self.model.reconstruct(x) for x in test.split(500)])
            result["reconstruction_mse"] = torch.mean((rec - test) ** 2).item()
        result.update(self.model.evaluate(test, generator=self.generator(seed)))
        result["training"] = self.info.get("summary", {})
        path = Path(out) if out else self.run.path / "eval.json"
        try:
            write_json(path, result)
        except OSError as e:
            raise GenbenchError(f"{path}: cannot write ({e.strerror or e})") from None
        return result

    def write_images(self, seed: int = 0, n: int = 64) -> None:
        """samples.png and (where the model reconstructs) reconstructions.png beside the run."""
        save_grid(self.model.sample(n, generator=self.generator(seed)), self.run.samples_png)
        if self.model.has_reconstruction:
            x, x_hat = self.reconstruct_test(32)
            save_grid(interleave(x, x_hat), self.run.reconstructions_png, nrow=8)


def interleave(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x[0], y[0], x[1], y[1], ...: test images beside their reconstructions in a grid."""
    return torch.stack([x, y], 1).flatten(0, 1)
