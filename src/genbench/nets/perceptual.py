"""The perceptual network behind VQ-GAN's perceptual loss: a small VGG trained to predict rotations.

VQ-GAN (Esser et al. 2021) adds LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep
Features as a Perceptual Metric") to its reconstruction loss, with an ImageNet VGG-16. Neither the
weights nor ImageNet exist offline, and a VGG-16 would see little in 8x8 digits, so genbench trains
its own network on the training images themselves, once per training set, and caches it
(genbench.nets.local). The distance itself is ``genbench.core.losses.lpips_distance``.

It must not be the evaluation judge (genbench.nets.classifier.FeatureCNN): a model trained against
the network that scores it would be graded by its own loss. So both the architecture and the
training objective differ:

    evaluation (nets/classifier.py)           perceptual (this file)
    3 x [conv3x3 -> GroupNorm -> ReLU]        3 x [conv3x3 -> ReLU -> conv3x3 -> ReLU], VGG-style
    2x2 average pooling                       2x2 max pooling, no normalisation layers
    widths 16/32/64 + linear feature layer    widths 24/48/96, global average pool -> 4 logits
    supervised: class labels, shift aug.      self-supervised: which of 4 rotations (0/90/180/270
                                              degrees) was applied (Gidaris et al. 2018, "Unsupervised
                                              Representation Learning by Predicting Image Rotations")

Rotation prediction needs no labels, so it works for every dataset (the unlabelled ``folder`` one
included), and Zhang et al. 2018 (sec. 4, fig. 4) found self-supervised networks nearly as good
perceptual metrics as supervised ones. The taps are the ReLU outputs at the end of each block
(LPIPS's relu1_2 / relu2_2 / relu3_3 choice); the layer weights are uniform.

Plug-in: ``load_perceptual_weights(path, channels)`` loads a user-supplied safetensors file with
this architecture's tensors (and optionally LPIPS-style per-channel weights ``lin.<l>`` of shape
(1, C_l, 1, 1) or (C_l,)), validated key by key and shape by shape.

Cache (``get_perceptual_network``): ``<cache>/perceptual/images-<sha256[:16]>/``, keyed by the
sha256 of the training images, recording the network and training configs and the held-out
rotation accuracy; a corrupt or stale entry is retrained with a warning (the retrain is seeded and
single-threaded, so it reproduces the same weights).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from genbench.core.losses import lpips_distance
from genbench.errors import GenbenchError
from genbench.files import atomic_write_bytes
from genbench.utils import default, exists

from .local import cache_root, load_entry, save_entry, train_seeded, weights_bytes

CACHE_SUBDIR = "perceptual"  # the evaluation network uses "features": the two never share an entry
NUM_ROTATIONS = 4


# ---------------------------------------------------------------------------------------------
# configs


@dataclass
class PerceptualNetConfig:
    in_channels: int = 1
    widths: tuple[int, ...] = (24, 48, 96)  # one VGG block each; 2x2 max pooling between blocks
    convs_per_block: int = 2


@dataclass
class PerceptualTrainConfig:
    steps: int = 300
    batch_size: int = 32  # images per step; each is shown in all 4 rotations (4 x batch_size inputs)
    lr: float = 2e-3
    weight_decay: float = 1e-4  # AdamW
    holdout: float = 0.1  # fraction of the images held out to measure rotation accuracy
    seed: int = 1234  # features.py trains with seed 0


# By image side: 8x8 digits reach ~95% held-out rotation accuracy in 300 steps (~15 s of one
# CPU core); Fashion-MNIST 28x28 reaches 90% in 300 steps (~145 s; each step costs ~12x more).
TRAIN_PRESETS: dict[str, PerceptualTrainConfig] = {
    "small": PerceptualTrainConfig(steps=300),  # side <= 16
    "large": PerceptualTrainConfig(steps=500),
}


def default_train_config(image_size: int) -> PerceptualTrainConfig:
    return TRAIN_PRESETS["small" if image_size <= 16 else "large"]


# ---------------------------------------------------------------------------------------------
# the network


class PerceptualVGG(nn.Module):
    """VGG-style (Simonyan & Zisserman 2015) plain conv stack; ``taps`` gives the ReLU output at the
    end of each block (LPIPS's relu1_2 / relu2_2 / relu3_3 choice), ``forward`` rotation logits."""

    def __init__(self, config: PerceptualNetConfig):
        super().__init__()
        if config.in_channels < 1 or not config.widths or min(config.widths) < 1 or config.convs_per_block < 1:
            raise GenbenchError(f"PerceptualNetConfig: channels, widths and convs_per_block must be >= 1, got {config}")
        self.config = config
        self.blocks = nn.ModuleList()
        channels = config.in_channels
        for width in config.widths:
            layers: list[nn.Module] = []
            for _ in range(config.convs_per_block):
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
                channels = width
            self.blocks.append(nn.Sequential(*layers))
        self.pool = nn.MaxPool2d(2, ceil_mode=True)  # ceil: an odd side (7) still pools to >= 1
        self.head = nn.Linear(channels, NUM_ROTATIONS)
        for m in self.modules():  # torchvision's VGG init: He normal (fan_out) for convs
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    @property
    def tap_channels(self) -> list[int]:
        return list(self.config.widths)

    def taps(self, x: Tensor) -> list[Tensor]:
        """Images (B, C, H, W) in [0, 1] -> one feature map per block, finest first."""
        h = x * 2 - 1  # centre the pixels, as LPIPS feeds [-1, 1] images
        out = []
        for i, block in enumerate(self.blocks):
            if i:
                h = self.pool(h)
            h = block(h)
            out.append(h)
        return out

    def forward(self, x: Tensor) -> Tensor:
        """Rotation logits (B, 4): which multiple of 90 degrees x was rotated by."""
        return self.head(self.taps(x)[-1].mean((2, 3)))


def rotations(x: Tensor) -> tuple[Tensor, Tensor]:
    """All 4 rotations of a batch (B, C, S, S) -> (4B, C, S, S) inputs and (4B,) targets k in 0..3."""
    rotated = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(NUM_ROTATIONS)])
    targets = torch.arange(NUM_ROTATIONS, device=x.device).repeat_interleave(x.shape[0])
    return rotated, targets


