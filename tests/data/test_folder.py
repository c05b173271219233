"""The `folder` dataset: class sub-folders as labels, bad input as one clear error, uint8 storage
with the floats of before, and the decode cache (reused, invalidated, written atomically).

References: the float32 decoding genbench used before it kept uint8 (Pillow crop + bicubic resize,
then ``np.asarray(image, np.float32) / 255``), written out here independently of the loader;
labels and splits worked out by hand from the file names.
"""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from genbench.cli import main
from genbench.data import cache, folder, load_dataset, unit_float
from genbench.errors import GenbenchError

AE = ["--set", "arch=mlp", "--set", "latent_dim=4", "--set", "width=32", "--set", "train.steps=4",
      "--set", "train.batch_size=8", "--set", "train.ckpt_every=2", "--image-size", "8", "--no-progress"]


def random_png(path, size=(12, 12), seed=0, mode="RGB"):
    """A PNG of random pixels (bicubic resizing of noise exercises every rounding)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)
    return path


def make_folder(root, names, size=(12, 12)):
    return [random_png(root / n, size, seed=i) for i, n in enumerate(names)]


def old_float_pixels(path, size):
    """What the loader produced for an 8-bit RGB image before uint8 storage: float32 (3, S, S)."""
    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy((np.asarray(image, dtype=np.float32) / 255.0).transpose(2, 0, 1).copy())


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A GENBENCH_CACHE of this test's own, so that cache hits and misses are this test's."""
    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / cache.CACHE_KIND


def pixel_files(cache_dir):
    return sorted(cache_dir.glob("folder-*/pixels-*.npy"))


# ---------------------------------------------------------------------------------------------
# layout and labels


def test_class_subfolders_are_labels_in_name_order(tmp_path, cache_dir):
    root = tmp_path / "pets"
    names = [f"dog/d{i}.png" for i in range(7)] + [f"cat/c{i}.png" for i in range(6)] + ["cat/old/c9.jpg"]
    make_folder(root, names)
    (root / "dog" / "notes.txt").write_text("x")
    ds = load_dataset("folder", data_dir=root, image_size=8)
    assert ds.class_names == ("cat", "dog") and ds.num_classes == 2
    # sorted paths: cat/c0..c5, cat/old/c9.jpg, dog/d0..d6; every 10th (index 0 and 10) is test
    labels = [0] * 7 + [1] * 7
    assert ds.test_labels.tolist() == [labels[0], labels[10]] == [0, 1]
    assert ds.train_labels.tolist() == [y for i, y in enumerate(labels) if i % 10]
    assert len(ds.train_pixels) == 12 and len(ds.test_pixels) == 2


def test_images_directly_in_the_folder_are_unlabelled(tmp_path, cache_dir):
    root = tmp_path / "flat"
    make_folder(root, [f"{i}.png" for i in range(5)])
    (root / "empty-subfolder").mkdir()  # holds no images: not a class, not a mixed layout
    ds = load_dataset("folder", data_dir=root, image_size=8)
    assert ds.train_labels is None and ds.num_classes is None and ds.class_names is None


def test_a_mixed_layout_is_one_clear_error(tmp_path, cache_dir):
    root = tmp_path / "mixed"
    make_folder(root, ["a.png", "b.png", "cls/c.png"])
    with pytest.raises(GenbenchError, match=r"holds images both directly \(2, e.g. a.png\) and in sub-folders "
                                            r"\(1, e.g. cls/c.png\)"):
        load_dataset("folder", data_dir=root)
    assert not pixel_files(cache_dir)


def test_a_class_folder_without_images_is_named(tmp_path, cache_dir):
    root = tmp_path / "classes"
    make_folder(root, ["cat/a.png", "cat/b.png", "dog/c.png"])
    (root / "empty").mkdir()
    (root / "zebra").mkdir()
    (root / "zebra" / "readme.txt").write_text("no images here")
    with pytest.raises(GenbenchError, match=r"class folder .*classes/empty holds no .png/.jpg/.jpeg images "
                                            r"\(nor do 1 other class folders\)"):
        load_dataset("folder", data_dir=root)


def test_an_empty_folder_is_named(tmp_path, cache_dir):
    (tmp_path / "nothing" / ".git").mkdir(parents=True)
    random_png(tmp_path / "nothing" / ".git" / "hidden.png")
    with pytest.raises(GenbenchError, match="no .png/.jpg/.jpeg images found under .*nothing"):
        load_dataset("folder", data_dir=tmp_path / "nothing")


# ---------------------------------------------------------------------------------------------
# bad images


