"""Networks genbench trains for itself, once, and caches by content hash.

No pretrained weights can be downloaded here, so the two auxiliary networks are trained locally on
the dataset at hand: the evaluation classifier behind FD/KID/PRDC (genbench.evaluation.features)
and VQ-GAN's perceptual network (genbench.nets.perceptual). Both use the two pieces below.

``train_seeded``: AdamW with a cosine learning-rate decay to 0, on batches drawn without
replacement within an epoch, on one CPU thread, every random draw from one seeded generator (and
the parameter init from the seed), torch's global RNG left as it was. On one thread the float
reductions happen in a fixed order, so a retrain on the same machine reproduces the weights bit
for bit: a cache is derived data. (On a shared 2-core machine a second OpenMP thread also mostly
spins waiting: measured 3-25x slower per step under load.)

Cache entry: ``<root>/<kind>/<key>/`` holds ``model.safetensors`` and ``config.json`` (whatever the
owner records, plus the weights' sha256 and the torch version), each written atomically,
config.json last, so a folder without it is an unfinished write. ``load_entry`` checks the sha256
and the fields the caller expects; a corrupt or stale entry is reported, and the caller retrains.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

# cache_root lives with the other file helpers (the data layer's folder cache uses it too)
from genbench.files import CACHE_ENV_VAR, atomic_write_bytes, cache_root, sha256  # noqa: F401

TRAIN_THREADS = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def weights_bytes(model: nn.Module) -> bytes:
    return save_safetensors({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})


def save_entry(directory: Path, model: nn.Module, record: dict[str, Any]) -> str:
    """Write ``model``'s weights, then ``config.json`` = ``record`` + the weights' sha256; returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = weights_bytes(model)
    digest = sha256(weights)
    config = {**record, "torch_version": torch.__version__, "weights_sha256": digest}
    atomic_write_bytes(directory / WEIGHTS_FILE, weights)
    atomic_write_bytes(directory / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
    return digest


def load_entry(directory: Path, expect: dict[str, Any]) -> tuple[dict | None, dict[str, Tensor] | None, str]:
    """(config, weights, "") of a valid entry, else (None, None, why not). Valid: config.json is a JSON
    object, holds every ``expect`` field with that value, and the weights match its sha256."""
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file():
        return None, None, "no cache entry"
    try:
        config = json.loads(config_path.read_text())
        weights = weights_path.read_bytes()
    except (OSError, ValueError, RecursionError) as e:
        return None, None, f"unreadable ({e})"
    if not isinstance(config, dict):
        return None, None, f"{CONFIG_FILE} is not a JSON object"
    stale = [k for k, v in expect.items() if config.get(k) != v]
    if stale:
        return None, None, f"{CONFIG_FILE} records other {', '.join(stale)} than the current code and data"
    if sha256(weights) != config.get("weights_sha256"):
        return None, None, f"{WEIGHTS_FILE} does not match the sha256 recorded in {CONFIG_FILE} (corrupt or modified)"
    try:
        return config, load_safetensors(weights), ""
    except Exception as e:  # safetensors raises several types on garbage
        return None, None, f"{WEIGHTS_FILE} is not a valid safetensors file ({e})"


def cosine_lr(lr: float, step: int, steps: int) -> float:
    """lr * (1 + cos(pi step / steps)) / 2: from lr at step 0 to 0 at the end."""
    return lr * (0.5 * (1 + math.cos(math.pi * step / steps)))


def train_seeded(
    build: Callable[[], nn.Module],
    batch_loss: Callable[[nn.Module, Tensor], Tensor],
    num_items: int,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    generator: torch.Generator,
    log_every: int = 0,
    what: str = "network",
) -> nn.Module:
    """Build a network (parameters initialised from ``seed``) and train it for ``steps`` AdamW steps
    with a cosine decay of ``lr``; ``batch_loss(model, indices)`` gives the loss of the items at
    ``indices`` (a batch drawn from a permutation of ``num_items``, reshuffled each epoch, by
    ``generator``). Returns the model in eval mode. Gradients are on even when called under no_grad
    (the trainer runs VQ-GAN's prepare_stage, which may train the perceptual network, without them)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.manual_seed(seed)
            model = build()
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
            model.train()
            bs = min(batch_size, num_items)
            order, cursor = torch.randperm(num_items, generator=generator), 0
            for step in range(steps):
                if cursor + bs > num_items:
                    order, cursor = torch.randperm(num_items, generator=generator), 0
                idx = order[cursor: cursor + bs]
                cursor += bs
                for group in opt.param_groups:
                    group["lr"] = cosine_lr(lr, step, steps)
                loss = batch_loss(model, idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if log_every and (step + 1) % log_every == 0:
                    print(f"{what} step {step + 1}/{steps}: loss {loss.item():.4f}", flush=True)
        model.eval()
        return model
    finally:
        torch.set_num_threads(threads)