# ---------------------------------------------------------------------------------------------
# training


def images_hash(images: Tensor) -> str:
    """sha256 over dtype, shape and raw bytes of an image tensor (the cache key)."""
    array = images.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{array.dtype}{tuple(array.shape)}".encode())
    h.update(array.view(torch.uint8).numpy().data if array.numel() else b"")
    return h.hexdigest()


def _check_images(images: Tensor, what: str = "perceptual network") -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise GenbenchError(f"{what}: expected float images (N, C, H, W), got {getattr(images, 'shape', images)!r}")
    if images.shape[2] != images.shape[3]:
        raise GenbenchError(f"{what}: rotation prediction needs square images, got {images.shape[2]}x{images.shape[3]}")
    if images.shape[0] < 2:
        raise GenbenchError(f"{what}: needs at least 2 training images, got {images.shape[0]}")


@torch.no_grad()
def rotation_accuracy(model: PerceptualVGG, images: Tensor, batch_size: int = 256) -> float:
    correct = 0
    for x in images.split(batch_size):
        inputs, targets = rotations(x)
        correct += int((model(inputs).argmax(1) == targets).sum())
    return correct / (NUM_ROTATIONS * images.shape[0])


def train_perceptual_cnn(
    images: Tensor, net_config: PerceptualNetConfig, train_config: PerceptualTrainConfig, log_every: int = 0
) -> tuple[PerceptualVGG, float]:
    """Train a PerceptualVGG on rotation prediction (genbench.nets.local.train_seeded: AdamW, cosine
    decay, one CPU thread, seeded); returns it (eval mode) and its rotation accuracy on the
    held-out fraction of `images`."""
    _check_images(images)
    images = images.detach().to("cpu", torch.float32)
    generator = torch.Generator().manual_seed(train_config.seed)
    order = torch.randperm(images.shape[0], generator=generator)
    n_hold = max(1, int(round(train_config.holdout * images.shape[0])))
    held, train = images[order[:n_hold]], images[order[n_hold:]]

    def batch_loss(model: nn.Module, idx: Tensor) -> Tensor:
        inputs, targets = rotations(train[idx])
        return F.cross_entropy(model(inputs), targets)

    model = train_seeded(
        lambda: PerceptualVGG(net_config), batch_loss, train.shape[0], steps=train_config.steps,
        batch_size=train_config.batch_size, lr=train_config.lr, weight_decay=train_config.weight_decay,
        seed=train_config.seed, generator=generator, log_every=log_every, what="perceptual net",
    )
    return model, rotation_accuracy(model, held)


