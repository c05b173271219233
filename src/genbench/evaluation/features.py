"""The feature network behind FD / KID / PRDC, trained once per dataset and cached by its content hash.

Two kinds (``KINDS``): a labelled dataset gets the classifier of genbench.nets.classifier, trained
on its labelled train split (below); a dataset without labels (a folder of one's own images, the
emoji) gets the contrastive network of genbench.evaluation.contrastive, trained self-supervised on
the train split. ``get_feature_network(dataset, kind=...)`` picks either explicitly (a labelled
dataset can be judged by both: docs/benchmarks.md compares their rankings on Fashion-MNIST).

Training (genbench.nets.local.train_seeded: AdamW, cosine-decayed learning rate, one CPU thread,
seeded; random shifts of up to ``max_shift`` pixels as augmentation) reproduces the same weights
bit for bit on the same machine. Measured with ``genbench features train --dataset NAME``
(float32; bf16 autocast measured 5x slower per step on AVX2 CPUs without native bf16):
    digits        (300 steps)   98.6% test accuracy,    7 s CPU
    fashion-mnist (2500 steps)  92.1% test accuracy,  290 s CPU
(CPU seconds of the one training thread; wall time grows with whatever else shares the cores:
13-16 minutes for Fashion-MNIST beside other jobs at a load average of 8 on 2 cores).

Cache (``get_feature_network``): ``<cache>/features/<dataset.name>-<data_hash[:16]>/`` (the
contrastive network: ``<dataset.name>-contrastive-<data_hash[:16]>/``), recording
the data hash, ``VERSION``, the network and training configs and the test accuracy. When the
weights are corrupt, or the recorded version/configs differ from the current code's, the network
is retrained with a warning and the entry replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genbench.errors import GenbenchError
from genbench.nets.classifier import (
    ContrastiveCNN,
    ContrastiveNetConfig,
    FeatureCNN,
    FeatureNetConfig,
)
from genbench.nets.local import cache_root, load_entry, save_entry, train_seeded
from genbench.utils import default, exists

from . import contrastive
from .augment import random_shift

# Bump when a code change alters trained weights or features: cached networks of another
# version are retrained (configs alone can't see such changes).
VERSION = 2
CACHE_SUBDIR = "features"
KINDS = ("classifier", "contrastive")
SCORE_NAMES = {"classifier": "test accuracy", "contrastive": "test view-retrieval accuracy"}
HASH_CHUNK_IMAGES = 4096  # images converted to float32 at a time while hashing
STANDARDIZATION_IMAGES = 10_000  # the first train images, un-augmented, fix the feature mean/scale


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
    """Train a FeatureCNN with genbench.nets.local.train_seeded on shift-augmented batches, then fit
    its feature standardization on the first STANDARDIZATION_IMAGES un-augmented train images."""
    generator = torch.Generator().manual_seed(train_config.seed)

    def batch_loss(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        x = random_shift(train[idx], train_config.max_shift, generator)
        return F.cross_entropy(model(x), train_labels[idx])

    model = train_seeded(
        lambda: FeatureCNN(net_config), batch_loss, len(train), steps=train_config.steps,
        batch_size=train_config.batch_size, lr=train_config.lr, weight_decay=train_config.weight_decay,
        seed=train_config.seed, generator=generator, log_every=log_every, what="feature net",
    )
    model.fit_feature_standardization(train[:STANDARDIZATION_IMAGES])
    return model


class _TrainImages:
    """A dataset's train images, indexed like a tensor but converted to float32 only where indexed
    (a batch at a time), so training never holds the whole split as float32."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset.train_pixels)

    def __getitem__(self, index) -> torch.Tensor:
        return self.dataset.float_images("train", index)


# ---------------------------------------------------------------------------------------------
# the wrapped, cached network


