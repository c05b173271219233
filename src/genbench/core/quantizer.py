"""Vector quantizer shared by VQ-VAE, VQ-GAN and latent diffusion.

A codebook e_1..e_K of D-dimensional vectors; every encoder output vector z is replaced by its
nearest code (van den Oord et al. 2017, "Neural Discrete Representation Learning", eq. 1-3):

    k(z)   = argmin_k ||z - e_k||^2                      nearest-code lookup
    z_q    = z + sg[e_k(z) - z]                           straight-through estimator
    L_vq   = ||sg[z] - e||^2  +  beta * ||z - sg[e]||^2   codebook loss + commitment loss

With `update="ema"` the codebook is not trained by gradient but by exponential moving averages of
the vectors assigned to each code (van den Oord 2017 appendix A.1; Razavi et al. 2019 "VQ-VAE-2"),
and the codebook loss term is dropped:

    N_k <- decay * N_k + (1 - decay) * n_k                 n_k: vectors assigned to code k this batch
    m_k <- decay * m_k + (1 - decay) * sum_{z -> k} z
    e_k  = m_k / N~_k,   N~_k = (N_k + eps) / (N + K eps) * N,   N = sum_k N_k   (Laplace smoothing)

Keeping the codebook healthy (most codes in use) takes two more pieces:
- data-dependent initialisation: k-means++ seeding (Arthur & Vassilvitskii 2007) plus a few Lloyd
  iterations on encoder outputs, or random encoder outputs, instead of a random codebook far away
  from where the encoder puts its vectors;
- dead-code restart (Dhariwal et al. 2020, "Jukebox", sec. 3.2 "random restarts"): a code not
  chosen for `dead_code_steps` training steps is moved onto a random encoder output of the batch.

All state (codebook, EMA statistics, step and last-used counters, the initialised flag) lives in
buffers, so it is checkpointed and a resumed run neither re-initialises nor forgets dead codes.
Every random draw uses torch's global RNG unless a generator is given (the trainer seeds and
checkpoints the global one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from genbench.errors import GenbenchError

UPDATES = ("ema", "gradient")
INITS = ("kmeans++", "random", "uniform")


@dataclass
class QuantizerConfig:
    codebook_size: int = 512  # K
    code_dim: int = 64  # D
    beta: float = 0.25  # commitment weight (van den Oord 2017 use 0.25)
    update: str = "ema"  # "ema" (moving averages, no codebook loss) | "gradient" (codebook loss)
    ema_decay: float = 0.99
    ema_eps: float = 1e-5  # Laplace smoothing of the EMA cluster sizes
    init: str = "kmeans++"  # "kmeans++" | "random" (random data vectors) | "uniform" (U(-1/K, 1/K), data-free)
    kmeans_iters: int = 10  # Lloyd iterations after k-means++ seeding (0: seeding only)
    init_max_points: int = 65536  # data vectors used for the initialisation (random subset beyond this)
    dead_code_steps: int = 200  # restart codes unused for this many training steps (0 disables)
    lookup_chunk_elements: int = 1 << 24  # max N*K distances held at once (64 MiB in float32)

    def validate(self) -> None:
        for name in ("codebook_size", "code_dim", "init_max_points", "lookup_chunk_elements"):
            if getattr(self, name) < 1:
                raise GenbenchError(f"QuantizerConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("kmeans_iters", "dead_code_steps"):
            if getattr(self, name) < 0:
                raise GenbenchError(f"QuantizerConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.update not in UPDATES:
            raise GenbenchError(f"QuantizerConfig.update must be one of {UPDATES}, got {self.update!r}")
        if self.init not in INITS:
            raise GenbenchError(f"QuantizerConfig.init must be one of {INITS}, got {self.init!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise GenbenchError(f"QuantizerConfig.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.ema_eps <= 0:
            raise GenbenchError(f"QuantizerConfig.ema_eps must be > 0, got {self.ema_eps}")
        if self.beta < 0:
            raise GenbenchError(f"QuantizerConfig.beta must be >= 0, got {self.beta}")


@dataclass
class QuantizerOutput:
    """What one forward pass returns. Statistics are detached float scalars."""

    quantized: Tensor  # (B, D, *spatial) straight-through codes: value e_k(z), gradient of z
    indices: Tensor  # (B, *spatial) long
    loss: Tensor  # scalar: codebook loss (gradient mode only) + beta * commitment loss
    commitment_loss: Tensor  # mean ||z - sg[e]||^2 per element
    codebook_loss: Tensor  # mean ||sg[z] - e||^2 per element (0 in EMA mode: not part of the loss)
    perplexity: Tensor  # exp(entropy of the batch code histogram), between 1 and K
    usage: Tensor  # fraction of codes used in this batch
    window_usage: Tensor  # fraction of codes used in the last `dead_code_steps` training steps


# ----------------------------------------------------------------------------- helpers


def squared_distances(z: Tensor, codebook: Tensor, codebook_sq: Tensor | None = None) -> Tensor:
    """||z_n - e_k||^2 = ||z_n||^2 - 2 z_n.e_k + ||e_k||^2 for z (N, D), codebook (K, D) -> (N, K).

    One matrix product (torch.addmm); never materialises the (N, K, D) difference tensor.
    """
    codebook_sq = codebook.pow(2).sum(1) if codebook_sq is None else codebook_sq
    d = torch.addmm(codebook_sq.unsqueeze(0), z, codebook.t(), beta=1.0, alpha=-2.0)
    return d.add_(z.pow(2).sum(1, keepdim=True))


def nearest_code(z: Tensor, codebook: Tensor, chunk_elements: int = 1 << 24) -> Tensor:
    """argmin_k ||z_n - e_k||^2 for z (N, D), codebook (K, D) -> indices (N,) long.

    ||z_n||^2 is constant per row and does not change the argmin, so it is left out; rows are
    processed in chunks so that at most `chunk_elements` distances exist at once.
    """
    n, k = z.shape[0], codebook.shape[0]
    # baddbmm with a batch of one: same GEMM as addmm, but on CPU it skips addmm's multithreaded
    # broadcast of the bias, which costs milliseconds on small, busy machines
    codebook_sq = rearrange(codebook.pow(2).sum(1), "k -> 1 1 k")
    codebook_t = rearrange(codebook, "k d -> 1 d k")
    rows = max(1, chunk_elements // k)
    out = torch.empty(n, dtype=torch.long, device=z.device)
    for start in range(0, n, rows):
        zc = rearrange(z[start : start + rows], "n d -> 1 n d")
        out[start : start + rows] = torch.baddbmm(codebook_sq, zc, codebook_t, alpha=-2.0)[0].argmin(1)
    return out


def kmeans_plus_plus(x: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): first centre uniform, each next centre drawn
    with probability proportional to D(x)^2, the squared distance to the nearest centre so far.

    x (N, D) -> centres (k, D). O(N k D) time, O(N) extra memory.
    """
    n = x.shape[0]
    centres = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    first = torch.randint(n, (1,), generator=generator, device=x.device)
    centres[0] = x[first[0]]
    d2 = (x - centres[0]).pow(2).sum(1)
    for i in range(1, k):
        total = d2.sum()
        if total <= 0:  # every point already sits on a centre (fewer distinct points than k)
            idx = torch.randint(n, (1,), generator=generator, device=x.device)
        else:
            idx = torch.multinomial(d2 / total, 1, generator=generator)
        centres[i] = x[idx[0]]
        d2 = torch.minimum(d2, (x - centres[i]).pow(2).sum(1))
    return centres