def test_unreadable_and_truncated_images_are_named_with_the_count_of_good_ones(tmp_path, cache_dir):
    root = tmp_path / "damaged"
    paths = make_folder(root, [f"{i}.png" for i in range(6)], size=(64, 64))
    paths[4].write_bytes(paths[4].read_bytes()[:200])  # the header reads, the pixel data is cut off
    (root / "9.png").write_bytes(b"not a PNG at all" * 8)  # not even a header
    with pytest.raises(GenbenchError, match=r"damaged/4.png: cannot decode image: .*; 5 of the 7 images under "
                                            r".*damaged decode, 2 do not: fix or remove them"):
        load_dataset("folder", data_dir=root, image_size=8)
    assert not pixel_files(cache_dir) and not list(cache_dir.rglob("*.tmp*"))  # nothing half-written is left
    paths[4].unlink()
    with pytest.raises(GenbenchError, match=r"damaged/9.png: cannot decode image: cannot identify image file .*; "
                                            r"5 of the 6 images .* decode, 1 does not: fix or remove it"):
        load_dataset("folder", data_dir=root, image_size=8)


def test_mixed_sizes_are_cropped_and_resized_as_before(tmp_path, cache_dir):
    root = tmp_path / "sizes"
    sizes = [(40, 30), (17, 50), (64, 64), (9, 9), (100, 7)]
    paths = [random_png(root / f"{i}.png", s, seed=i) for i, s in enumerate(sizes)]
    ds = load_dataset("folder", data_dir=root, image_size=8)
    expected = torch.stack([old_float_pixels(p, 8) for p in paths])
    assert torch.equal(ds.test, expected[:1]) and torch.equal(ds.train, expected[1:])


# ---------------------------------------------------------------------------------------------
# storage: uint8 in memory, the floats of before for every consumer


def test_pixels_are_uint8_and_convert_to_exactly_the_floats_of_before(tmp_path, cache_dir):
    root = tmp_path / "exact"
    paths = make_folder(root, [f"{i:02d}.png" for i in range(21)], size=(20, 16))
    ds = load_dataset("folder", data_dir=root, image_size=8)
    assert ds.train_pixels.dtype == torch.uint8 and ds.test_pixels.dtype == torch.uint8
    assert ds.train_pixels.nbytes == 18 * 3 * 8 * 8  # 1 byte a pixel (float32 took 4)
    expected = torch.stack([old_float_pixels(p, 8) for p in paths])
    is_test = torch.arange(21) % 10 == 0
    assert torch.equal(ds.train, expected[~is_test]) and torch.equal(ds.test, expected[is_test])
    # a batch, as the trainer draws it
    idx = torch.tensor([5, 0, 17, 3])
    assert torch.equal(ds.float_images("train", idx), expected[~is_test][idx])
    assert torch.equal(unit_float(ds.train_pixels.index_select(0, idx)), expected[~is_test][idx])


def test_a_16bit_greyscale_folder_stays_float32(tmp_path, cache_dir):
    for i, v in enumerate((65535, 32768)):
        Image.fromarray(np.full((12, 12), v, np.uint16)).save(tmp_path / f"{i}.png")
    ds = load_dataset("folder", data_dir=tmp_path, image_size=4)
    assert ds.train_pixels.dtype == torch.float32  # 32768/65535 is no multiple of 1/255
    torch.testing.assert_close(ds.train, torch.full((1, 1, 4, 4), 32768 / 65535))


def test_each_process_holds_only_its_shard(tmp_path, cache_dir):
    root = tmp_path / "shards"
    make_folder(root, [f"c{i % 2}/{i:02d}.png" for i in range(23)])
    full = load_dataset("folder", data_dir=root, image_size=8)
    parts = [load_dataset("folder", data_dir=root, image_size=8, shard=(r, 3)) for r in range(3)]
    assert [len(p.train_pixels) for p in parts] == [6, 7, 7]  # 20 train images in 3 contiguous blocks
    assert all(p.num_train == 20 and p.train_total == 20 for p in parts) and full.num_train == 20
    assert torch.equal(torch.cat([p.train_pixels for p in parts]), full.train_pixels)
    assert torch.equal(torch.cat([p.train_labels for p in parts]), full.train_labels)
    assert all(torch.equal(p.test_pixels, full.test_pixels) for p in parts)  # the test split stays whole


# ---------------------------------------------------------------------------------------------
# the decode cache


def test_a_second_load_reads_the_cache_without_decoding(tmp_path, cache_dir, monkeypatch):
    root = tmp_path / "twice"
    make_folder(root, [f"{i}.png" for i in range(12)])
    first = load_dataset("folder", data_dir=root, image_size=8)
    (entry,) = pixel_files(cache_dir)
    np.load(entry, allow_pickle=False)  # a plain .npy

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(folder, "_square_pixels", no_decoding)
    monkeypatch.setattr(folder, "_image_mode", no_decoding)
    again = load_dataset("folder", data_dir=root, image_size=8)
    assert torch.equal(again.train_pixels, first.train_pixels) and torch.equal(again.test_pixels, first.test_pixels)
    again.train_pixels.fill_(0)  # callers own their tensors: a copy-on-write mapping, not the file
    assert torch.equal(load_dataset("folder", data_dir=root, image_size=8).train_pixels, first.train_pixels)