def dataset_hash(dataset) -> str:
    """sha256 over the dataset's name, the shapes and float32 bytes of train/test images (converted
    HASH_CHUNK_IMAGES at a time: the bytes of the whole float32 split, without holding it) and labels."""
    h = hashlib.sha256()
    h.update(dataset.name.encode())
    for split in ("train", "test"):
        pixels = dataset.train_pixels if split == "train" else dataset.test_pixels
        h.update(f"float32{tuple(pixels.shape)}".encode())
        for i in range(0, len(pixels), HASH_CHUNK_IMAGES):
            chunk = dataset.float_images(split, slice(i, i + HASH_CHUNK_IMAGES)).detach().cpu().contiguous().numpy()
            h.update(memoryview(chunk).cast("B"))
    for t in (dataset.train_labels, dataset.test_labels):
        if exists(t):
            array = np.ascontiguousarray(t.detach().cpu().numpy())
            h.update(f"{array.dtype}{array.shape}".encode())
            h.update(memoryview(array).cast("B"))
        else:
            h.update(b"none")
    return h.hexdigest()


@dataclass
class FeatureNetwork:
    """A trained feature network (``kind``: a FeatureCNN classifier or a ContrastiveCNN) plus what it
    was trained on. Always evaluated on CPU in float32, so features (and every metric computed from
    them) do not depend on the sampling device."""

    model: FeatureCNN
    shape: tuple[int, int, int]  # (C, H, W) it was trained on
    dataset_name: str
    data_hash: str
    test_accuracy: float  # the classifier's test accuracy; the contrastive net's view-retrieval accuracy
    train_seconds: float = 0.0  # wall clock: grows with whatever else shares the cores
    train_cpu_seconds: float = 0.0
    directory: Path | None = None  # cache folder it lives in, if any
    meta: dict = field(default_factory=dict)
    kind: str = "classifier"

    @property
    def score_name(self) -> str:
        return SCORE_NAMES[self.kind]

    @property
    def feature_dim(self) -> int:
        return self.model.config.feature_dim

    @property
    def num_classes(self) -> int:
        """Classes of the classifier; modes (k-means centres of the train features) of the contrastive net."""
        return self.model.config.num_modes if self.kind == "contrastive" else self.model.config.num_classes

    def describe(self) -> dict:
        """What a comparison records of it (result["feature_network"])."""
        return {"kind": self.kind, "test_accuracy": self.test_accuracy, "score_name": self.score_name,
                "data_hash": self.data_hash, "feature_dim": self.feature_dim, "num_classes": self.num_classes}

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
        """(N, C, H, W) images in [0, 1] -> (N,) int64: the predicted class (classifier) or the
        nearest mode (contrastive)."""
        images = self._check_images(images)
        if self.kind == "contrastive":
            self.model.eval()
            with torch.no_grad():
                modes = [self.model.predict_modes(images[i: i + batch_size]) for i in range(0, len(images), batch_size)]
            return torch.cat(modes).numpy() if modes else np.zeros(0, np.int64)
        return _predict_logits(self.model, images, batch_size).argmax(1).numpy()


def default_cache_dir() -> Path:
    """``$GENBENCH_CACHE/features`` when set, else ``~/.cache/genbench/features``."""
    return cache_root(CACHE_SUBDIR)


def default_kind(dataset) -> str:
    """The classifier where the dataset has labels, else the contrastive network."""
    return "classifier" if exists(dataset.train_labels) and exists(dataset.num_classes) else "contrastive"


def check_kind(dataset, kind: str | None) -> str:
    """``kind``, or the dataset's default kind when None; a GenbenchError when it can't serve ``dataset``."""
    kind = default(kind, default_kind(dataset))
    if kind not in KINDS:
        raise GenbenchError(f"unknown feature network {kind!r}; valid: {', '.join(KINDS)}")
    if kind == "classifier" and default_kind(dataset) != "classifier":
        raise GenbenchError(
            f"dataset {dataset.name!r} has no labels: the classifier feature network needs labelled train "
            "images; use the contrastive one (the default for unlabelled data)"
        )
    return kind


def _configs(dataset, kind: str) -> tuple:
    if kind == "contrastive":
        return ContrastiveNetConfig(tuple(dataset.shape)), contrastive.default_train_config(dataset.name)
    return FeatureNetConfig(tuple(dataset.shape), dataset.num_classes), default_train_config(dataset.name)


