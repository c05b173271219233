"""Sizes from hostile files and numbers: refused before anything large is allocated.

Each case runs the real command line in a child process whose address space is capped
(`prlimit --as`, or setrlimit where prlimit is missing) well below what the request would need, with
genbench's memory limit (GENBENCH_MEMORY_LIMIT) set a little under the cap: the child must stop
with one `genbench: error:` line and exit 2, never a MemoryError traceback or an allocator abort."""

import gzip
import json
import os
import resource
import struct
import subprocess
import sys
from pathlib import Path

import pytest

CAP = 3 * 2**30  # address space of the child: torch alone maps ~0.7 GiB
LIMIT = "1G"  # genbench's own memory limit in the child
TINY = ["--set", "arch=mlp", "--set", "latent_dim=4", "--set", "width=16", "--set", "train.steps=5",
        "--set", "train.batch_size=32", "--limit", "64", "--no-progress"]


def genbench(*argv, env=None, timeout=120) -> subprocess.CompletedProcess:
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (CAP, CAP))

    return subprocess.run([sys.executable, "-m", "genbench", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=cap,
                          env={**os.environ, "GENBENCH_MEMORY_LIMIT": LIMIT, **(env or {})})


def assert_one_line_refusal(proc, *needles):
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, err[-2000:])
    assert err.startswith("genbench: error:") and len(err.splitlines()) == 1, err[-2000:]
    for needle in needles:
        assert needle in err, err


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sizes") / "vae"
    proc = genbench("train", "vae", "--dataset", "digits", "--out", out, "--no-images", *TINY)
    assert proc.returncode == 0, proc.stderr
    return out


def _copy_run(run: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, tmp_path / "run"))


def _edit(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("width", [20_000, 30_000, 10**9])
def test_a_huge_width_in_the_exported_config_is_refused_before_the_model_is_built(vae_run, tmp_path, width):
    run = _copy_run(vae_run, tmp_path)
    _edit(run / "model" / "config.json", lambda m: m["config"].update(width=width))
    assert_one_line_refusal(genbench("sample", run, "-n", "4", "--out", tmp_path / "x.png"), "memory limit")
    assert not (tmp_path / "x.png").exists()


def test_exported_config_and_weights_disagree_before_the_model_is_built(vae_run, tmp_path):
    run = _copy_run(vae_run, tmp_path)
    _edit(run / "model" / "config.json", lambda m: m["config"].update(width=24))
    assert_one_line_refusal(genbench("sample", run, "-n", "4", "--out", tmp_path / "x.png"),
                            "model.safetensors", "the model's config implies")


@pytest.mark.parametrize("item", ["width=30000", "width=1000000000", "latent_dim=1000000000"])
def test_huge_sizes_in_set_items_are_refused_before_training(tmp_path, item):
    proc = genbench("train", "vae", "--dataset", "digits", "--out", tmp_path / "r", *TINY, "--set", item)
    assert_one_line_refusal(proc, "vae config")
    assert not (tmp_path / "r").exists()


def test_a_huge_width_in_run_json_is_refused_on_resume(tmp_path):
    out = tmp_path / "cut"
    proc = genbench("train", "vae", "--dataset", "digits", "--out", out, *TINY[:-3], "--set", "train.ckpt_every=1",
                    "--set", "train.steps=50", "--limit", "64", "--no-progress")
    assert proc.returncode == 0
    _edit(out / "run.json", lambda info: (info.update(status="running"), info["model_config"].update(width=30000)))
    assert_one_line_refusal(genbench("train", "vae", "--dataset", "digits", "--limit", "64", "--out", out, "--resume",
                                     "--no-progress"), "run.json: model_config", "memory limit")


def test_a_billion_samples_are_refused_with_the_memory_they_need(vae_run, tmp_path):
    proc = genbench("sample", vae_run, "-n", "1000000000", "--out", tmp_path / "big.npz", timeout=60)
    assert_one_line_refusal(proc, "1000000000 samples", "memory limit")
    assert not (tmp_path / "big.npz").exists()


def _idx_header(type_code: int, dims) -> bytes:
    return struct.pack(">HBB", 0, type_code, len(dims)) + struct.pack(f">{len(dims)}I", *dims)


def _fake_fashion(folder: Path, train_images: bytes) -> Path:
    """The four idx files, the train images replaced by `train_images`."""
    folder.mkdir(parents=True, exist_ok=True)
    small = _idx_header(0x08, (4, 28, 28)) + bytes(4 * 28 * 28)
    labels = _idx_header(0x08, (4,)) + bytes(4)
    for name, data in (("train-images-idx3-ubyte.gz", train_images), ("t10k-images-idx3-ubyte.gz", gzip.compress(small)),
                       ("train-labels-idx1-ubyte.gz", gzip.compress(labels)),
                       ("t10k-labels-idx1-ubyte.gz", gzip.compress(labels))):
        (folder / name).write_bytes(data)
    return folder


def test_an_idx_header_declaring_gigabytes_is_refused_before_inflating(tmp_path):
    # 60000 x 28 x 28 doubles declared: 376 MB; 60000 x 280 x 280 doubles: 37.6 GB, with a small payload
    bomb = gzip.compress(_idx_header(0x0E, (60000, 280, 280)) + bytes(10_000_000))
    data = _fake_fashion(tmp_path / "fm", bomb)
    proc = genbench("train", "ae", "--dataset", "fashion-mnist", "--data-dir", data, "--out", tmp_path / "r")
    assert_one_line_refusal(proc, "train-images-idx3-ubyte.gz", "IDX header", "memory limit")


def test_a_gzip_stream_inflating_past_its_header_is_cut_short(tmp_path):
    # the header declares 4 x 28 x 28 bytes; the stream inflates to 200 MB more: only one byte past is read
    bomb = gzip.compress(_idx_header(0x08, (4, 28, 28)) + bytes(4 * 28 * 28 + 200_000_000))
    data = _fake_fashion(tmp_path / "fm", bomb)
    proc = genbench("train", "ae", "--dataset", "fashion-mnist", "--data-dir", data, "--out", tmp_path / "r",
                    env={"GENBENCH_MEMORY_LIMIT": "64M"})
    assert_one_line_refusal(proc, "trailing bytes after payload")


def test_a_huge_image_size_is_refused_before_resizing(tmp_path):
    proc = genbench("train", "ae", "--dataset", "digits", "--image-size", "20000", "--out", tmp_path / "r")
    assert_one_line_refusal(proc, "image_size 20000", "memory limit")


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_sparse_gigabyte_files_are_refused_without_reading_them(vae_run, tmp_path, name):
    run = _copy_run(vae_run, tmp_path)
    with open(run / "model" / name, "r+b") as f:
        f.truncate(8 * 2**30)  # sparse: 8 GiB of zeros that take no disk
    proc = genbench("sample", run, "-n", "4", "--out", tmp_path / "x.png", timeout=60)
    assert_one_line_refusal(proc, name)
