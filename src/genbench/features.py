"""The feature network behind FD / KID / PRDC: a small CNN classifier trained per dataset.

FID's Inception-v3 can't be downloaded here and was never trained on 8x8 digits or
Fashion-MNIST anyway, so genbench trains its own judge once per dataset, offline:

    image (C, H, W) in [0, 1]
      -> 3 blocks [conv3x3 -> GroupNorm -> ReLU] (widths 16, 32, 64), 2x2 average pooling
         after the first two (ceil mode: 28 -> 14 -> 7, 8 -> 4 -> 2)
      -> average pooling to at most 7x7 (a no-op for 8x8 and 28x28 images), flatten
      -> linear -> 128-d features                  (the role of Inception's pool3)
      -> ReLU -> linear head -> class logits       (for accuracy and class histograms)

The features are the penultimate layer before its ReLU (dense, no dead dimensions), centred
and scaled by one number fitted on the training set (``FeatureCNN.features``). The map
is flattened rather than pooled further because where a part sits matters on these centred
datasets (in 400-step Fashion-MNIST trials, pooling to 4x4 / 2x2 cost 3 / 8 points).
GroupNorm rather than BatchNorm: an image's features never depend on which other images
share its batch, nor on train/eval mode.

Training is seeded and single-threaded on CPU (AdamW, cosine-decayed learning rate, random
shifts of up to ``max_shift`` pixels as augmentation), so a retrain on the same machine
reproduces the same weights bit for bit. Measured with ``python -m genbench.features NAME``
(float32; bf16 autocast measured 5x slower per step on these AVX2 CPUs without native bf16):
    digits        (300 steps)   98.6% test accuracy,    7 s CPU
    fashion-mnist (2500 steps)  92.1% test accuracy,  290 s CPU
(CPU seconds of the one training thread; wall time grows with whatever else shares the cores:
13-16 minutes for Fashion-MNIST beside other jobs at a load average of 8 on 2 cores).

Cache layout (``get_feature_network``): ``<cache_dir>/<dataset.name>-<data_hash[:16]>/`` holds
``model.safetensors`` and ``config.json`` (data hash, network and training configs, ``VERSION``,
test accuracy, the weights' sha256), each written atomically; config.json is written last, so
a folder without it is an unfinished write. On load the weights' sha256 is checked: when the
file is corrupt, or the stored version/configs differ from the current code's, the network is
retrained with a warning and the cache entry replaced. That is safe because training is
deterministic: a cache is derived data.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from genbench.errors import GenbenchError
from genbench.utils import atomic_write_bytes, default, exists

# Bump when a code change alters trained weights or features: cached networks of another
# version are retrained (configs alone can't see such changes).
VERSION = 2
CACHE_ENV_VAR = "GENBENCH_CACHE"
# Training runs single-threaded: on a shared 2-core machine a second OpenMP thread mostly spins
# waiting (measured 3-25x slower per step under load), and one thread keeps the float
# reduction order, hence the trained weights, independent of the machine's core count.
TRAIN_THREADS = 1
STANDARDIZATION_IMAGES = 10_000  # the first train images, un-augmented, fix the feature mean/scale
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# ---------------------------------------------------------------------------------------------
# configs


@dataclass
class FeatureNetConfig:
    image_shape: tuple[int, int, int]  # (C, H, W) of the images it takes
    num_classes: int
    widths: tuple[int, ...] = (16, 32, 64)  # one conv block each, 2x2 average pooling between blocks
    groups: int = 8  # GroupNorm groups (each width must be divisible by it)
    max_pool_size: int = 7  # the last block's map is average-pooled to at most this side, then flattened
    feature_dim: int = 128

    @property
    def pooled_size(self) -> tuple[int, int]:
        """Side lengths of the flattened map: 8x8 -> 2x2, 28x28 -> 7x7, 64x64 -> 7x7."""
        shrink = 2 ** (len(self.widths) - 1)
        return tuple(min(self.max_pool_size, math.ceil(side / shrink)) for side in self.image_shape[1:])


@dataclass
class FeatureTrainConfig:
    steps: int = 2500
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4  # AdamW
    max_shift: int = 1  # augmentation: random translation by up to this many pixels
    seed: int = 0


# Per dataset: short enough to train quickly, long enough for the target test accuracy
# (digits > 95%, fashion-mnist >= 90%). Other datasets get FeatureTrainConfig().
# Fashion-MNIST trials at 2500 steps: max_shift 1 -> 92.1%, 2 -> 91.5%.
TRAIN_PRESETS: dict[str, FeatureTrainConfig] = {
    "digits": FeatureTrainConfig(steps=300, batch_size=64, max_shift=1),
    "fashion-mnist": FeatureTrainConfig(steps=2500, batch_size=128, max_shift=1),
}


def default_train_config(dataset_name: str) -> FeatureTrainConfig:
    return TRAIN_PRESETS.get(dataset_name, FeatureTrainConfig())


# ---------------------------------------------------------------------------------------------
# the network


class FeatureCNN(nn.Module):
    def __init__(self, config: FeatureNetConfig):
        super().__init__()
        self.config = config
        blocks, channels = [], config.image_shape[0]
        for i, width in enumerate(config.widths):
            blocks += [nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(config.groups, width), nn.ReLU()]
            if i < len(config.widths) - 1:
                blocks.append(nn.AvgPool2d(2, ceil_mode=True))
            channels = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(config.pooled_size)  # identity for 8x8 and 28x28 images
        self.to_features = nn.Linear(channels * math.prod(config.pooled_size), config.feature_dim)
        self.head = nn.Linear(config.feature_dim, config.num_classes)
        # set by fit_feature_standardization after training; saved with the weights
        self.register_buffer("feature_mean", torch.zeros(config.feature_dim))
        self.register_buffer("feature_scale", torch.ones(()))

    def raw_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, feature_dim): the penultimate layer, before its ReLU."""
        h = rearrange(self.pool(self.blocks(x)), "b c h w -> b (c h w)")
        return self.to_features(h)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Raw features centred on the training set's mean and divided by one scalar, the RMS
        of their per-dimension standard deviations: one global scale, so Euclidean geometry
        (PRDC) is unchanged, while x.y/d is O(1) as KID's kernel (x.y/d + 1)^3 assumes."""
        return (self.raw_features(x) - self.feature_mean) / self.feature_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.raw_features(x)))

    @torch.no_grad()
    def fit_feature_standardization(self, images: torch.Tensor, batch_size: int = 512) -> None:
        self.eval()
        raw = torch.cat([self.raw_features(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
        self.feature_mean.copy_(raw.mean(0))
        self.feature_scale.copy_(raw.var(0).mean().sqrt())


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by its own integer (dy, dx) in [-max_shift, max_shift]^2, filling
    with zeros (the background of digits and Fashion-MNIST)."""
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b, 1), generator=generator)
    rows = dy + torch.arange(h)  # (B, H): source rows in the padded image
    cols = dx + torch.arange(w)
    out = padded[torch.arange(b)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return rearrange(out, "b h w c -> b c h w").contiguous()


# ---------------------------------------------------------------------------------------------
# training


@torch.no_grad()
def _predict_logits(model: FeatureCNN, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def _accuracy(model: FeatureCNN, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((_predict_logits(model, images, 512).argmax(1) == labels).double().mean())


def train_feature_cnn(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    net_config: FeatureNetConfig,
    train_config: FeatureTrainConfig,
    log_every: int = 0,
) -> FeatureCNN:
    """Train a FeatureCNN on CPU with AdamW and a cosine learning-rate decay to 0, on random
    batches (with replacement across steps, without within an epoch) of shift-augmented images.
    Everything random comes from one generator seeded with ``train_config.seed``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        return _train_loop(train, train_labels, net_config, train_config, log_every)
    finally:
        torch.set_num_threads(threads)


def _train_loop(train, train_labels, net_config, train_config, log_every) -> FeatureCNN:
    generator = torch.Generator().manual_seed(train_config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train_config.seed)  # parameter init
        model = FeatureCNN(net_config)
    opt = torch.optim.AdamW(model.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / train_config.steps))
    )
    model.train()
    order, cursor = torch.randperm(len(train), generator=generator), 0
    for step in range(train_config.steps):
        if cursor + train_config.batch_size > len(train):
            order, cursor = torch.randperm(len(train), generator=generator), 0
        idx = order[cursor : cursor + train_config.batch_size]
        cursor += train_config.batch_size
        x = random_shift(train[idx], train_config.max_shift, generator)
        loss = F.cross_entropy(model(x), train_labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"feature net step {step + 1}/{train_config.steps}: loss {loss.item():.4f}", flush=True)
    model.fit_feature_standardization(train[:STANDARDIZATION_IMAGES])
    return model


# ---------------------------------------------------------------------------------------------
# the wrapped, cached network


def dataset_hash(dataset) -> str:
    """sha256 over the dataset's name, the shapes and raw bytes of train/test images and labels."""
    h = hashlib.sha256()
    h.update(dataset.name.encode())
    for t in (dataset.train, dataset.test, dataset.train_labels, dataset.test_labels):
        if exists(t):
            array = np.ascontiguousarray(t.detach().cpu().numpy())
            h.update(f"{array.dtype}{array.shape}".encode())
            h.update(memoryview(array).cast("B"))
        else:
            h.update(b"none")
    return h.hexdigest()


@dataclass
class FeatureNetwork:
    """A trained FeatureCNN plus what it was trained on. Always evaluated on CPU in float32,
    so features (and every metric computed from them) do not depend on the sampling device."""

    model: FeatureCNN
    shape: tuple[int, int, int]  # (C, H, W) it was trained on
    dataset_name: str
    data_hash: str
    test_accuracy: float
    train_seconds: float = 0.0  # wall clock: grows with whatever else shares the cores
    train_cpu_seconds: float = 0.0
    directory: Path | None = None  # cache folder it lives in, if any
    meta: dict = field(default_factory=dict)

    @property
    def feature_dim(self) -> int:
        return self.model.config.feature_dim

    @property
    def num_classes(self) -> int:
        return self.model.config.num_classes

    def _check_images(self, images) -> torch.Tensor:
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if not isinstance(images, torch.Tensor):
            raise GenbenchError(f"images: expected a tensor or numpy array, got {type(images).__name__}")
        if images.ndim != 4 or tuple(images.shape[1:]) != tuple(self.shape):
            raise GenbenchError(
                f"images: the {self.dataset_name} feature network takes (N, {', '.join(map(str, self.shape))}) "
                f"images, got shape {tuple(images.shape)}"
            )
        images = images.detach().to("cpu", torch.float32)
        if images.numel() and not torch.isfinite(images).all():
            raise GenbenchError("images: contain NaN or inf values")
        if images.numel() and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
            raise GenbenchError(
                f"images: must lie in [0, 1], found range [{images.min():.3g}, {images.max():.3g}]"
            )
        return images

    def features(self, images, batch_size: int = 512) -> np.ndarray:
        """(N, C, H, W) images in [0, 1] -> (N, feature_dim) float32 features."""
        images = self._check_images(images)
        self.model.eval()
        with torch.no_grad():
            feats = [self.model.features(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        return torch.cat(feats).numpy() if feats else np.zeros((0, self.feature_dim), np.float32)

    def predict(self, images, batch_size: int = 512) -> np.ndarray:
        """(N, C, H, W) images in [0, 1] -> (N,) int64 predicted class labels."""
        images = self._check_images(images)
        return _predict_logits(self.model, images, batch_size).argmax(1).numpy()


def default_cache_dir() -> Path:
    """``$GENBENCH_CACHE/features`` when set, else ``~/.cache/genbench/features``."""
    env = os.environ.get(CACHE_ENV_VAR, "").strip()
    return Path(env).expanduser() / "features" if env else Path.home() / ".cache" / "genbench" / "features"


def _configs(dataset) -> tuple[FeatureNetConfig, FeatureTrainConfig]:
    return FeatureNetConfig(tuple(dataset.shape), dataset.num_classes), default_train_config(dataset.name)


def _json_ready(config) -> dict:
    return json.loads(json.dumps(asdict(config)))  # tuples -> lists, as they come back from disk


def _require_labels(dataset) -> None:
    if not exists(dataset.train_labels) or not exists(dataset.num_classes):
        raise GenbenchError(
            f"dataset {dataset.name!r} has no labels: the feature network is a classifier trained on "
            "labelled train images, so FD/KID/PRDC are unavailable for it"
        )


def train_feature_network(dataset, log_every: int = 0) -> FeatureNetwork:
    """Train (no cache) a FeatureNetwork on a labelled ImageDataset and measure its test accuracy."""
    _require_labels(dataset)
    net_config, train_config = _configs(dataset)
    start, cpu_start = time.perf_counter(), time.process_time()
    model = train_feature_cnn(dataset.train, dataset.train_labels, net_config, train_config, log_every)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return FeatureNetwork(
        model=model,
        shape=tuple(dataset.shape),
        dataset_name=dataset.name,
        data_hash=dataset_hash(dataset),
        test_accuracy=_accuracy(model, dataset.test, dataset.test_labels),
        train_seconds=seconds,
        train_cpu_seconds=cpu_seconds,
        meta={"net_config": _json_ready(net_config), "train_config": _json_ready(train_config)},
    )


def _save(net: FeatureNetwork, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    weights = save_safetensors({k: v.contiguous() for k, v in net.model.state_dict().items()})
    config = {
        "dataset": net.dataset_name,
        "data_hash": net.data_hash,
        "shape": list(net.shape),
        "test_accuracy": net.test_accuracy,
        "train_seconds": net.train_seconds,
        "train_cpu_seconds": net.train_cpu_seconds,
        "version": VERSION,
        "torch_version": torch.__version__,
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        **net.meta,
    }
    atomic_write_bytes(directory / WEIGHTS_FILE, weights)
    atomic_write_bytes(directory / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
    net.directory = directory


def _load(directory: Path, dataset, data_hash: str) -> FeatureNetwork | None:
    """The cached network, or None (with a warning saying why) when it must be retrained."""
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file():
        return None  # never trained here, or interrupted before config.json was written
    net_config, train_config = _configs(dataset)
    try:
        config = json.loads(config_path.read_text())
        weights = weights_path.read_bytes()
        if not isinstance(config, dict) or config.get("data_hash") != data_hash:
            raise _StaleCache(f"{CONFIG_FILE} does not belong to this dataset")
        if hashlib.sha256(weights).hexdigest() != config.get("weights_sha256"):
            raise _StaleCache(
                f"{WEIGHTS_FILE} does not match the sha256 recorded in {CONFIG_FILE} (corrupt or modified)"
            )
        if (
            config.get("version") != VERSION
            or config.get("net_config") != _json_ready(net_config)
            or config.get("train_config") != _json_ready(train_config)
        ):
            raise _StaleCache("it was trained with different network/training settings than the current code's")
        model = FeatureCNN(net_config)
        model.load_state_dict(load_safetensors(weights))
        test_accuracy = float(config["test_accuracy"])
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
        # json.JSONDecodeError is a ValueError; load_state_dict raises RuntimeError on a mismatch
        warnings.warn(f"feature network cache {directory}: {e}; retraining", stacklevel=3)
        return None
    model.eval()
    return FeatureNetwork(
        model=model,
        shape=tuple(dataset.shape),
        dataset_name=dataset.name,
        data_hash=data_hash,
        test_accuracy=test_accuracy,
        train_seconds=float(config.get("train_seconds", 0.0)),
        train_cpu_seconds=float(config.get("train_cpu_seconds", 0.0)),
        directory=directory,
        meta={"net_config": config["net_config"], "train_config": config["train_config"]},
    )


class _StaleCache(ValueError):
    """A cache entry that exists but must not be used."""


def get_feature_network(dataset, cache_dir: str | os.PathLike | None = None, log_every: int = 0) -> FeatureNetwork:
    """The feature network for ``dataset`` (a labelled ``genbench.data.ImageDataset``): loaded
    from ``<cache_dir>/<name>-<data_hash[:16]>/`` when a valid entry is there, else trained and
    saved there. ``cache_dir`` defaults to ``default_cache_dir()``. Datasets without labels
    (``folder``) raise GenbenchError: there is nothing to train the classifier on."""
    _require_labels(dataset)
    data_hash = dataset_hash(dataset)
    directory = Path(default(cache_dir, default_cache_dir())).expanduser() / f"{dataset.name}-{data_hash[:16]}"
    net = _load(directory, dataset, data_hash)
    if not exists(net):
        net = train_feature_network(dataset, log_every)
        _save(net, directory)
    return net


if __name__ == "__main__":
    # Train (or load) and report: python -m genbench.features fashion-mnist [cache_dir]
    import sys

    from genbench.data import load_dataset

    dataset = load_dataset(sys.argv[1] if len(sys.argv) > 1 else "digits")
    start = time.perf_counter()
    net = get_feature_network(dataset, sys.argv[2] if len(sys.argv) > 2 else None, log_every=250)
    print(
        f"{dataset.name}: test accuracy {net.test_accuracy:.4f}, training {net.train_seconds:.1f} s "
        f"({net.train_cpu_seconds:.1f} CPU s), "
        f"this call {time.perf_counter() - start:.1f} s, cache {net.directory}"
    )