def _build(kind: str, net_config) -> FeatureCNN:
    return ContrastiveCNN(net_config) if kind == "contrastive" else FeatureCNN(net_config)


def _json_ready(config) -> dict:
    return json.loads(json.dumps(asdict(config)))  # tuples -> lists, as they come back from disk


def train_feature_network(dataset, log_every: int = 0, kind: str | None = None) -> FeatureNetwork:
    """Train (no cache) a FeatureNetwork of ``kind`` (default: ``default_kind``) on an ImageDataset
    and measure its test score."""
    kind = check_kind(dataset, kind)
    net_config, train_config = _configs(dataset, kind)
    start, cpu_start = time.perf_counter(), time.process_time()
    if kind == "contrastive":
        model = contrastive.train_contrastive_cnn(dataset, net_config, train_config, log_every)
    else:
        model = train_feature_cnn(_TrainImages(dataset), dataset.train_labels, net_config, train_config, log_every)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    test = dataset.float_images("test")
    if kind == "contrastive":
        score = contrastive.view_retrieval_accuracy(model, test, train_config)
    else:
        score = _accuracy(model, test, dataset.test_labels)
    return FeatureNetwork(
        model=model,
        shape=tuple(dataset.shape),
        dataset_name=dataset.name,
        data_hash=dataset_hash(dataset),
        test_accuracy=score,
        train_seconds=seconds,
        train_cpu_seconds=cpu_seconds,
        meta={"net_config": _json_ready(net_config), "train_config": _json_ready(train_config)},
        kind=kind,
    )


def _load(directory: Path, dataset, data_hash: str, kind: str) -> FeatureNetwork | None:
    """The cached network, or None (with a warning saying why, unless there is none) to retrain."""
    net_config, train_config = _configs(dataset, kind)
    expect = {"data_hash": data_hash, "version": VERSION, "net_config": _json_ready(net_config),
              "train_config": _json_ready(train_config)}
    if kind != "classifier":  # classifier entries predate the field
        expect["kind"] = kind
    config, weights, why = load_entry(directory, expect)
    if config is not None:
        model = _build(kind, net_config)
        try:
            model.load_state_dict(weights)
            test_accuracy = float(config["test_accuracy"])
        except (RuntimeError, KeyError, TypeError, ValueError) as e:
            config, why = None, f"weights or record do not fit the network ({e})"
    if config is None:
        if why != "no cache entry":
            warnings.warn(f"feature network cache {directory}: {why}; retraining", stacklevel=3)
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
        kind=kind,
    )


def get_feature_network(dataset, cache_dir: str | os.PathLike | None = None, log_every: int = 0,
                        kind: str | None = None) -> FeatureNetwork:
    """The feature network of ``kind`` for ``dataset`` (a ``genbench.data.ImageDataset``; ``kind``
    defaults to ``default_kind``: the classifier for labelled data, the contrastive network for the
    rest): loaded from ``<cache_dir>/<name>[-contrastive]-<data_hash[:16]>/`` when a valid entry is
    there, else trained and saved there. ``cache_dir`` defaults to ``default_cache_dir()``."""
    kind = check_kind(dataset, kind)
    data_hash = dataset_hash(dataset)
    infix = "" if kind == "classifier" else f"-{kind}"
    directory = cache_root(CACHE_SUBDIR, cache_dir) / f"{dataset.name}{infix}-{data_hash[:16]}"
    net = _load(directory, dataset, data_hash, kind)
    if not exists(net):
        net = train_feature_network(dataset, log_every, kind)
        save_entry(directory, net.model, {
            "dataset": net.dataset_name, "data_hash": net.data_hash, "shape": list(net.shape),
            "kind": kind, "score_name": net.score_name,
            "test_accuracy": net.test_accuracy, "train_seconds": net.train_seconds,
            "train_cpu_seconds": net.train_cpu_seconds, "version": VERSION, **net.meta,
        })
        net.directory = directory
    return net
