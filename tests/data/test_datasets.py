"""Tests for genbench.data.

References: scikit-learn's own ``load_digits`` arrays; IDX files written here byte by byte with
``struct`` (not with the reader's code); the published first labels of Fashion-MNIST
(zalandoresearch/fashion-mnist); Pillow images of solid, known colours whose crop and resize
results are known in closed form.
"""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from genbench import data
from genbench.data import DATASETS, ImageDataset, default_data_dir, load_dataset, parse_idx, read_idx
from genbench.errors import GenbenchError

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# struct format letter and numpy dtype per IDX type code, written out independently of data.py
STRUCT_FORMATS = {0x08: "B", 0x09: "b", 0x0B: "h", 0x0C: "i", 0x0D: "f", 0x0E: "d"}


def idx_bytes(values, dims, type_code=0x08) -> bytes:
    """An IDX file built by hand: magic 00 00 TT DD, big-endian uint32 dims, big-endian items."""
    values = list(np.asarray(values).ravel().tolist())
    fmt = STRUCT_FORMATS[type_code]
    header = struct.pack(">BBBB", 0, 0, type_code, len(dims)) + struct.pack(f">{len(dims)}I", *dims)
    return header + struct.pack(f">{len(values)}{fmt}", *values)


def write(path: Path, payload: bytes, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload, mtime=0) if gz else payload)
    return path


