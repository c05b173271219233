"""The perceptual network: distance properties against an independent float64 recomputation, it is
not the evaluation network, the cache (round trip, corruption -> identical retrain), plug-in
weights and their failure modes."""

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import genbench.nets.perceptual as perceptual
from genbench.errors import GenbenchError
from genbench.core.losses import normalize_channels
from genbench.nets.classifier import FeatureCNN, FeatureNetConfig
from genbench.nets.perceptual import (
    PerceptualNetConfig,
    PerceptualTrainConfig,
    PerceptualVGG,
    get_perceptual_network,
    images_hash,
    load_perceptual_weights,
    rotations,
    save_perceptual_weights,
)

TINY = PerceptualTrainConfig(steps=25, batch_size=16)  # ~1 s of CPU; ~63% held-out accuracy


@pytest.fixture(scope="module")
def images():
    from genbench.data import load_dataset

    return load_dataset("digits", limit=400).train


@pytest.fixture(scope="module")
def trained(images, tmp_path_factory):
    cache = tmp_path_factory.mktemp("perceptual")
    state = torch.get_rng_state()
    net = get_perceptual_network(images, cache_dir=cache, train_config=TINY)
    assert torch.equal(torch.get_rng_state(), state)  # training draws from its own generator
    return net, cache


def reference_distance(model: PerceptualVGG, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """LPIPS with uniform weights, recomputed layer by layer in float64 numpy/functional ops."""
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    per_block = model.config.convs_per_block

    def taps(img):
        h, out = img.double() * 2 - 1, []
        for b in range(len(model.config.widths)):
            if b:
                h = F.max_pool2d(h, 2, ceil_mode=True)
            for conv in convs[b * per_block : (b + 1) * per_block]:
                h = F.relu(F.conv2d(h, conv.weight.double(), conv.bias.double(), padding=1))
            out.append(h.numpy())
        return out

    total = np.zeros(x.shape[0])
    for fx, fy in zip(taps(x), taps(y)):
        nx = fx / np.sqrt((fx**2).sum(1, keepdims=True) + 1e-10)
        ny = fy / np.sqrt((fy**2).sum(1, keepdims=True) + 1e-10)
        total += ((nx - ny) ** 2).sum(1).mean((1, 2))
    return total


def test_learns_rotations(trained, images):
    net, _ = trained
    assert net.rotation_accuracy > 0.45  # chance is 0.25
    assert net.source == "trained" and net.images_sha256 == images_hash(images)
    assert not any(p.requires_grad for p in net.model.parameters())  # frozen


def test_distance_zero_for_identical_and_grows_with_noise(trained, images):
    net, _ = trained
    x = images[:64]
    assert net.distance(x, x).abs().max() == 0
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=gen)
    d = [net.distance(x, x + s * noise).mean().item() for s in (0.02, 0.1, 0.3)]
    assert 0 < d[0] < d[1] < d[2]
    y = images[64:128]
    np.testing.assert_allclose(net.distance(x, y).numpy(), net.distance(y, x).numpy(), rtol=1e-6)


def test_distance_matches_float64_reference(trained, images):
    net, _ = trained
    x, y = images[:16], images[16:32].flip(-1)
    expected = reference_distance(net.model, x, y)
    np.testing.assert_allclose(net.distance(x, y).double().numpy(), expected, rtol=1e-4, atol=1e-6)


def test_distance_gradient_finite_at_dead_relu_vectors():
    f = torch.zeros(2, 8, 3, 3, requires_grad=True)
    normalize_channels(f).sum().backward()
    assert torch.isfinite(f.grad).all()


def test_not_the_evaluation_network(trained):
    net, _ = trained
    eval_net = FeatureCNN(FeatureNetConfig((1, 8, 8), 10))
    assert type(net.model) is not type(eval_net) and not isinstance(net.model, FeatureCNN)
    kinds = lambda m: {type(x) for x in m.modules()}  # noqa: E731
    assert torch.nn.MaxPool2d in kinds(net.model) and torch.nn.GroupNorm not in kinds(net.model)
    assert torch.nn.AvgPool2d in kinds(eval_net) and torch.nn.GroupNorm in kinds(eval_net)
    assert net.model.head.out_features == 4  # rotation prediction, not the 10 classes
    assert tuple(net.model.config.widths) != tuple(FeatureNetConfig((1, 8, 8), 10).widths)
    assert perceptual.CACHE_SUBDIR != "features" and TINY.seed != 0


def test_rotations_targets():
    x = torch.arange(2 * 9.0).view(2, 1, 3, 3)
    inputs, targets = rotations(x)
    assert targets.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(inputs[2], torch.rot90(x[0], 1, (1, 2)))
    assert torch.equal(inputs[7], torch.rot90(x[1], 3, (1, 2)))