def lloyd(x: Tensor, centres: Tensor, iters: int, chunk_elements: int = 1 << 24) -> Tensor:
    """`iters` Lloyd iterations of k-means (x (N, D), centres (k, D)); an empty cluster keeps its centre."""
    k = centres.shape[0]
    for _ in range(iters):
        idx = nearest_code(x, centres, chunk_elements)
        counts = torch.bincount(idx, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centres).index_add_(0, idx, x)
        nonempty = counts > 0
        centres = torch.where(nonempty[:, None], sums / counts.clamp(min=1)[:, None], centres)
    return centres


def flatten_channels_last(z: Tensor) -> Tensor:
    """(B, D, *spatial) -> (B * prod(spatial), D): one row per vector to quantize."""
    return rearrange(z, "b d ... -> b ... d").reshape(-1, z.shape[1])


# ----------------------------------------------------------------------------- the module


class VectorQuantizer(nn.Module):
    """Nearest-code vector quantization with EMA or gradient codebook updates.

    Input: encoder output z of shape (B, D, *spatial) (channel-first, e.g. (B, D, H, W)).
    forward(z) -> QuantizerOutput. The distance computation runs in float32 with autocast off,
    since bf16 distances would pick wrong codes.
    """

    def __init__(self, config: QuantizerConfig):
        super().__init__()
        config.validate()
        self.config = config
        k, d = config.codebook_size, config.code_dim
        # U(-1/K, 1/K) as in van den Oord 2017; replaced from data unless init == "uniform"
        codebook = torch.empty(k, d).uniform_(-1.0 / k, 1.0 / k)
        if config.update == "gradient":
            self.codebook = nn.Parameter(codebook)
        else:
            self.register_buffer("codebook", codebook)
            # each code starts as one pseudo-observation of itself, so e_k = m_k / N_k holds from step 0
            self.register_buffer("cluster_size", torch.ones(k))
            self.register_buffer("embed_sum", codebook.clone())
        self.register_buffer("initialised", torch.tensor(config.init == "uniform"))
        self.register_buffer("step", torch.tensor(0, dtype=torch.long))  # training forward passes so far
        # step at which each code last won the argmin (0: never) and at which it was last (re)seeded
        self.register_buffer("last_used", torch.zeros(k, dtype=torch.long))
        self.register_buffer("last_reset", torch.zeros(k, dtype=torch.long))

    # ------------------------------------------------------------------ initialisation

    @torch.no_grad()
    def init_from_data(self, z: Tensor, generator: torch.Generator | None = None) -> None:
        """Initialise the codebook from encoder outputs z (B, D, *spatial) or rows (N, D).

        "kmeans++": k-means++ seeding then `kmeans_iters` Lloyd iterations; "random": K distinct
        random vectors (with replacement when N < K); "uniform": nothing to do. At most
        `init_max_points` random vectors are used. EMA statistics restart as one pseudo-observation
        per code. Sets the `initialised` flag so that a resumed run does not initialise again.
        """
        cfg = self.config
        if z.dim() < 2 or z.shape[1] != cfg.code_dim:
            raise GenbenchError(
                f"VectorQuantizer.init_from_data: expected vectors with {cfg.code_dim} channels in dim 1, "
                f"got shape {tuple(z.shape)}"
            )
        x = flatten_channels_last(z).float()
        if cfg.init != "uniform":
            x = x.to(self.codebook.device)
            n = x.shape[0]
            if n > cfg.init_max_points:
                x = x[torch.randperm(n, generator=generator, device="cpu")[: cfg.init_max_points].to(x.device)]
                n = x.shape[0]
            if cfg.init == "kmeans++":
                centres = kmeans_plus_plus(x, cfg.codebook_size, generator)
                centres = lloyd(x, centres, cfg.kmeans_iters, cfg.lookup_chunk_elements)
            else:
                centres = x[self._pick(n, cfg.codebook_size, generator)]
            self.codebook.data.copy_(centres)
            if cfg.update == "ema":
                self.cluster_size.fill_(1.0)
                self.embed_sum.copy_(centres)
        self.initialised.fill_(True)
        self.last_reset.fill_(int(self.step))

    @staticmethod
    def _pick(n: int, k: int, generator: torch.Generator | None = None) -> Tensor:
        """k random row indices out of n: distinct when possible (so restarted codes differ)."""
        if k <= n:
            return torch.randperm(n, generator=generator)[:k]
        return torch.randint(n, (k,), generator=generator)

    # ------------------------------------------------------------------ lookup

    def lookup(self, z: Tensor) -> Tensor:
        """Indices (B, *spatial) of the nearest codes for z (B, D, *spatial)."""
        self._check_input(z)
        with torch.no_grad(), _autocast_off(z):
            flat = flatten_channels_last(z).float()
            idx = nearest_code(flat, self.codebook.float(), self.config.lookup_chunk_elements)
        return idx.view(z.shape[0], *z.shape[2:])

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Codes e_k for indices (B, *spatial) -> (B, D, *spatial) float32."""
        if indices.dtype not in (torch.int32, torch.int64):
            raise GenbenchError(f"VectorQuantizer: indices must be integer, got dtype {indices.dtype}")
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.config.codebook_size):
            raise GenbenchError(
                f"VectorQuantizer: indices must lie in [0, {self.config.codebook_size}), "
                f"got range [{int(indices.min())}, {int(indices.max())}]"
            )
        codes = F.embedding(indices.long(), self.codebook)
        return rearrange(codes, "b ... d -> b d ...")

    def _check_input(self, z: Tensor) -> None:
        if z.dim() < 2 or z.shape[1] != self.config.code_dim:
            raise GenbenchError(
                f"VectorQuantizer: expected input (B, {self.config.code_dim}, *spatial), got shape {tuple(z.shape)}"
            )

    # ------------------------------------------------------------------ forward

    def forward(self, z: Tensor) -> QuantizerOutput:
        self._check_input(z)
        cfg = self.config
        in_dtype = z.dtype
        with _autocast_off(z):
            z = z.float()
            flat = flatten_channels_last(z)
            if self.training and not bool(self.initialised):
                self.init_from_data(flat.detach())  # first training batch (prepare_stage does it on more data)
            with torch.no_grad():
                idx = nearest_code(flat.detach(), self.codebook.detach(), cfg.lookup_chunk_elements)
            codes_flat = F.embedding(idx, self.codebook)  # (N, D); carries gradient in "gradient" mode
            codes = rearrange(codes_flat.view(*z.shape[:1], *z.shape[2:], -1), "b ... d -> b d ...")

            commitment = F.mse_loss(z, codes.detach())
            if cfg.update == "gradient":
                codebook_loss = F.mse_loss(z.detach(), codes)
                loss = codebook_loss + cfg.beta * commitment
            else:
                codebook_loss = torch.zeros((), device=z.device)
                loss = cfg.beta * commitment
            quantized = z + (codes - z).detach()  # straight-through: forward e, backward identity

            counts = torch.bincount(idx, minlength=cfg.codebook_size)
            if self.training:
                self._train_step(flat.detach(), idx, counts)
            stats = histogram_stats(counts)
        return QuantizerOutput(
            quantized=quantized.to(in_dtype) if in_dtype in (torch.float16, torch.bfloat16) else quantized,
            indices=idx.view(z.shape[0], *z.shape[2:]),
            loss=loss,
            commitment_loss=commitment.detach(),
            codebook_loss=codebook_loss.detach(),
            perplexity=stats[0],
            usage=stats[1],
            window_usage=self.window_usage(),
        )

    # ------------------------------------------------------------------ training-time state

    @torch.no_grad()
    def _train_step(self, flat: Tensor, idx: Tensor, counts: Tensor) -> None:
        """One training step of bookkeeping: step counter, last-used steps, EMA update, restarts.

        Data-parallel training (torch.distributed initialised, several processes): the batch
        statistics n_k and sum z are summed over the processes first, as SyncBatchNorm does, so every
        process computes the codebook update one process would compute on the whole global batch."""
        cfg = self.config
        sums = torch.zeros_like(self.embed_sum).index_add_(0, idx, flat) if cfg.update == "ema" else None
        if _distributed():
            counts = counts.clone()
            torch.distributed.all_reduce(counts)
            if sums is not None:
                torch.distributed.all_reduce(sums)
        self.step += 1
        self.last_used.masked_fill_(counts > 0, self.step)
        if cfg.update == "ema":
            self.ema_update(flat, idx, counts, sums)
        if cfg.dead_code_steps > 0:
            self.restart_dead_codes(flat)

    @torch.no_grad()
    def ema_update(self, flat: Tensor, idx: Tensor, counts: Tensor | None = None, sums: Tensor | None = None) -> None:
        """EMA codebook update (van den Oord 2017 app. A.1) with Laplace-smoothed cluster sizes:

        N_k <- d N_k + (1-d) n_k;  m_k <- d m_k + (1-d) sum_{i: idx_i = k} z_i;
        e_k = m_k / ((N_k + eps) / (N + K eps) * N).

        `counts` (n_k) and `sums` are computed from `idx` and `flat` unless given (summed over processes).
        """
        cfg = self.config
        if cfg.update != "ema":
            raise GenbenchError("VectorQuantizer.ema_update: only available with update='ema'")
        counts = torch.bincount(idx, minlength=cfg.codebook_size) if counts is None else counts
        sums = torch.zeros_like(self.embed_sum).index_add_(0, idx, flat) if sums is None else sums
        d = cfg.ema_decay
        self.cluster_size.mul_(d).add_(counts.to(self.cluster_size.dtype), alpha=1 - d)
        self.embed_sum.mul_(d).add_(sums, alpha=1 - d)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + cfg.ema_eps) / (n + cfg.codebook_size * cfg.ema_eps) * n
        self.codebook.copy_(self.embed_sum / smoothed.unsqueeze(1))

    def dead_codes(self) -> Tensor:
        """Boolean mask (K,): codes neither chosen nor re-seeded in the last `dead_code_steps` steps."""
        idle = self.step - torch.maximum(self.last_used, self.last_reset)
        return idle >= self.config.dead_code_steps

    @torch.no_grad()
    def restart_dead_codes(self, flat: Tensor) -> int:
        """Move every dead code onto a random vector of `flat` (N, D) (Jukebox random restarts).

        Draws use torch's global RNG. EMA statistics of a restarted code restart as one
        pseudo-observation of its new value. Returns the number of codes restarted.
        """
        dead = self.dead_codes().nonzero().squeeze(1)
        n_dead = dead.numel()
        if n_dead == 0:
            return 0
        new = flat[self._pick(flat.shape[0], n_dead).to(flat.device)].to(self.codebook.dtype)
        self.codebook.data[dead] = new
        if self.config.update == "ema":
            self.cluster_size[dead] = 1.0
            self.embed_sum[dead] = new
        self.last_reset[dead] = self.step
        return n_dead

    def window_usage(self) -> Tensor:
        """Fraction of codes chosen at least once in the last `dead_code_steps` training steps
        (all training steps so far when restarts are disabled)."""
        window = self.config.dead_code_steps or max(int(self.step), 1)
        used = (self.last_used > 0) & (self.last_used > self.step - window)
        return used.float().mean()


def histogram_stats(counts: Tensor) -> tuple[Tensor, Tensor]:
    """(perplexity, usage) of a code histogram (K,): exp(-sum p log p) and the fraction of nonzero bins."""
    p = counts.float() / counts.sum().clamp(min=1)
    entropy = -(p * torch.log(p.clamp(min=1e-12))).sum()
    return entropy.exp(), (counts > 0).float().mean()


def codebook_stats(indices: Tensor, codebook_size: int) -> dict[str, float]:
    """Perplexity and usage of the codes in `indices` (any shape): for evaluation over a dataset."""
    counts = torch.bincount(indices.reshape(-1).long(), minlength=codebook_size)
    perplexity, usage = histogram_stats(counts)
    return {"perplexity": float(perplexity), "usage": float(usage), "log2_perplexity": math.log2(float(perplexity))}


def _distributed() -> bool:
    """Several data-parallel processes train together (torchrun: see genbench.training.distributed)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _autocast_off(z: Tensor) -> torch.autocast:
    """Autocast disabled on z's device type: the lookup and EMA statistics need float32."""
    return torch.autocast(device_type=z.device.type, enabled=False)
