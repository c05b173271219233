"""The `emoji` dataset: what the font holds, rendered once into the cache, split by code points, and
bad or missing fonts as one clear error.

References: the count and split sizes of Debian 12's Noto Color Emoji 2.042 (1381 single code points,
258 flag and 12 keycap ligatures, 8 flags drawn like another, 250 test emoji) were read off the font
with fontTools and checked by eye on a contact sheet; U+1F600 is a yellow face, tested loosely (red
and green high, blue low, over a third of its pixels).
"""

import json
import os
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import ImageFont

from genbench.cli import main
from genbench.data import cache, emoji, load_dataset
from genbench.errors import GenbenchError

needs_font = pytest.mark.skipif(not emoji.SYSTEM_FONT.is_file(), reason=(
    f"{emoji.SYSTEM_FONT} missing: install it with 'sudo apt-get install fonts-noto-color-emoji' "
    "(scripts/setup_system.sh data does it; CI has it)"))

AE = ["--set", "arch=mlp", "--set", "latent_dim=4", "--set", "width=32", "--set", "train.steps=4",
      "--set", "train.batch_size=8", "--set", "train.ckpt_every=2", "--limit", "32", "--no-progress"]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A GENBENCH_CACHE of this test's own, so that cache hits and misses are this test's."""
    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GENBENCH_DATA", raising=False)
    return tmp_path / "cache" / cache.CACHE_KIND


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """The dataset at 32x32, rendered once for the module into a cache of its own: (dataset, the
    cache's datasets folder)."""
    if not emoji.SYSTEM_FONT.is_file():
        pytest.skip("fonts-noto-color-emoji not installed")
    root = tmp_path_factory.mktemp("emoji-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GENBENCH_CACHE", str(root))
        mp.delenv("GENBENCH_DATA", raising=False)
        ds = load_dataset("emoji", progress=False)
    return ds, root / cache.CACHE_KIND


def index_of(entries_dir):
    (entry,) = entries_dir.glob("emoji-*")
    return json.loads((entry / cache.INDEX_FILE).read_text())


# ---------------------------------------------------------------------------------------------
# what the font holds


@needs_font
def test_over_a_thousand_distinct_colour_images_without_labels(rendered):
    ds, _ = rendered
    assert ds.name == "emoji" and ds.num_classes is None and ds.train_labels is None and ds.test_labels is None
    assert ds.train_pixels.dtype == ds.test_pixels.dtype == torch.uint8 and ds.shape == (3, 32, 32)
    everything = torch.cat([ds.train_pixels, ds.test_pixels]).flatten(1)
    assert len(torch.unique(everything, dim=0)) == len(everything) >= 1000
    assert len(ds.test_pixels) >= 200  # FD is computed against the test split (Debian 12's font: 1393 / 250)
    assert int(everything.min()) == 0 and int(everything.max()) == 255
    # no image is blank (one colour all over)
    assert (everything.float().std(1) > 10).all()


@needs_font
def test_the_sequences_are_singles_flags_and_keycaps():
    sequences = emoji.emoji_sequences(emoji.SYSTEM_FONT)
    assert len(sequences) == len(set(sequences)) >= 1500  # Debian 12's font: 1381 + 258 + 12 = 1651
    assert "\U0001F600" in sequences and "\U0001F1FA\U0001F1F8" in sequences and "#\u20e3" in sequences
    assert all(not ("\U0001F3FB" <= c <= "\U0001F3FF") for s in sequences for c in s)  # no skin tones
    assert not any(len(s) == 1 and ord(s) < 0x80 for s in sequences)  # no plain digits
    assert "\U0001F1E6\U0001F1E6" not in sequences  # no flag: the font's "?" flag


@needs_font
def test_a_grinning_face_is_yellow():
    font = ImageFont.truetype(str(emoji.SYSTEM_FONT), emoji.STRIKE_PX)
    face = np.asarray(emoji.render(font, "\U0001F600")).astype(int)
    assert face.shape[0] == face.shape[1] >= 100  # cropped to the glyph, padded to a square
    r, g, b = face[..., 0], face[..., 1], face[..., 2]
    yellow = (r > 200) & (g > 150) & (b < 100)
    assert yellow.mean() > 0.3, yellow.mean()
    assert emoji.render(font, "\U000E0030") is None  # a tag character draws nothing


@needs_font
def test_the_cached_grinning_face_is_yellow_too(rendered):
    ds, entries = rendered
    names = index_of(entries)["emoji"]
    row = names.index("1F600")
    n_train = len(ds.train_pixels)
    face = (ds.train_pixels[row] if row < n_train else ds.test_pixels[row - n_train]).int()
    yellow = (face[0] > 200) & (face[1] > 150) & (face[2] < 100)
    assert yellow.float().mean() > 0.3


# ---------------------------------------------------------------------------------------------
# split, determinism, cache


@needs_font
def test_the_split_is_disjoint_and_follows_the_code_points(rendered):
    ds, entries = rendered
    index = index_of(entries)
    names, n_train = index["emoji"], index["num_train"]
    assert n_train == len(ds.train_pixels) and len(names) == n_train + len(ds.test_pixels)
    sequence = {emoji.code_points(s): s for s in emoji.emoji_sequences(emoji.SYSTEM_FONT)}
    assert [emoji.is_test(sequence[n]) for n in names] == [False] * n_train + [True] * (len(names) - n_train)
    assert not set(names[:n_train]) & set(names[n_train:])
    train = {bytes(x.numpy()) for x in ds.train_pixels.flatten(1)}
    assert not any(bytes(x.numpy()) in train for x in ds.test_pixels.flatten(1))
    assert 0.10 < len(ds.test_pixels) / len(names) < 0.20


@needs_font
def test_a_cache_hit_equals_a_fresh_render(rendered, cache_dir):
    ds, entries = rendered
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GENBENCH_CACHE", str(entries.parent))
        again = load_dataset("emoji", progress=False)  # the module's cache: a hit
    fresh = load_dataset("emoji", progress=False)  # this test's empty cache: rendered anew
    for other in (again, fresh):
        assert torch.equal(other.train_pixels, ds.train_pixels) and torch.equal(other.test_pixels, ds.test_pixels)
    assert len(list(cache_dir.glob("emoji-*/pixels-*.npy"))) == 1


def test_the_cache_is_keyed_on_the_font_file_and_the_size(tmp_path, cache_dir, monkeypatch):
    """Rendering is replaced by a stub that counts its calls: this is about when it is called."""
    calls = []

    def fake_render_all(path, size, progress=True):
        calls.append(size)
        names = [chr(0x1F600 + i) for i in range(40)]
        return names, np.full((40, 3, size, size), len(calls), np.uint8)

    monkeypatch.setattr(emoji, "render_all", fake_render_all)
    font = tmp_path / "fonts" / emoji.FONT_FILE
    font.parent.mkdir()
    font.write_bytes(b"a font")
    first = load_dataset("emoji", data_dir=font.parent)
    load_dataset("emoji", data_dir=font)  # the same file: a hit
    assert calls == [32]
    load_dataset("emoji", data_dir=font.parent, image_size=16)
    assert calls == [32, 16]
    os.utime(font, ns=(10**18, 10**18))  # a touched (maybe replaced) font
    touched = load_dataset("emoji", data_dir=font.parent)
    assert calls == [32, 16, 32]
    assert int(first.train_pixels[0, 0, 0, 0]) == 1 and int(touched.train_pixels[0, 0, 0, 0]) == 3
    assert len(first.train_pixels) + len(first.test_pixels) == 40


# ---------------------------------------------------------------------------------------------
# the options every loader has


@needs_font
def test_limit_and_shard_are_views_of_the_same_images(rendered):
    ds, entries = rendered
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GENBENCH_CACHE", str(entries.parent))
        small = load_dataset("emoji", limit=10, progress=False)
        shards = [load_dataset("emoji", shard=(r, 3), progress=False) for r in range(3)]
        small_shard = load_dataset("emoji", limit=10, shard=(1, 2), progress=False)
    assert torch.equal(small.train_pixels, ds.train_pixels[:10]) and torch.equal(small.test_pixels, ds.test_pixels[:10])
    assert small.spec.limit == 10 and small.spec.name == "emoji"
    assert torch.equal(torch.cat([s.train_pixels for s in shards]), ds.train_pixels)
    assert all(s.num_train == len(ds.train_pixels) and torch.equal(s.test_pixels, ds.test_pixels) for s in shards)
    assert torch.equal(small_shard.train_pixels, ds.train_pixels[5:10]) and small_shard.num_train == 10


@needs_font
def test_image_size_64(rendered, cache_dir):
    small, _ = rendered
    ds = load_dataset("emoji", image_size=64, progress=False)
    assert ds.shape == (3, 64, 64) and ds.train_pixels.dtype == torch.uint8
    assert (len(ds.train_pixels), len(ds.test_pixels)) == (len(small.train_pixels), len(small.test_pixels))
    # the same emoji in the same rows: halving the 64x64 images comes close to the 32x32 ones
    halved = torch.nn.functional.avg_pool2d(ds.test_pixels.float(), 2)
    assert (halved - small.test_pixels.float()).abs().mean() < 8


# ---------------------------------------------------------------------------------------------
# where the font is, and bad fonts


def test_a_missing_font_names_the_package(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setattr(emoji, "SYSTEM_FONT", tmp_path / "none" / emoji.FONT_FILE)
    with pytest.raises(GenbenchError, match=r"sudo apt-get install fonts-noto-color-emoji.*setup_system\.sh data"):
        load_dataset("emoji")
    with pytest.raises(GenbenchError, match=r"no NotoColorEmoji\.ttf at .*\(data_dir\)"):
        load_dataset("emoji", data_dir=tmp_path)


def test_the_font_is_found_in_data_dir_then_genbench_data_then_the_system(tmp_path, cache_dir, monkeypatch):
    system = tmp_path / "system" / emoji.FONT_FILE
    mine = tmp_path / "mine" / "emoji" / emoji.FONT_FILE
    for f in (system, mine):
        f.parent.mkdir(parents=True)
        f.write_bytes(b"x")
    monkeypatch.setattr(emoji, "SYSTEM_FONT", system)
    assert emoji.font_file() == system
    monkeypatch.setenv("GENBENCH_DATA", str(tmp_path / "elsewhere"))  # no font there: the system's
    assert emoji.font_file() == system
    monkeypatch.setenv("GENBENCH_DATA", str(tmp_path / "mine"))
    assert emoji.font_file() == mine
    assert emoji.font_file(tmp_path / "mine" / "emoji") == mine == emoji.font_file(mine)


@pytest.mark.parametrize("damage, match", [
    ("garbage", "cannot read the emoji font (Not a TrueType or OpenType font"),
    ("empty", "cannot read the emoji font (Not a TrueType or OpenType font"),
    ("truncated", "cannot read the emoji font (unexpected end of"),
    ("flipped", "cannot read the emoji font (bad checksum for 'CBDT' table)"),
    ("dejavu", "not a colour bitmap emoji font (it has no CBDT table)"),
])
def test_a_damaged_or_wrong_font_is_one_clear_error(tmp_path, cache_dir, damage, match):
    if damage in ("truncated", "flipped") and not emoji.SYSTEM_FONT.is_file():
        pytest.skip("fonts-noto-color-emoji not installed")
    if damage == "garbage":
        data = b"not a font" * 100
    elif damage == "empty":
        data = b""
    elif damage == "dejavu":  # a good font, but no colour emoji: matplotlib ships it
        data = (Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf").read_bytes()
    else:
        data = emoji.SYSTEM_FONT.read_bytes()
        middle = len(data) // 2
        data = data[:middle] if damage == "truncated" else data[:middle] + bytes(64) + data[middle + 64:]
    (tmp_path / emoji.FONT_FILE).write_bytes(data)
    with pytest.raises(GenbenchError) as e:
        load_dataset("emoji", data_dir=tmp_path)
    assert match in str(e.value) and len(str(e.value).splitlines()) == 1
    assert not list(cache_dir.glob("emoji-*/pixels-*.npy"))  # nothing cached


# ---------------------------------------------------------------------------------------------
# the command line


@needs_font
def test_genbench_train_on_emoji(rendered, tmp_path, monkeypatch):
    _, entries = rendered
    monkeypatch.setenv("GENBENCH_CACHE", str(entries.parent))  # the module's render
    monkeypatch.delenv("GENBENCH_DATA", raising=False)
    out = tmp_path / "run"
    assert main(["train", "ae", "--dataset", "emoji", "--out", str(out), *AE]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "complete"
    assert info["dataset"] == {"name": "emoji", "data_dir": None, "image_size": None, "limit": 32}
    assert (out / "samples.png").is_file() and (out / "reconstructions.png").is_file()
    assert len(list(entries.glob("emoji-*/pixels-*.npy"))) == 1  # the cache served the run


def test_a_missing_font_is_one_line_from_the_command_line(tmp_path, cache_dir, capsys):
    assert main(["train", "ae", "--dataset", "emoji", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"),
                 *AE]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("genbench: error:") and len(err.splitlines()) == 1, err
    assert "fonts-noto-color-emoji" in err