def write_idx_dataset(directory: Path, n_train=5, n_test=3, side=4, gz=True, seed=0, label_offset=0):
    """Four tiny IDX files; returns the uint8 images and labels that were written."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, side, side), dtype=np.uint8)
        labels = (np.arange(n) + label_offset) % 10
        suffix = ".gz" if gz else ""
        write(directory / f"{split}-images-idx3-ubyte{suffix}", idx_bytes(images, (n, side, side)), gz)
        write(directory / f"{split}-labels-idx1-ubyte{suffix}", idx_bytes(labels, (n,)), gz)
        out[split] = (images, labels)
    return out


@pytest.fixture
def no_env(monkeypatch, tmp_path):
    """No $GENBENCH_DATA and a system directory that does not exist."""
    monkeypatch.delenv("GENBENCH_DATA", raising=False)
    monkeypatch.setitem(data.SYSTEM_DIRS, "fashion-mnist", tmp_path / "no-system-dir")
    monkeypatch.setitem(data.SYSTEM_DIRS, "mnist", tmp_path / "no-system-dir-mnist")


# ---------------------------------------------------------------------------------------------
# digits


def test_digits_split_shapes_range_and_determinism():
    ds = load_dataset("digits")
    assert ds.train.shape == (1437, 1, 8, 8) and ds.test.shape == (360, 1, 8, 8)
    assert ds.shape == (1, 8, 8) and ds.num_pixels == 64 and ds.num_classes == 10
    assert ds.train.dtype == torch.float32 and ds.train_labels.dtype == torch.int64
    assert 0.0 <= ds.train.min() and ds.train.max() == 1.0 and ds.test.max() <= 1.0
    assert sorted(ds.test_labels.unique().tolist()) == list(range(10))
    again = load_dataset("digits")
    assert torch.equal(ds.train, again.train) and torch.equal(ds.test_labels, again.test_labels)
    # stratified: each class holds ~20% of its ~180 images in test
    counts = torch.bincount(ds.test_labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37


def test_digits_is_a_partition_of_sklearn_digits():
    from sklearn.datasets import load_digits

    ref = load_digits()
    ds = load_dataset("digits")
    ours = torch.cat([ds.train, ds.test]).reshape(-1, 64).numpy() * 16
    labels = torch.cat([ds.train_labels, ds.test_labels]).numpy()
    # multiset of (pixels..., label) rows must be exactly sklearn's
    rows = sorted(tuple(r) + (int(y),) for r, y in zip(np.rint(ours).astype(int).tolist(), labels))
    ref_rows = sorted(tuple(r) + (int(y),) for r, y in zip(ref.data.astype(int).tolist(), ref.target))
    assert rows == ref_rows
    np.testing.assert_allclose(ours, np.rint(ours), atol=1e-5)  # /16 exactly, no resampling


def test_digits_limit_resize_and_fresh_tensors():
    full = load_dataset("digits")
    small = load_dataset("digits", limit=10)
    assert small.train.shape == (10, 1, 8, 8) and small.test.shape == (10, 1, 8, 8)
    assert torch.equal(small.train, full.train[:10]) and torch.equal(small.test_labels, full.test_labels[:10])
    assert torch.equal(load_dataset("digits", image_size=8).train, full.train)  # native size: untouched
    big = load_dataset("digits", image_size=16, limit=50)
    assert big.shape == (1, 16, 16) and 0.0 <= big.train.min() and big.train.max() <= 1.0
    # bilinear 2x upsampling roughly preserves each image's mean intensity
    torch.testing.assert_close(big.train.mean((1, 2, 3)), full.train[:50].mean((1, 2, 3)), atol=0.03, rtol=0)
    # callers own their tensors: modifying one in place does not leak into the next load
    small.train.fill_(7.0)
    assert load_dataset("digits", limit=10).train.max() <= 1.0


def test_bad_arguments():
    with pytest.raises(GenbenchError, match=r"unknown dataset 'cifar'.*digits, fashion-mnist, mnist, folder, emoji"):
        load_dataset("cifar")
    assert DATASETS == ("digits", "fashion-mnist", "mnist", "folder", "emoji")
    with pytest.raises(GenbenchError, match="limit must be a positive integer, got 0"):
        load_dataset("digits", limit=0)
    with pytest.raises(GenbenchError, match="image_size must be a positive integer, got 2.5"):
        load_dataset("digits", image_size=2.5)
    with pytest.raises(GenbenchError, match="digits.*takes no data_dir"):
        load_dataset("digits", data_dir="/tmp")
    with pytest.raises(GenbenchError, match="has no data directory"):
        default_data_dir("digits")


def test_image_dataset_validates():
    x = torch.rand(4, 1, 2, 2)
    with pytest.raises(GenbenchError, match="test must be a float32 tensor"):
        ImageDataset("t", x, x.double())
    with pytest.raises(GenbenchError, match=r"train images are \(1, 2, 2\) but test images are \(3, 2, 2\)"):
        ImageDataset("t", x, torch.rand(4, 3, 2, 2))
    with pytest.raises(GenbenchError, match=r"train_labels must lie in \[0, 3\)"):
        ImageDataset("t", x, x, torch.tensor([0, 1, 2, 3]), torch.zeros(4, dtype=torch.int64), 3)
    with pytest.raises(GenbenchError, match="labels and num_classes go together"):
        ImageDataset("t", x, x, torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.int64))
    assert "train=4" in repr(ImageDataset("t", x, x))


# ---------------------------------------------------------------------------------------------
# IDX reader


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "type_code,values,dims",
    [
        (0x08, [0, 1, 127, 255, 9, 3], (2, 3)),
        (0x09, [-128, -1, 0, 127], (4,)),
        (0x0B, [-32768, 2, 300, 32767, 0, -5, 7, 8], (2, 2, 2)),
        (0x0C, [-(2**31), 2**31 - 1, 65536], (3, 1)),
        (0x0D, [0.5, -1.25, 3.0e10, 0.0], (1, 4)),
        (0x0E, [1e-300, -2.5, 3.141592653589793], (3,)),
    ],
)
def test_read_idx_round_trip(tmp_path, gz, type_code, values, dims):
    path = write(tmp_path / ("x.idx.gz" if gz else "x.idx"), idx_bytes(values, dims, type_code), gz)
    got = read_idx(path)
    assert got.shape == dims and got.dtype.isnative and got.flags.writeable
    assert got.dtype.itemsize == struct.calcsize(STRUCT_FORMATS[type_code])
    np.testing.assert_array_equal(got.ravel(), np.array(values, dtype=got.dtype))


def test_read_idx_detects_gzip_by_content_not_name(tmp_path):
    payload = idx_bytes([1, 2, 3], (3,))
    # browsers often save the decompressed file under its .gz name
    np.testing.assert_array_equal(read_idx(write(tmp_path / "a.gz", payload)), [1, 2, 3])
    np.testing.assert_array_equal(read_idx(write(tmp_path / "b", payload, gz=True)), [1, 2, 3])


@pytest.mark.parametrize(
    "payload,match",
    [
        (b"\x00\x00", "not an IDX file: 2 bytes is shorter than the 4-byte magic"),
        (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "bad IDX magic number 0x01000801"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "bad IDX magic number 0x00000701"),
        (b"\x00\x00\x08\x00", "IDX header declares 0 dimensions"),
        (b"\x00\x00\x08\x03" + struct.pack(">2I", 2, 2), "truncated IDX header: 3 dimensions need 16 bytes"),
        (idx_bytes(range(6), (2, 3))[:-1], r"truncated payload: shape \(2, 3\) of uint8 needs 6 bytes, found 5"),
        (idx_bytes(range(6), (2, 3)) + b"\x00", r"trailing bytes after payload: .*needs 6 bytes, found 7"),
        (idx_bytes([1, 2], (2,), 0x0C)[:-2], r"truncated payload: shape \(2,\) of int32 needs 8 bytes, found 6"),
    ],
)
def test_read_idx_rejects_malformed_files(tmp_path, payload, match):
    for gz in (False, True):
        path = write(tmp_path / f"bad{int(gz)}.idx", payload, gz)
        with pytest.raises(GenbenchError, match=f"bad{int(gz)}.idx: {match}"):
            read_idx(path)


def test_read_idx_corrupt_gzip_and_missing_file(tmp_path):
    good = gzip.compress(idx_bytes(np.arange(200) % 256, (200,)), mtime=0)
    truncated = write(tmp_path / "truncated.gz", good[:-12])
    with pytest.raises(GenbenchError, match="truncated.gz: corrupt gzip stream"):
        read_idx(truncated)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF  # inside the deflate stream: bad data or CRC mismatch
    with pytest.raises(GenbenchError, match="flipped.gz: corrupt gzip stream"):
        read_idx(write(tmp_path / "flipped.gz", bytes(flipped)))
    with pytest.raises(GenbenchError, match="nope.idx: cannot read IDX file"):
        read_idx(tmp_path / "nope.idx")
    with pytest.raises(GenbenchError, match="cannot read IDX file"):
        read_idx(tmp_path)  # a directory


# hypothesis: whatever the bytes, read_idx parses them or raises GenbenchError, nothing else

VALID = idx_bytes(np.arange(24) % 256, (2, 3, 4))
VALID_GZ = gzip.compress(VALID, mtime=0)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64) | st.builds(lambda b: b"\x00\x00" + b, st.binary(max_size=40)))
def test_parse_idx_random_bytes_never_crash(blob):
    try:
        parse_idx(blob)
    except GenbenchError:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    code=st.sampled_from(sorted(STRUCT_FORMATS)),
    dims=st.lists(st.integers(0, 3), min_size=1, max_size=3),
    extra=st.integers(-5, 5),
    seed=st.integers(0, 2**16),
)
def test_parse_idx_valid_header_random_payload(code, dims, extra, seed):
    """A well-formed header with a payload of the right length parses to the struct reference;
    any other length is rejected."""
    fmt = STRUCT_FORMATS[code]
    n, itemsize = int(np.prod(dims)), struct.calcsize(fmt)
    payload = np.random.default_rng(seed).bytes(max(n * itemsize + extra, 0))
    blob = struct.pack(">BBBB", 0, 0, code, len(dims)) + struct.pack(f">{len(dims)}I", *dims) + payload
    if len(payload) != n * itemsize:
        with pytest.raises(GenbenchError, match="truncated payload|trailing bytes"):
            parse_idx(blob)
        return
    got = parse_idx(blob)
    expected = struct.unpack(f">{n}{fmt}", payload)
    assert got.shape == tuple(dims)
    np.testing.assert_array_equal(got.ravel(), np.array(expected, dtype=got.dtype))


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    source=st.sampled_from([VALID, VALID_GZ]),
    cut=st.integers(0, len(VALID_GZ)),
    noise=st.binary(max_size=8),
    flip=st.none() | st.integers(0, len(VALID_GZ) - 1),
)
def test_read_idx_truncated_or_damaged_files_never_crash(fuzz_dir, source, cut, noise, flip):
    blob = bytearray(source[:cut] + noise)
    if flip is not None and flip < len(blob):
        blob[flip] ^= 0x5A
    path = fuzz_dir / "fuzz.idx"
    path.write_bytes(bytes(blob))
    try:
        got = read_idx(path)
    except GenbenchError as e:
        assert str(path) in str(e)
        return
    if bytes(blob) in (VALID, VALID_GZ):
        np.testing.assert_array_equal(got, (np.arange(24) % 256).reshape(2, 3, 4))


# ---------------------------------------------------------------------------------------------
# fashion-mnist / mnist: directory resolution and loading from hand-made files


def test_idx_dataset_from_explicit_dir_values_exact(tmp_path, no_env):
    written = write_idx_dataset(tmp_path / "d", gz=True)
    ds = load_dataset("fashion-mnist", data_dir=tmp_path / "d")
    train_x, train_y = written["train"]
    assert ds.train.shape == (5, 1, 4, 4) and ds.test.shape == (3, 1, 4, 4)
    torch.testing.assert_close(ds.train[:, 0], torch.from_numpy(train_x.astype(np.float32) / 255))
    assert ds.train_labels.tolist() == train_y.tolist() and ds.num_classes == 10
    assert ds.test_labels.dtype == torch.int64
    limited = load_dataset("fashion-mnist", data_dir=tmp_path / "d", limit=2, image_size=8)
    assert limited.train.shape == (2, 1, 8, 8) and limited.test.shape == (2, 1, 8, 8)
    assert 0.0 <= limited.train.min() and limited.train.max() <= 1.0


def test_idx_pixels_stay_uint8_and_read_as_the_floats_of_before(tmp_path, no_env):
    written = write_idx_dataset(tmp_path / "d", n_train=6, side=5)
    ds = load_dataset("fashion-mnist", data_dir=tmp_path / "d")
    assert ds.train_pixels.dtype == torch.uint8 and ds.train_pixels.nbytes == 6 * 25  # 1 byte a pixel
    # bit for bit what the loader gave before: float32 p / 255
    assert torch.equal(ds.train[:, 0], torch.from_numpy(written["train"][0].astype(np.float32) / np.float32(255)))
    # another size is reached in float and kept as float32: resized values are not multiples of 1/255
    assert load_dataset("fashion-mnist", data_dir=tmp_path / "d", image_size=8).train_pixels.dtype == torch.float32
    parts = [load_dataset("fashion-mnist", data_dir=tmp_path / "d", shard=(r, 4)) for r in range(4)]
    assert [len(p.train_pixels) for p in parts] == [1, 2, 1, 2] and all(p.num_train == 6 for p in parts)
    assert torch.equal(torch.cat([p.train_pixels for p in parts]), ds.train_pixels)
    assert torch.equal(torch.cat([p.train_labels for p in parts]), ds.train_labels)


def test_digits_keep_their_exact_float32_values_and_shard():
    ds = load_dataset("digits", limit=100)
    assert ds.train_pixels.dtype == torch.float32  # k/16 is not a multiple of 1/255
    halves = [load_dataset("digits", limit=100, shard=(r, 2)) for r in range(2)]
    assert torch.equal(torch.cat([h.train for h in halves]), ds.train) and halves[1].num_train == 100
    assert torch.equal(halves[0].test, ds.test)


def test_idx_dataset_raw_and_dotted_names(tmp_path, no_env):
    d = tmp_path / "raw"
    written = write_idx_dataset(d, gz=False)
    (d / "t10k-images-idx3-ubyte").rename(d / "t10k-images.idx3-ubyte")
    ds = load_dataset("mnist", data_dir=d)
    torch.testing.assert_close(ds.test[:, 0], torch.from_numpy(written["t10k"][0] / np.float32(255)))


def test_data_dir_resolution_order(tmp_path, monkeypatch, no_env):
    env_root, explicit = tmp_path / "env", tmp_path / "explicit"
    write_idx_dataset(env_root / "fashion-mnist", n_train=4, seed=1)
    write_idx_dataset(env_root / "mnist", n_train=6, seed=2)
    write_idx_dataset(explicit, n_train=7, seed=3)
    monkeypatch.setenv("GENBENCH_DATA", str(env_root))
    # $GENBENCH_DATA with one subfolder per dataset
    assert default_data_dir("fashion-mnist") == env_root / "fashion-mnist"
    assert len(load_dataset("fashion-mnist").train) == 4
    assert len(load_dataset("mnist").train) == 6
    # the explicit argument beats the environment
    assert default_data_dir("fashion-mnist", explicit) == explicit
    assert len(load_dataset("fashion-mnist", data_dir=explicit).train) == 7
    # $GENBENCH_DATA holding the files directly
    monkeypatch.setenv("GENBENCH_DATA", str(explicit))
    assert len(load_dataset("mnist").train) == 7
    # without the environment: the system directory
    monkeypatch.delenv("GENBENCH_DATA")
    monkeypatch.setitem(data.SYSTEM_DIRS, "fashion-mnist", env_root / "fashion-mnist")
    assert len(load_dataset("fashion-mnist").train) == 4


def test_missing_files_errors_name_the_directory_and_the_fix(tmp_path, monkeypatch, no_env):
    with pytest.raises(GenbenchError, match="no-system-dir") as e:
        load_dataset("fashion-mnist")
    msg = str(e.value)
    for needle in ("system default", "sudo apt-get install dataset-fashion-mnist", "--data-dir", "GENBENCH_DATA"):
        assert needle in msg
    # a set $GENBENCH_DATA is searched, not silently skipped for the system directory
    monkeypatch.setenv("GENBENCH_DATA", str(tmp_path / "empty-env"))
    with pytest.raises(GenbenchError, match=r"empty-env \(\$GENBENCH_DATA\).*dataset-fashion-mnist"):
        load_dataset("fashion-mnist")
    partial = tmp_path / "partial"
    write_idx_dataset(partial)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(GenbenchError, match=r"partial \(data_dir argument\).*missing t10k-labels-idx1-ubyte\[\.gz\]\. To fix"):
        load_dataset("mnist", data_dir=partial)


def test_idx_dataset_content_errors(tmp_path, no_env):
    d = tmp_path / "d"
    write_idx_dataset(d)
    # count mismatch between images and labels
    write(d / "train-labels-idx1-ubyte.gz", idx_bytes([1, 2, 3], (3,)), gz=True)
    with pytest.raises(GenbenchError, match=r"train-images-idx3-ubyte.gz holds 5 images but .*train-labels-idx1-ubyte.gz holds 3 labels"):
        load_dataset("fashion-mnist", data_dir=d)
    # labels out of range
    write(d / "train-labels-idx1-ubyte.gz", idx_bytes([0, 1, 12, 3, 4], (5,)), gz=True)
    with pytest.raises(GenbenchError, match="train-labels-idx1-ubyte.gz: label 12 outside the 10 classes"):
        load_dataset("fashion-mnist", data_dir=d)
    write(d / "train-labels-idx1-ubyte.gz", idx_bytes([0, 1, 2, 3, 4], (5,)), gz=True)
    # wrong number of dimensions: a 2-d array where (N, H, W) images belong
    write(d / "t10k-images-idx3-ubyte.gz", idx_bytes(range(12), (3, 4)), gz=True)
    with pytest.raises(GenbenchError, match=r"t10k-images-idx3-ubyte.gz: expected uint8 images of shape \(N, H, W\), found uint8 of shape \(3, 4\)"):
        load_dataset("fashion-mnist", data_dir=d)
    # train/test image sizes disagree
    write(d / "t10k-images-idx3-ubyte.gz", idx_bytes(np.zeros(3 * 25, int), (3, 5, 5)), gz=True)
    with pytest.raises(GenbenchError, match=r"train images are \(4, 4\) but test images are \(5, 5\)"):
        load_dataset("fashion-mnist", data_dir=d)
    # a corrupt file inside a dataset is named
    write(d / "t10k-images-idx3-ubyte.gz", b"\x1f\x8b garbage")
    with pytest.raises(GenbenchError, match="t10k-images-idx3-ubyte.gz: corrupt gzip stream"):
        load_dataset("fashion-mnist", data_dir=d)


def test_idx_memo_sees_replaced_files_and_hands_out_copies(tmp_path, no_env):
    d = tmp_path / "d"
    write_idx_dataset(d, n_train=5)
    first = load_dataset("fashion-mnist", data_dir=d)
    first.train.zero_()
    first.train_labels.fill_(9)
    second = load_dataset("fashion-mnist", data_dir=d)
    assert second.train.max() > 0 and second.train_labels.tolist() == [0, 1, 2, 3, 4]
    write_idx_dataset(d, n_train=8, seed=5)
    assert len(load_dataset("fashion-mnist", data_dir=d).train) == 8


@pytest.mark.skipif(
    not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason=f"Fashion-MNIST not installed at {FMNIST_DIR} (sudo apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv("GENBENCH_DATA", raising=False)
    ds = load_dataset("fashion-mnist", limit=100)
    assert ds.train.shape == (100, 1, 28, 28) and ds.test.shape == (100, 1, 28, 28)
    assert ds.train.min() == 0.0 and ds.train.max() == 1.0
    assert ds.train_labels.min() >= 0 and ds.train_labels.max() <= 9
    # first labels as published with the data set (9 = ankle boot)
    assert ds.train_labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert ds.test_labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    # the full label file: 60000 labels, 6000 per class
    counts = np.bincount(read_idx(FMNIST_DIR / "train-labels-idx1-ubyte.gz"), minlength=10)
    assert counts.tolist() == [6000] * 10


# ---------------------------------------------------------------------------------------------
# folder


def save(path: Path, mode: str, size, color) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def test_folder_rgb_split_order_and_values(tmp_path):
    root = tmp_path / "rgb"
    colors = [(10 * i, 255 - 10 * i, (37 * i) % 256) for i in range(23)]
    sizes = [(40, 30), (17, 50), (32, 32)]
    for i, c in enumerate(colors):
        sub = "b/deep" if i % 2 else "a"  # two classes; images below a class folder at any depth
        ext = "PNG" if i % 3 == 0 else "png"  # case-insensitive extension
        save(root / sub / f"img{i:02d}.{ext}", "RGB", sizes[i % 3], c)
    (root / "notes.txt").write_text("not an image")
    save(root / ".hidden.png", "RGB", (8, 8), (0, 0, 0))
    ds = load_dataset("folder", data_dir=root, image_size=8)
    assert ds.train.shape == (20, 3, 8, 8) and ds.test.shape == (3, 3, 8, 8)
    assert ds.class_names == ("a", "b") and ds.num_classes == 2 and ds.name == "folder"
    # sorted by relative path: a/img*, then b/deep/img*; every 10th is test
    order = [i for i in range(23) if i % 2 == 0] + [i for i in range(23) if i % 2]
    labels = torch.tensor([i % 2 for i in order])
    assert torch.equal(ds.train_labels, labels[torch.arange(23) % 10 != 0])
    assert torch.equal(ds.test_labels, labels[torch.arange(23) % 10 == 0])
    expected = torch.tensor([colors[i] for i in order], dtype=torch.float32) / 255
    is_test = torch.arange(23) % 10 == 0
    # a solid image stays solid through crop and bicubic resize
    torch.testing.assert_close(ds.test.mean((2, 3)), expected[is_test], atol=1 / 255, rtol=0)
    torch.testing.assert_close(ds.train.mean((2, 3)), expected[~is_test], atol=1 / 255, rtol=0)
    assert (ds.train.amax((2, 3)) - ds.train.amin((2, 3))).max() <= 1 / 255 + 1e-6
    again = load_dataset("folder", data_dir=root, image_size=8)
    assert torch.equal(ds.train, again.train) and torch.equal(ds.test, again.test)
    limited = load_dataset("folder", data_dir=root, image_size=8, limit=2)
    assert torch.equal(limited.train, ds.train[:2]) and torch.equal(limited.test, ds.test[:2])
    assert load_dataset("folder", data_dir=root).shape == (3, 32, 32)  # default size


def test_folder_center_crop(tmp_path):
    # 30x10 with red | green | blue thirds: the centered 10x10 square is pure green
    image = np.zeros((10, 30, 3), np.uint8)
    image[:, :10, 0] = image[:, 10:20, 1] = image[:, 20:, 2] = 255
    for i in range(2):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    ds = load_dataset("folder", data_dir=tmp_path, image_size=5)
    expected = torch.zeros(3, 5, 5)
    expected[1] = 1.0
    torch.testing.assert_close(ds.train[0], expected)
    # tall image: the middle rows
    tall = np.zeros((30, 10), np.uint8)
    tall[10:20] = 200
    for i in range(2):
        Image.fromarray(tall).save(tmp_path / f"{i}.png")
    torch.testing.assert_close(load_dataset("folder", data_dir=tmp_path, image_size=4).test, torch.full((1, 1, 4, 4), 200 / 255))


def test_folder_grayscale_jpeg_and_mixed(tmp_path):
    gray = tmp_path / "gray"
    for i in range(12):
        save(gray / f"g{i}.jpg", "L", (20 + i, 24), 20 * i)
    save(gray / "bw.JPEG", "1", (9, 9), 1)
    ds = load_dataset("folder", data_dir=gray, image_size=6)
    assert ds.shape == (1, 6, 6) and len(ds.train) == 11 and len(ds.test) == 2
    assert 0.0 <= ds.train.min() and ds.train.max() <= 1.0
    # sorted: bw.JPEG (white, test), g0, g1, g10, g11, g2, ..., g7 (test), ... (JPEG: small error allowed)
    torch.testing.assert_close(ds.test[:, 0].mean((1, 2)), torch.tensor([1.0, 140 / 255]), atol=3 / 255, rtol=0)
    torch.testing.assert_close(ds.train[:3, 0].mean((1, 2)), torch.tensor([0, 20, 200]) / 255, atol=3 / 255, rtol=0)
    # one RGB image makes the whole folder RGB; greys become equal channels
    save(gray / "zz.png", "RGB", (10, 10), (255, 0, 0))
    mixed = load_dataset("folder", data_dir=gray, image_size=6)
    assert mixed.shape == (3, 6, 6)
    torch.testing.assert_close(mixed.train[1, 0], mixed.train[1, 2])
    torch.testing.assert_close(mixed.train[-1].mean((1, 2)), torch.tensor([1.0, 0.0, 0.0]), atol=1 / 255, rtol=0)


def test_folder_16bit_grayscale_png_is_scaled(tmp_path):
    for i, v in enumerate((65535, 32768)):
        Image.fromarray(np.full((12, 12), v, np.uint16)).save(tmp_path / f"{i}.png")
    ds = load_dataset("folder", data_dir=tmp_path, image_size=4)
    assert ds.shape == (1, 4, 4)
    torch.testing.assert_close(ds.test, torch.ones(1, 1, 4, 4))
    torch.testing.assert_close(ds.train, torch.full((1, 1, 4, 4), 32768 / 65535))


def test_folder_errors(tmp_path):
    with pytest.raises(GenbenchError, match="'folder' needs data_dir"):
        load_dataset("folder")
    with pytest.raises(GenbenchError, match="missing is not a directory"):
        load_dataset("folder", data_dir=tmp_path / "missing")
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("x")
    with pytest.raises(GenbenchError, match=f"no .png/.jpg/.jpeg images found under {empty}"):
        load_dataset("folder", data_dir=empty)
    save(empty / "one.png", "RGB", (4, 4), (1, 2, 3))
    with pytest.raises(GenbenchError, match="holds only 1 image; need at least 2"):
        load_dataset("folder", data_dir=empty)
    (empty / "broken.png").write_bytes(b"definitely not a PNG" * 10)
    with pytest.raises(GenbenchError, match=r"empty/broken.png: cannot decode image: cannot identify image file"):
        load_dataset("folder", data_dir=empty)
    # a PNG whose header is fine but whose pixel data is cut off
    full = save(tmp_path / "trunc" / "a.png", "RGB", (64, 64), (5, 6, 7))
    save(tmp_path / "trunc" / "b.png", "RGB", (64, 64), (5, 6, 7))
    full.write_bytes(full.read_bytes()[:60])
    with pytest.raises(GenbenchError, match="a.png: cannot decode image"):
        load_dataset("folder", data_dir=tmp_path / "trunc")
