"""The perceptual network behind VQ-GAN's perceptual loss: a small VGG trained to predict rotations.

VQ-GAN (Esser et al. 2021) adds LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep
Features as a Perceptual Metric") to its reconstruction loss, with an ImageNet VGG-16. Neither the
weights nor ImageNet exist offline, and a VGG-16 would see little in 8x8 digits, so genbench trains
its own network on the training images themselves, once per training set, and caches it.

It must not be the evaluation judge (genbench.features.FeatureCNN): a model trained against the
network that scores it would be graded by its own loss. So both the architecture and the training
objective differ:

    evaluation (features.py)                  perceptual (this file)
    3 x [conv3x3 -> GroupNorm -> ReLU]        3 x [conv3x3 -> ReLU -> conv3x3 -> ReLU], VGG-style
    2x2 average pooling                       2x2 max pooling, no normalisation layers
    widths 16/32/64 + linear feature layer    widths 24/48/96, global average pool -> 4 logits
    supervised: class labels, shift aug.      self-supervised: which of 4 rotations (0/90/180/270
                                              degrees) was applied (Gidaris et al. 2018, "Unsupervised
                                              Representation Learning by Predicting Image Rotations")

Rotation prediction needs no labels, so it works for every dataset (the unlabelled ``folder`` one
included), and Zhang et al. 2018 (sec. 4, fig. 4) found self-supervised networks nearly as good
perceptual metrics as supervised ones.

Distance (LPIPS's "lin" form with uniform weights: there are no human judgments here to fit the
per-channel weights w_l on). With f^l(x) the ReLU output (C_l, H_l, W_l) at the end of block l:

    f^_l = f^l / sqrt(sum_c (f^l_c)^2 + eps)                  unit-normalise channels per position
    d(x, y) = sum_l  1/(H_l W_l) sum_{h,w} sum_c w_{l,c} (f^_l(x) - f^_l(y))^2,   w_{l,c} = 1

eps = 1e-10 makes the normalisation differentiable at an all-zero (dead-ReLU) vector, where LPIPS's
x / (||x|| + eps) has an infinite derivative inside the square root (NaN gradients).

Plug-in: ``load_perceptual_weights(path, channels)`` loads a user-supplied safetensors file with
this architecture's tensors (and optionally LPIPS-style per-channel weights ``lin.<l>`` of shape
(1, C_l, 1, 1) or (C_l,)), validated key by key and shape by shape.

Cache layout (``get_perceptual_network``): ``<cache_dir>/images-<sha256[:16]>/`` holds
``model.safetensors`` and ``config.json`` (sha256 of the training images, network and training
configs, held-out rotation accuracy, the weights' sha256), each written atomically, config.json
last. A corrupt or stale entry is retrained with a warning: training is seeded and runs on one
CPU thread, so a retrain reproduces the same weights.
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

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from genbench.errors import GenbenchError
from genbench.utils import atomic_write_bytes, default, exists

CACHE_ENV_VAR = "GENBENCH_CACHE"
CACHE_SUBDIR = "perceptual"  # features.py uses "features": the two networks never share an entry
TRAIN_THREADS = 1  # as in features.py: reproducible weights, no oversubscription on shared cores
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
NORM_EPS = 1e-10
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


def normalize_channels(f: Tensor, eps: float = NORM_EPS) -> Tensor:
    """f / sqrt(sum_c f_c^2 + eps) at every position of f (B, C, H, W)."""
    return f * torch.rsqrt(f.pow(2).sum(1, keepdim=True) + eps)


def lpips_distance(feats_x: list[Tensor], feats_y: list[Tensor], weights: list[Tensor] | None = None) -> Tensor:
    """sum_l mean_{h,w} sum_c w_{l,c} (f^_l(x) - f^_l(y))^2 per image: (B,). Uniform w when None."""
    total = 0.0
    for i, (fx, fy) in enumerate(zip(feats_x, feats_y, strict=True)):
        sq = (normalize_channels(fx) - normalize_channels(fy)).pow(2)
        if weights is not None:
            sq = sq * weights[i].view(1, -1, 1, 1)
        total = total + sq.sum(1).mean((1, 2))
    return total


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
    """Train a PerceptualVGG on rotation prediction (AdamW, cosine decay to 0, CPU, one thread);
    returns it (eval mode) and its rotation accuracy on the held-out fraction of `images`.
    Every random draw comes from one generator seeded with ``train_config.seed``; torch's global
    RNG is left as it was, and gradients are on even when called under no_grad (the trainer runs
    VQ-GAN's prepare_stage, which trains this network, without gradients)."""
    _check_images(images)
    images = images.detach().to("cpu", torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            return _train_loop(images, net_config, train_config, log_every)
    finally:
        torch.set_num_threads(threads)


def _train_loop(images, net_config, train_config, log_every) -> tuple[PerceptualVGG, float]:
    torch.manual_seed(train_config.seed)  # parameter init
    model = PerceptualVGG(net_config)
    generator = torch.Generator().manual_seed(train_config.seed)
    order = torch.randperm(images.shape[0], generator=generator)
    n_hold = max(1, int(round(train_config.holdout * images.shape[0])))
    held, train = images[order[:n_hold]], images[order[n_hold:]]
    bs = min(train_config.batch_size, train.shape[0])
    opt = torch.optim.AdamW(model.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay)
    model.train()
    perm, cursor = torch.randperm(train.shape[0], generator=generator), 0
    for step in range(train_config.steps):
        if cursor + bs > train.shape[0]:
            perm, cursor = torch.randperm(train.shape[0], generator=generator), 0
        x = train[perm[cursor : cursor + bs]]
        cursor += bs
        for group in opt.param_groups:
            group["lr"] = train_config.lr * 0.5 * (1 + math.cos(math.pi * step / train_config.steps))
        inputs, targets = rotations(x)
        loss = F.cross_entropy(model(inputs), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"perceptual net step {step + 1}/{train_config.steps}: loss {loss.item():.4f}", flush=True)
    model.eval()
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
    env = os.environ.get(CACHE_ENV_VAR, "").strip()
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "genbench"
    return root / CACHE_SUBDIR


def _json_ready(config) -> dict:
    return json.loads(json.dumps(asdict(config)))


def _weights_bytes(model: nn.Module) -> bytes:
    return save_safetensors({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})


def cache_entry(cache_dir: str | os.PathLike | None, images_sha256: str) -> Path:
    return Path(default(cache_dir, default_cache_dir())).expanduser() / f"images-{images_sha256[:16]}"


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
        weights_sha256=hashlib.sha256(_weights_bytes(model)).hexdigest(),
        images_sha256=images_hash(images),
        rotation_accuracy=accuracy,
        train_seconds=time.perf_counter() - start,
        meta={"net_config": _json_ready(net_config), "train_config": _json_ready(train_config)},
    )


def _save(net: PerceptualNetwork, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    weights = _weights_bytes(net.model)
    config = {
        "objective": "rotation prediction (4-way)",
        "images_sha256": net.images_sha256,
        "rotation_accuracy": net.rotation_accuracy,
        "train_seconds": net.train_seconds,
        "torch_version": torch.__version__,
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        **net.meta,
    }
    atomic_write_bytes(directory / WEIGHTS_FILE, weights)
    atomic_write_bytes(directory / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
    net.directory = directory


def load_cached(directory: Path, images_sha256: str, net_config: PerceptualNetConfig,
                train_config: PerceptualTrainConfig | None = None) -> tuple[PerceptualNetwork | None, str]:
    """The cached network in `directory`, or (None, why not). `train_config` None accepts any
    stored one (a resumed VQ-GAN run, which checks the weights' sha256 instead)."""
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file():
        return None, "no cache entry"
    try:
        config = json.loads(config_path.read_text())
        weights = weights_path.read_bytes()
    except (OSError, json.JSONDecodeError) as e:
        return None, f"unreadable ({e})"
    if not isinstance(config, dict) or config.get("images_sha256") != images_sha256:
        return None, "config.json does not belong to these training images"
    if hashlib.sha256(weights).hexdigest() != config.get("weights_sha256"):
        return None, f"{WEIGHTS_FILE} does not match the sha256 recorded in {CONFIG_FILE} (corrupt or modified)"
    if config.get("net_config") != _json_ready(net_config) or (
        train_config is not None and config.get("train_config") != _json_ready(train_config)
    ):
        return None, "it was trained with different network/training settings than the current code's"
    model = PerceptualVGG(net_config)
    model.load_state_dict(load_safetensors(weights))
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
    _save(net, directory)
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


if __name__ == "__main__":
    # Train (or load) and report: python -m genbench.perceptual fashion-mnist [cache_dir]
    import sys

    from genbench.data import load_dataset

    dataset = load_dataset(sys.argv[1] if len(sys.argv) > 1 else "digits")
    start = time.perf_counter()
    net = get_perceptual_network(dataset.train, sys.argv[2] if len(sys.argv) > 2 else None, log_every=100)
    print(f"{dataset.name}: {net.description}; training {net.train_seconds:.1f} s, "
          f"this call {time.perf_counter() - start:.1f} s, cache {net.directory}")