# ---------------------------------------------------------------------------------------------
# the wrapped network


@dataclass
class PerceptualNetwork:
    """A frozen PerceptualVGG plus where it came from. Not an nn.Module on purpose: a model holding
    it (VQ-GAN) keeps it out of its state_dict, parameters and checkpoints."""

    model: PerceptualVGG
    source: str  # "trained" (rotation prediction on the training images) | "file" (plug-in weights)
    weights_sha256: str
    images_sha256: str = ""  # training images it was trained on ("" for plug-in weights)
    rotation_accuracy: float | None = None  # held-out accuracy (None for plug-in weights)
    layer_weights: list[Tensor] | None = None  # LPIPS "lin" weights per tap (None: uniform)
    train_seconds: float = 0.0
    directory: Path | None = None  # cache folder or weights file
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.model.eval().requires_grad_(False)

    @property
    def description(self) -> str:
        c = self.model.config
        arch = f"VGG-style CNN widths {list(c.widths)} x {c.convs_per_block} convs, max pooling"
        if self.source == "file":
            return f"{arch}, user-supplied weights {self.directory} (sha256 {self.weights_sha256[:16]})"
        return (f"{arch}, self-supervised rotation prediction on the training images (sha256 "
                f"{self.images_sha256[:16]}), held-out rotation accuracy {self.rotation_accuracy:.3f}; "
                "LPIPS-style distance with uniform layer weights; not the evaluation network")

    def to(self, device) -> PerceptualNetwork:
        self.model.to(device)
        if self.layer_weights is not None:
            self.layer_weights = [w.to(device) for w in self.layer_weights]
        return self

    def distance(self, x: Tensor, y: Tensor) -> Tensor:
        """LPIPS-style distance (B,) between images x and y (B, C, H, W) in [0, 1]; differentiable
        in both (the network itself is frozen)."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != self.model.config.in_channels:
            raise GenbenchError(
                f"perceptual distance: expected two (B, {self.model.config.in_channels}, H, W) batches of the "
                f"same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        # one pass per side: the network is frozen, so a side that needs no gradient (the real
        # images of a training loss) builds no graph, which halves the backward pass
        return lpips_distance(self.model.taps(x), self.model.taps(y), self.layer_weights)


def default_cache_dir() -> Path:
    """``$GENBENCH_CACHE/perceptual`` when set, else ``~/.cache/genbench/perceptual``."""
    return cache_root(CACHE_SUBDIR)


def _json_ready(config) -> dict:
    return json.loads(json.dumps(asdict(config)))


def cache_entry(cache_dir: str | os.PathLike | None, images_sha256: str) -> Path:
    return cache_root(CACHE_SUBDIR, cache_dir) / f"images-{images_sha256[:16]}"


def train_perceptual_network(
    images: Tensor, train_config: PerceptualTrainConfig | None = None, log_every: int = 0
) -> PerceptualNetwork:
    """Train (no cache) a PerceptualNetwork on `images` (N, C, S, S) in [0, 1]."""
    _check_images(images)
    net_config = PerceptualNetConfig(in_channels=images.shape[1])
    train_config = default(train_config, lambda: default_train_config(images.shape[-1]))
    start = time.perf_counter()
    model, accuracy = train_perceptual_cnn(images, net_config, train_config, log_every)
    return PerceptualNetwork(
        model=model,
        source="trained",
        weights_sha256=hashlib.sha256(weights_bytes(model)).hexdigest(),
        images_sha256=images_hash(images),
        rotation_accuracy=accuracy,
        train_seconds=time.perf_counter() - start,
        meta={"net_config": _json_ready(net_config), "train_config": _json_ready(train_config)},
    )


def load_cached(directory: Path, images_sha256: str, net_config: PerceptualNetConfig,
                train_config: PerceptualTrainConfig | None = None) -> tuple[PerceptualNetwork | None, str]:
    """The cached network in `directory`, or (None, why not). `train_config` None accepts any
    stored one (a resumed VQ-GAN run, which checks the weights' sha256 instead)."""
    expect = {"images_sha256": images_sha256, "net_config": _json_ready(net_config)}
    if train_config is not None:
        expect["train_config"] = _json_ready(train_config)
    config, weights, why = load_entry(directory, expect)
    if config is None:
        return None, why
    model = PerceptualVGG(net_config)
    model.load_state_dict(weights)
    net = PerceptualNetwork(
        model=model, source="trained", weights_sha256=config["weights_sha256"], images_sha256=images_sha256,
        rotation_accuracy=float(config["rotation_accuracy"]), train_seconds=float(config.get("train_seconds", 0.0)),
        directory=directory, meta={"net_config": config["net_config"], "train_config": config["train_config"]},
    )
    return net, ""


def get_perceptual_network(
    images: Tensor, cache_dir: str | os.PathLike | None = None, train_config: PerceptualTrainConfig | None = None,
    log_every: int = 0,
) -> PerceptualNetwork:
    """The perceptual network for training images `images` (N, C, S, S): loaded from
    ``<cache_dir>/images-<sha256[:16]>/`` when a valid entry is there, else trained and saved
    there. ``cache_dir`` defaults to ``default_cache_dir()``."""
    _check_images(images)
    sha = images_hash(images)
    train_config = default(train_config, lambda: default_train_config(images.shape[-1]))
    directory = cache_entry(cache_dir, sha)
    net, why = load_cached(directory, sha, PerceptualNetConfig(in_channels=images.shape[1]), train_config)
    if exists(net):
        return net
    if why != "no cache entry":
        warnings.warn(f"perceptual network cache {directory}: {why}; retraining", stacklevel=2)
    net = train_perceptual_network(images, train_config, log_every)
    save_entry(directory, net.model, {
        "objective": "rotation prediction (4-way)", "images_sha256": net.images_sha256,
        "rotation_accuracy": net.rotation_accuracy, "train_seconds": net.train_seconds, **net.meta,
    })
    net.directory = directory
    return net


def load_perceptual_weights(path: str | os.PathLike, in_channels: int) -> PerceptualNetwork:
    """Plug-in weights: a safetensors file holding this architecture's tensors (PerceptualVGG with
    `in_channels` input channels; the rotation head is optional) and optionally LPIPS-style
    per-channel weights ``lin.<l>`` (non-negative, shape (1, C_l, 1, 1) or (C_l,)) for each tap l."""
    path = Path(path).expanduser()
    where = f"perceptual weights {path}"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise GenbenchError(f"{where}: cannot read ({e.strerror or e})") from None
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise GenbenchError(f"{where}: not a safetensors file ({str(e)[:80]})") from None
    model = PerceptualVGG(PerceptualNetConfig(in_channels=in_channels))
    expected = model.state_dict()
    lin = {k: v for k, v in tensors.items() if k.startswith("lin.")}
    state = {k: v for k, v in tensors.items() if not k.startswith("lin.")}
    optional = {"head.weight", "head.bias"}
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise GenbenchError(
            f"{where}: does not match the perceptual network (VGG widths {list(model.config.widths)}, "
            f"{in_channels} input channel(s)): missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise GenbenchError(
                f"{where}: {k} has shape {tuple(v.shape)}, the perceptual network expects {tuple(expected[k].shape)}"
            )
        if not v.is_floating_point() or not torch.isfinite(v).all():
            raise GenbenchError(f"{where}: {k} must hold finite floating-point values")
    model.load_state_dict({**expected, **{k: v.float() for k, v in state.items()}})
    layer_weights = None
    if lin:
        names = [f"lin.{i}" for i in range(len(model.tap_channels))]
        if sorted(lin) != sorted(names):
            raise GenbenchError(f"{where}: LPIPS layer weights must be exactly {names}, got {sorted(lin)}")
        layer_weights = []
        for name, c in zip(names, model.tap_channels):
            w = lin[name].float().reshape(-1)
            if w.numel() != c or not torch.isfinite(w).all() or (w < 0).any():
                raise GenbenchError(f"{where}: {name} must hold {c} finite non-negative weights, "
                                    f"got shape {tuple(lin[name].shape)}")
            layer_weights.append(w)
    return PerceptualNetwork(
        model=model, source="file", weights_sha256=hashlib.sha256(data).hexdigest(),
        layer_weights=layer_weights, directory=path,
    )


def save_perceptual_weights(net: PerceptualNetwork, path: str | os.PathLike) -> None:
    """Write `net` (and its layer weights, if any) in the plug-in format of load_perceptual_weights."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.model.state_dict().items()}
    for i, w in enumerate(net.layer_weights or []):
        tensors[f"lin.{i}"] = w.detach().cpu().reshape(1, -1, 1, 1).contiguous()
    atomic_write_bytes(Path(path), save_safetensors(tensors))