@pytest.mark.parametrize("change", ["touch", "rewrite", "add", "remove", "image_size"])
def test_a_changed_folder_is_decoded_again(tmp_path, cache_dir, monkeypatch, change):
    root = tmp_path / "changing"
    paths = make_folder(root, [f"{i}.png" for i in range(12)])
    size = 8
    load_dataset("folder", data_dir=root, image_size=size)
    if change == "touch":  # same bytes, new mtime
        st = paths[3].stat()
        os.utime(paths[3], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    elif change == "rewrite":  # new pixels, the same file size (incompressible noise)
        before = paths[3].stat()
        random_png(paths[3], seed=99)
        os.utime(paths[3], ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))  # past the clock's granularity
        assert paths[3].stat().st_size == before.st_size
    elif change == "add":
        random_png(root / "99.png", seed=99)
    elif change == "remove":
        paths[3].unlink()
    else:
        size = 4
    decoded = []
    original = folder._square_pixels
    monkeypatch.setattr(folder, "_square_pixels", lambda p, *a: decoded.append(p) or original(p, *a))
    ds = load_dataset("folder", data_dir=root, image_size=size)
    assert decoded, "a stale cache entry was read"
    expected = torch.stack([old_float_pixels(p, size) for p in sorted(root.glob("*.png"))])
    is_test = torch.arange(len(expected)) % 10 == 0
    assert torch.equal(ds.train, expected[~is_test]) and torch.equal(ds.test, expected[is_test])
    if change != "image_size":  # the folder's earlier decoding is removed, not kept beside the new one
        assert len(pixel_files(cache_dir)) == 1


@pytest.mark.parametrize("damage", ["truncate", "replaced", "garbage_index", "no_index"])
def test_a_damaged_cache_entry_is_decoded_again(tmp_path, cache_dir, damage):
    root = tmp_path / "damage"
    make_folder(root, [f"{i}.png" for i in range(12)])
    # a copy: `first` maps the file, and the damage below is done in place (genbench only ever renames)
    first = load_dataset("folder", data_dir=root, image_size=8).train_pixels.clone()
    (npy,) = pixel_files(cache_dir)
    index = npy.parent / cache.INDEX_FILE
    if damage == "truncate":
        npy.write_bytes(npy.read_bytes()[:-100])
    elif damage == "replaced":  # a valid .npy, but not the one the index describes
        np.save(npy, np.zeros((3, 3, 8, 8), np.uint8), allow_pickle=False)
    elif damage == "garbage_index":
        index.write_text("{not json")
    else:
        index.unlink()
    assert torch.equal(load_dataset("folder", data_dir=root, image_size=8).train_pixels, first)
    assert json.loads(index.read_text())["shape"] == [12, 3, 8, 8]


# ---------------------------------------------------------------------------------------------
# end to end


@pytest.mark.parametrize("labelled", [True, False])
def test_genbench_train_on_a_folder(tmp_path, cache_dir, labelled):
    root = tmp_path / "images"
    names = [f"{'red' if i % 2 else 'blue'}/{i:02d}.png" if labelled else f"{i:02d}.png" for i in range(40)]
    make_folder(root, names, size=(16, 12))
    out = tmp_path / "run"
    assert main(["train", "ae", "--dataset", "folder", "--data-dir", str(root), "--out", str(out), *AE]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "complete" and info["dataset"]["name"] == "folder"
    assert info.get("classes") == (["blue", "red"] if labelled else None)
    assert (out / "samples.png").is_file() and (out / "reconstructions.png").is_file()
    assert len(pixel_files(cache_dir)) == 1  # decoded once: the reconstructions read the cache


@pytest.mark.parametrize("layout, match", [
    (["a.png", "b.png", "c/d.png"], "holds images both directly"),
    (["a.png", "b.png", "broken.png"], "broken.png: cannot decode image"),
])
def test_bad_folders_are_one_line_from_the_command_line(tmp_path, cache_dir, capsys, layout, match):
    root = tmp_path / "bad"
    make_folder(root, layout)
    if "broken.png" in layout:
        (root / "broken.png").write_bytes(b"\x89PNG junk")
    assert main(["train", "ae", "--dataset", "folder", "--data-dir", str(root), "--out", str(tmp_path / "o"), *AE]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("genbench: error:") and len(err.splitlines()) == 1 and match in err, err
    assert not (tmp_path / "o").exists()
