"""The evaluation protocol: every model, and every reference row, measured the same way.

The same number of samples drawn with the same seed, the same test images, the same feature
network (genbench.evaluation.features): FD, KID, precision/recall/density/coverage, class
histogram and memorisation on samples; MSE/PSNR/SSIM and reconstruction FD on reconstructions;
the model's own likelihood estimate; costs from the run's record; training curves and stability
from its log; sample, reconstruction and interpolation grids for the report, and the pictures of
how the model works where its family has one (genbench.evaluation.latents): the VAE's latent space
and active units, a VQ codebook's usage, a diffusion model's trajectory.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from genbench.data import unit_float
from genbench.images import make_grid, png_bytes
from genbench.models.base import GenerativeModel
from genbench.training.run_folder import RunFolder
from genbench.utils import count_parameters, select_device

from . import metrics
from .figures import codebook_png, latent_space_png, latent_tiles, trajectory_png
from .latents import codebook_usage, diffusion_trajectory, posterior_summary
from .trained_run import interleave

SAMPLE_BATCH = 500
GRID_SIDE = 40  # images in the report's grids are drawn at least this many pixels wide (nearest-neighbour)
TRAJECTORY_SAMPLES = 2
MEMORIZATION_CHUNK = 8192  # train images converted (to float64 inside) at a time for the memorisation metric


class EvalContext:
    """Everything the evaluation shares across models: test images, features of the real sets, seed."""

    def __init__(self, ds, feats, num_samples: int, eval_limit: int, seed: int = 0):
        self.ds, self.feats, self.num_samples, self.seed = ds, feats, num_samples, seed
        self.test = ds.float_images("test", slice(0, eval_limit))
        # the real side of FD/KID/PRDC: all test images
        self.real_feats = feats.features(ds.test)
        self._test_feats = None  # features of self.test, for the reconstruction FD

    # ---- sample quality, identical for models and reference rows

    def sample_metrics(self, images: torch.Tensor) -> dict:
        f = self.feats.features(images)
        kid_mean, kid_std = metrics.kernel_distance(f, self.real_feats, num_subsets=50,
                                                    subset_size=min(1000, len(f), len(self.real_feats)), seed=self.seed)
        prdc = metrics.precision_recall_density_coverage(self.real_feats, f, k=5)
        hist = metrics.class_histogram_stats(self.feats.predict(images), self.feats.num_classes)
        mem = metrics.memorization(images[:1000], self.train_chunks(), self.ds.test[:1000])
        return {
            "fd": metrics.frechet_distance(f, self.real_feats),
            "kid": kid_mean, "kid_std": kid_std,
            **{k: prdc[k] for k in ("precision", "recall", "density", "coverage")},
            "class_entropy": hist["normalized_entropy"], "class_coverage": hist["class_coverage"],
            "class_histogram": hist.get("histogram"),
            "memorization_ratio": mem["ratio"], "memorization_fraction_closer": mem["fraction_closer"],
        }

    def train_chunks(self):
        """The train split as float32, MEMORIZATION_CHUNK images at a time (memory bounded for any size)."""
        n = len(self.ds.train_pixels)
        return (self.ds.float_images("train", slice(i, i + MEMORIZATION_CHUNK)) for i in range(0, n, MEMORIZATION_CHUNK))

    def reconstruction_fd(self, rec: torch.Tensor) -> float:
        """Frechet distance between the reconstructions of the evaluated test images and those test
        images themselves ("rFID" of Esser et al. 2021, with genbench's feature network): realism of
        reconstructions, which MSE does not measure."""
        if self._test_feats is None:
            self._test_feats = self.feats.features(self.test)
        return metrics.frechet_distance(self.feats.features(rec), self._test_feats)

    def reference_row(self, name: str, pool: torch.Tensor | None) -> dict:
        """Metrics of `num_samples` images drawn from `pool` (images, uint8 or float32: e.g. the
        train set's pixels), or of uniform noise when `pool` is None."""
        g = torch.Generator().manual_seed(self.seed)
        if pool is None:
            images = torch.rand((self.num_samples, *self.ds.shape), generator=g)
        else:
            idx = torch.randperm(len(pool), generator=g)[: self.num_samples]
            images = unit_float(pool[idx])
        return {"name": name, "kind": "reference", **self.sample_metrics(images)}

    # ---- one trained model

    @torch.no_grad()
    def draw(self, model: GenerativeModel, device: torch.device) -> tuple[torch.Tensor, float]:
        """`num_samples` samples with the context's seed, and the seconds each took."""
        gen = torch.Generator(device=device).manual_seed(self.seed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        batches = []
        for i in range(0, self.num_samples, SAMPLE_BATCH):
            batches.append(model.sample(min(SAMPLE_BATCH, self.num_samples - i), generator=gen).float().cpu())
        if device.type == "cuda":
            torch.cuda.synchronize()
        return torch.cat(batches).clamp(0, 1), (time.perf_counter() - t0) / self.num_samples

    def sampler_sweep(self, model: GenerativeModel, device: torch.device, samplers: list) -> list[dict]:
        """FD (and seconds per sample) of a diffusion model under each sampler config, with the same
        samples count and seed as the main row: quality against network calls per sample."""
        own = model.config.sampler
        points = []
        try:
            for sampler in samplers:
                model.set_sampler(sampler)
                samples, seconds = self.draw(model, device)
                points.append({"sampler": sampler.name, "spacing": sampler.resolved_spacing(), "steps": sampler.steps,
                               "network_calls": sampler.network_calls(model.diffusion.num_timesteps),
                               "fd": metrics.frechet_distance(self.feats.features(samples), self.real_feats),
                               "sample_ms_per_image": seconds * 1000})
        finally:
            model.set_sampler(own)
        return points

    @torch.no_grad()
    def evaluate_run(self, run_dir: str | Path, device: str = "auto", sampler=None, sweep: list = ()) -> dict:
        """One finished run through the protocol. Diffusion models sample with `sampler` (a
        SamplerConfig) when given, else their run's own, and `sweep` adds FD under other samplers."""
        run = RunFolder(run_dir)
        info = run.require_complete()
        dev = select_device(device)
        model = GenerativeModel.from_pretrained(run.model_dir, device=dev)
        if sampler is not None:
            model.set_sampler(sampler)
        # samples: same count and seed for every model; timed per image
        calls = count_network_calls(model)
        samples, sample_s = self.draw(model, dev)
        row = {"name": info["model"], "kind": "model", "run_dir": str(run.path), **self.sample_metrics(samples)}
        row["network_calls_per_sample"] = calls
        if model.has_sampler:
            own = model.config.sampler
            main = {"sampler": own.name, "spacing": own.resolved_spacing(), "steps": own.steps,
                    "network_calls": own.network_calls(model.diffusion.num_timesteps), "fd": row["fd"],
                    "sample_ms_per_image": sample_s * 1000}
            row["sampler"] = own.describe(model.diffusion.num_timesteps)
            row["fd_by_sampler"] = [main] + self.sampler_sweep(model, dev, [s for s in sweep if s != own])
        test = self.test.to(dev)
        images = {"samples": make_grid(samples[:64], nrow=8, min_side=GRID_SIDE)}
        row.update(mse=None, psnr=None, ssim=None, recon_fd=None)
        if model.has_reconstruction:
            rec = torch.cat([model.reconstruct(x).float() for x in test.split(SAMPLE_BATCH)]).clamp(0, 1).cpu()
            row.update(mse=metrics.mse(rec, self.test), psnr=metrics.psnr(rec, self.test),
                       ssim=metrics.ssim(rec, self.test), recon_fd=self.reconstruction_fd(rec))
            images["reconstructions"] = make_grid(interleave(self.test[:32], rec[:32]), nrow=8, min_side=GRID_SIDE)
        if model.has_latent_space:
            images["interpolations"] = make_grid(latent_interpolation(model, test[:8], steps=8).cpu(), nrow=8,
                                                 min_side=GRID_SIDE)
        row["latent_shape"] = describe_latent(model, test[:1])
        pictures = self.family_pictures(model, run, row, dev)
        ev = model.evaluate(test, generator=torch.Generator(device=dev).manual_seed(self.seed))
        row["bits_per_dim"] = ev.get("bits_per_dim")
        row["bpd_estimator"] = ev.get("bpd_estimator") or "not defined"
        row["model_eval"] = {k: v for k, v in ev.items() if isinstance(v, (int, float, str)) or v is None}
        summary = info.get("summary", {})
        stages = summary.get("stages", {})
        row.update(
            parameters=count_parameters(model),
            train_wall_time_s=summary.get("wall_time_s"),
            train_cpu_time_s=summary.get("cpu_time_s"),
            train_flops=summary.get("train_flops"),
            train_images_per_s={s: v.get("images_per_s") for s, v in stages.items()},
            peak_memory_mb=summary.get("peak_memory_mb"),
            sample_ms_per_image=sample_s * 1000,
            device=summary.get("device"),
        )
        row["curves"] = run.curves()
        row["quality_curve"] = run.quality_curve()  # FD probes during training (train.fd_every)
        row["stability"] = loss_stability(row["curves"])
        row["images_png"] = {**{k: png_bytes(v) for k, v in images.items()}, **pictures}
        row["family"] = dict(model.FAMILY)
        return row

    @torch.no_grad()
    def family_pictures(self, model: GenerativeModel, run: RunFolder, row: dict, device: torch.device) -> dict:
        """PNGs of how the model works, by what its family has (models/base.py capabilities); the numbers
        behind them go into `row` (metrics.json)."""
        pictures = {}
        test = self.test.to(device)
        if model.has_posterior:
            summary = posterior_summary(model, test)
            row["latent_space"] = {k: v for k, v in summary.items() if k != "pca"}
            labels = self.ds.test_labels[: len(self.test)].numpy() if self.ds.test_labels is not None else None
            pictures["latent_space"] = latent_space_png(summary, labels)
        if model.has_codebook:
            row["codebook"] = codebook_usage(model, test, run.read_log())
            pictures["codebook"] = codebook_png(row["codebook"])
        if model.has_sampler:
            gen = torch.Generator(device=device).manual_seed(self.seed)
            traj = diffusion_trajectory(model, TRAJECTORY_SAMPLES, gen)
            row["trajectory"] = {"t": traj["t"], "space": "latent" if is_latent(traj) else "pixels"}
            pictures["trajectory"] = trajectory_png(traj["t"], trajectory_rows(model, traj, device))
        return pictures


def describe_latent(model: GenerativeModel, x: torch.Tensor) -> str:
    """What one image becomes inside the model, measured on x (one image): its shape and kind."""
    def shape(t):
        return "×".join(map(str, t.shape[1:]))
    if model.has_codebook:
        return f"{shape(model.encode(x))} code indices into {model.codebook_size} codes"
    if model.has_latent_space:
        return f"{shape(model.encode_latents(x))} continuous"
    if model.has_sampler:
        return f"none: noise of the image's shape {shape(x)}"
    return "none"


def _pictures(images: torch.Tensor) -> list[np.ndarray]:
    """(N, C, H, W) in [0, 1] -> N arrays (H, W) or (H, W, 3) for figures.trajectory_png."""
    x = images.float().clamp(0, 1).cpu().numpy()
    return [a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0) for a in x]


def is_latent(traj: dict) -> bool:
    """The diffusion ran in a latent space: its states are not shaped like the samples."""
    return traj["x_t"].shape[2:] != traj["samples"].shape[1:]


def trajectory_rows(model: GenerativeModel, traj: dict, device: torch.device) -> list[tuple[str, list[np.ndarray]]]:
    """Rows of trajectory_png per sample: x_t and x0_hat as images; when the diffusion runs in a latent
    space (its states are not image-shaped), z_t and z0_hat as channel tiles, then their decodings."""
    s, n = traj["x_t"].shape[:2]
    latent = is_latent(traj)

    def shown(x):  # (S, n, ...) -> (S, n, C, H, W) images
        return model.diffusion_to_images(x.flatten(0, 1).to(device)).float().cpu().unflatten(0, (s, n))

    x_t, x0 = shown(traj["x_t"]), shown(traj["x0_hat"])
    rows = []
    for j in range(n):
        if latent:
            rows += [(f"#{j + 1}  $z_t$", [latent_tiles(z[j].numpy()) for z in traj["x_t"]]),
                     (r"$\hat z_0$", [latent_tiles(z[j].numpy()) for z in traj["x0_hat"]]),
                     ("$D(z_t)$", _pictures(x_t[:, j])), (r"$D(\hat z_0)$", _pictures(x0[:, j]))]
        else:
            rows += [(f"#{j + 1}  $x_t$", _pictures(x_t[:, j])), (r"$\hat x_0$", _pictures(x0[:, j]))]
    return rows


def latent_interpolation(model: GenerativeModel, x: torch.Tensor, steps: int = 8) -> torch.Tensor:
    """Decode straight lines between the continuous latents of pairs of test images (rows: pairs):
    z = (1 - w) E(a) + w E(b), w from 0 to 1, through the model's encode_latents / decode_latents
    (for VQ models the pre-quantization latents, quantized when decoded)."""
    z = model.encode_latents(x)
    a, b = z[0::2], z[1::2]
    n = min(len(a), len(b))
    w = torch.linspace(0, 1, steps, device=z.device).view(1, steps, *([1] * (z.ndim - 1)))
    path = a[:n, None] * (1 - w) + b[:n, None] * w  # (pairs, steps, ...)
    return model.decode_latents(path.flatten(0, 1)).float().clamp(0, 1)


def count_network_calls(model: GenerativeModel) -> dict[str, int]:
    """Count the forward calls of the model's networks during one sample(2) call: its direct
    sub-modules, and those of a sub-model it holds (LDM's first stage, e.g. "first_stage.decoder").

    It is the measured number of sequential network evaluations a sample costs (1 for a
    decoder, the sampler's steps for a diffusion U-Net, one per code for an autoregressive prior,
    which decodes incrementally through its forward)."""
    counts: dict[str, int] = {}
    networks = []
    for name, child in model.named_children():
        if isinstance(child, GenerativeModel):
            networks += [(f"{name}.{sub}", net) for sub, net in child.named_children()]
        else:
            networks.append((name, child))
    hooks = [net.register_forward_pre_hook(lambda m, a, name=name: counts.__setitem__(name, counts.get(name, 0) + 1))
             for name, net in networks]
    try:
        model.sample(2)
    finally:
        for h in hooks:
            h.remove()
    return counts


def loss_stability(curves: dict) -> dict:
    """Measured training stability per stage: over the second half of the logged curve, the
    median absolute relative change between consecutive logged losses (noise level) and the
    largest relative jump upward (spikes). Small and smooth means stable."""
    out = {}
    for stage, c in curves.items():
        loss = np.asarray(c["loss"], dtype=np.float64)
        half = loss[len(loss) // 2:]
        if len(half) < 3:
            continue
        scale = np.maximum(np.abs(half[:-1]), 1e-8)
        rel = np.diff(half) / scale
        out[stage] = {"median_abs_rel_change": float(np.median(np.abs(rel))), "max_rel_jump": float(rel.max()),
                      "finite": bool(np.isfinite(loss).all())}
    return out
