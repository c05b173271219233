"""The feature network: accuracy on digits, the cache (round trip, corruption, determinism of
retraining), input checks, and the shift augmentation against a brute-force translation."""

import hashlib
import json

import numpy as np
import pytest
import torch

import genbench.evaluation.features as features
from genbench.data import ImageDataset, load_dataset
from genbench.errors import GenbenchError
from genbench.evaluation.features import (
    FeatureTrainConfig,
    dataset_hash,
    default_cache_dir,
    get_feature_network,
    random_shift,
)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """The real digits network (default preset), trained once into a fresh cache."""
    cache = tmp_path_factory.mktemp("features")
    return get_feature_network(digits, cache_dir=cache), cache


@pytest.fixture
def tiny_preset(monkeypatch):
    """A few training steps: enough to exercise the cache mechanics quickly."""
    monkeypatch.setitem(features.TRAIN_PRESETS, "digits", FeatureTrainConfig(steps=5, batch_size=32, max_shift=1))


def test_digits_accuracy(trained, digits):
    net, _ = trained
    assert net.test_accuracy > 0.95
    predicted = net.predict(digits.test)
    assert predicted.dtype == np.int64 and predicted.shape == (len(digits.test),)
    assert (predicted == digits.test_labels.numpy()).mean() == pytest.approx(net.test_accuracy)


def test_features_shape_and_batching(trained, digits):
    net, _ = trained
    x = digits.test[:100]
    f = net.features(x)
    assert f.shape == (100, net.feature_dim) == (100, 128) and f.dtype == np.float32
    assert np.isfinite(f).all() and f.std(axis=0).min() > 0  # no dead feature dims on real data
    # each image's features are independent of its batch-mates (GroupNorm, not BatchNorm)
    np.testing.assert_allclose(net.features(x.numpy(), batch_size=7), f, rtol=1e-5, atol=1e-5)
    assert net.features(x[:0]).shape == (0, 128)


def test_features_are_standardized_on_the_train_set(trained, digits):
    net, _ = trained
    f = net.features(digits.train).astype(np.float64)  # 1437 images: all of them fixed the statistics
    np.testing.assert_allclose(f.mean(0), 0.0, atol=1e-4)
    assert f.var(0, ddof=1).mean() == pytest.approx(1.0, rel=1e-4)
    raw = net.model.raw_features(digits.train[:5]).detach().numpy()
    np.testing.assert_allclose(f[:5] * float(net.model.feature_scale) + net.model.feature_mean.numpy(), raw, atol=1e-4)


def test_cache_round_trip(trained, digits, monkeypatch):
    net, cache = trained
    directory = cache / f"digits-{dataset_hash(digits)[:16]}"
    assert net.directory == directory
    config = json.loads((directory / "config.json").read_text())
    assert config["test_accuracy"] == net.test_accuracy and config["train_cpu_seconds"] > 0
    assert config["data_hash"] == dataset_hash(digits)
    assert config["weights_sha256"] == hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()
    assert not list(directory.glob(".*tmp*"))  # atomic writes left no temp files

    def no_training(*args, **kwargs):
        raise AssertionError("the cached network should have been loaded, not retrained")

    monkeypatch.setattr(features, "train_feature_network", no_training)
    loaded = get_feature_network(digits, cache_dir=cache)
    assert loaded.test_accuracy == net.test_accuracy
    np.testing.assert_array_equal(loaded.features(digits.test), net.features(digits.test))