def test_cache_round_trip_and_corruption_retrains_identically(trained, images, monkeypatch):
    net, cache = trained
    directory = cache / f"images-{images_hash(images)[:16]}"
    meta = json.loads((directory / "config.json").read_text())
    weights = (directory / "model.safetensors").read_bytes()
    assert meta["images_sha256"] == images_hash(images)
    assert meta["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert meta["rotation_accuracy"] == pytest.approx(net.rotation_accuracy)

    def fail(*a, **k):
        raise AssertionError("the cached network should have been loaded, not retrained")

    with monkeypatch.context() as m:
        m.setattr(perceptual, "train_perceptual_network", fail)
        again = get_perceptual_network(images, cache_dir=cache, train_config=TINY)
    assert again.weights_sha256 == net.weights_sha256
    for a, b in zip(again.model.state_dict().values(), net.model.state_dict().values()):
        assert torch.equal(a, b)

    (directory / "model.safetensors").write_bytes(weights[:-8] + b"garbage!")
    with pytest.warns(UserWarning, match="does not match the sha256"):
        retrained = get_perceptual_network(images, cache_dir=cache, train_config=TINY)
    assert retrained.weights_sha256 == net.weights_sha256  # deterministic training
    assert (directory / "model.safetensors").read_bytes() == weights


def test_default_cache_dir_is_not_the_feature_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path))
    assert perceptual.default_cache_dir() == tmp_path / "perceptual"


def test_plug_in_weights_round_trip(trained, images, tmp_path):
    net, _ = trained
    path = tmp_path / "w.safetensors"
    save_perceptual_weights(net, path)
    loaded = load_perceptual_weights(path, 1)
    assert loaded.source == "file" and loaded.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    x, y = images[:8], images[8:16]
    torch.testing.assert_close(loaded.distance(x, y), net.distance(x, y))
    # LPIPS-style per-channel layer weights: all ones is the uniform distance, 2x doubles it
    net.layer_weights = [2 * torch.ones(c) for c in net.model.tap_channels]
    save_perceptual_weights(net, path)
    net.layer_weights = None
    torch.testing.assert_close(load_perceptual_weights(path, 1).distance(x, y), 2 * net.distance(x, y))


def test_bad_plug_in_weights_give_clear_errors(trained, tmp_path):
    from safetensors.torch import save_file

    net, _ = trained
    state = {k: v.contiguous() for k, v in net.model.state_dict().items()}
    with pytest.raises(GenbenchError, match="cannot read"):
        load_perceptual_weights(tmp_path / "missing.safetensors", 1)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(GenbenchError, match="not a safetensors file"):
        load_perceptual_weights(tmp_path / "junk.safetensors", 1)
    save_file({k: v for k, v in state.items() if k != "blocks.1.0.weight"}, tmp_path / "short.safetensors")
    with pytest.raises(GenbenchError, match=r"missing \['blocks.1.0.weight'\]"):
        load_perceptual_weights(tmp_path / "short.safetensors", 1)
    save_file({**state, "blocks.0.0.weight": torch.zeros(24, 3, 3, 3)}, tmp_path / "rgb.safetensors")
    with pytest.raises(GenbenchError, match=r"blocks.0.0.weight has shape \(24, 3, 3, 3\)"):
        load_perceptual_weights(tmp_path / "rgb.safetensors", 1)
    save_file({**state, "lin.0": torch.ones(1, 5, 1, 1)}, tmp_path / "lin.safetensors")
    with pytest.raises(GenbenchError, match="LPIPS layer weights must be exactly"):
        load_perceptual_weights(tmp_path / "lin.safetensors", 1)
    lin = {f"lin.{i}": -torch.ones(c) for i, c in enumerate(net.model.tap_channels)}
    save_file({**state, **lin}, tmp_path / "neg.safetensors")
    with pytest.raises(GenbenchError, match="non-negative"):
        load_perceptual_weights(tmp_path / "neg.safetensors", 1)


def test_bad_inputs(trained):
    net, _ = trained
    with pytest.raises(GenbenchError, match="square"):
        perceptual.train_perceptual_network(torch.rand(4, 1, 8, 6), TINY)
    with pytest.raises(GenbenchError, match="same shape"):
        net.distance(torch.rand(2, 1, 8, 8), torch.rand(3, 1, 8, 8))
    with pytest.raises(GenbenchError, match="widths"):
        PerceptualVGG(PerceptualNetConfig(in_channels=1, widths=()))