def test_corrupt_weights_are_detected_and_retrained(digits, tmp_path, tiny_preset):
    net = get_feature_network(digits, cache_dir=tmp_path)
    weights = net.directory / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # flip bits in the last float
    weights.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="does not match the sha256 recorded in config.json.*retraining"):
        again = get_feature_network(digits, cache_dir=tmp_path)
    # training is deterministic: the retrained network is the original, bit for bit
    np.testing.assert_array_equal(again.features(digits.test), net.features(digits.test))
    config = json.loads((net.directory / "config.json").read_text())
    assert config["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_changed_training_settings_or_version_retrain(digits, tmp_path, tiny_preset, monkeypatch):
    get_feature_network(digits, cache_dir=tmp_path)
    monkeypatch.setitem(features.TRAIN_PRESETS, "digits", FeatureTrainConfig(steps=6, batch_size=32, max_shift=1))
    with pytest.warns(UserWarning, match="records other train_config"):
        net = get_feature_network(digits, cache_dir=tmp_path)
    assert net.meta["train_config"]["steps"] == 6
    monkeypatch.setattr(features, "VERSION", features.VERSION + 1)
    with pytest.warns(UserWarning, match="records other version"):
        get_feature_network(digits, cache_dir=tmp_path)
    assert json.loads((net.directory / "config.json").read_text())["version"] == features.VERSION


def test_unreadable_config_retrains(digits, tmp_path, tiny_preset):
    net = get_feature_network(digits, cache_dir=tmp_path)
    (net.directory / "config.json").write_text("{not json")
    with pytest.warns(UserWarning, match="retraining"):
        again = get_feature_network(digits, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.features(digits.test), net.features(digits.test))


def test_data_hash_sees_every_pixel(digits):
    changed = digits.train.clone()
    changed[0, 0, 0, 0] += 0.5
    other = ImageDataset("digits", changed, digits.test, digits.train_labels, digits.test_labels, 10)
    assert dataset_hash(other) != dataset_hash(digits)
    assert dataset_hash(load_dataset("digits")) == dataset_hash(digits)


def test_input_checks(trained):
    net, _ = trained
    with pytest.raises(GenbenchError, match=r"takes \(N, 1, 8, 8\) images, got shape \(2, 1, 28, 28\)"):
        net.features(torch.rand(2, 1, 28, 28))
    with pytest.raises(GenbenchError, match=r"takes \(N, 1, 8, 8\) images, got shape \(1, 8, 8\)"):
        net.predict(torch.rand(1, 8, 8))
    with pytest.raises(GenbenchError, match=r"must lie in \[0, 1\], found range \[-1"):
        net.features(torch.linspace(-1, 1, 128).reshape(2, 1, 8, 8))
    with pytest.raises(GenbenchError, match="expected a tensor or numpy array"):
        net.features([[0.0]])


def test_the_classifier_is_refused_for_an_unlabelled_dataset_and_unknown_kinds_everywhere(tmp_path, digits):
    folder = ImageDataset("folder", torch.rand(4, 3, 8, 8), torch.rand(2, 3, 8, 8))
    with pytest.raises(GenbenchError, match="dataset 'folder' has no labels: the classifier feature network needs"):
        get_feature_network(folder, cache_dir=tmp_path, kind="classifier")
    with pytest.raises(GenbenchError, match="unknown feature network 'inception'; valid: classifier, contrastive"):
        get_feature_network(digits, cache_dir=tmp_path, kind="inception")
    assert not any(tmp_path.iterdir())
    assert features.default_kind(folder) == "contrastive" and features.default_kind(digits) == "classifier"


def test_data_hash_is_the_hash_of_the_whole_float32_splits(digits, monkeypatch):
    """The hash is taken a chunk at a time; it must be the one of the whole arrays (cache keys of
    existing networks stay valid), also for uint8 storage and a last partial chunk."""
    def whole(ds):
        h = hashlib.sha256(ds.name.encode())
        for t in (ds.train, ds.test, ds.train_labels, ds.test_labels):
            a = np.ascontiguousarray(t.numpy())
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(memoryview(a).cast("B"))
        return h.hexdigest()

    monkeypatch.setattr(features, "HASH_CHUNK_IMAGES", 100)  # 1437 = 14 chunks + 37
    assert dataset_hash(digits) == whole(digits)
    g = torch.Generator().manual_seed(0)
    u8 = ImageDataset("u8", torch.randint(0, 256, (250, 3, 4, 4), dtype=torch.uint8, generator=g),
                      torch.randint(0, 256, (30, 3, 4, 4), dtype=torch.uint8, generator=g),
                      torch.zeros(250, dtype=torch.int64), torch.zeros(30, dtype=torch.int64), 1)
    assert dataset_hash(u8) == whole(u8)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "features"
    monkeypatch.delenv("GENBENCH_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "genbench", "features")


def test_random_shift_is_a_zero_filled_translation():
    x = torch.rand(64, 2, 6, 5)
    out = random_shift(x, 2, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    seen = set()
    for i in range(len(x)):
        matches = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(out[i], padded[i, :, dy : dy + 6, dx : dx + 5])
        ]
        assert matches, f"image {i} is not a translation of its input"
        seen.add(matches[0])
    assert len(seen) > 10  # the shifts vary across the batch
    assert torch.equal(random_shift(x, 0, torch.Generator()), x)
