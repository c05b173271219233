"""Faults survived, nothing lost: SIGKILL at random moments, full disks, corrupted checkpoints.

The promise under test: at any moment the run folder holds a complete, hash-verified checkpoint
(or none yet); `--resume` continues from it and ends with exactly the weights and the log of an
uninterrupted run; a failed write (full disk) or a damaged file stops with one clear GenbenchError
and never deletes the previous checkpoint.
"""

import errno
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import genbench.files as checkpoint_mod
from genbench.files import read_tensors
from genbench.training.checkpoint import load_checkpoint
from genbench.errors import GenbenchError
from genbench.training.loop import Interrupted
from genbench.training.run import train_run

TINY = ["latent_dim=4", "width=32", "arch=mlp", "train.steps=24", "train.batch_size=32",
        "train.ckpt_every=6", "train.log_every=4", "train.lr=1e-3"]


def _weights(run_dir):
    return read_tensors(Path(run_dir) / "model" / "model.safetensors")


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _log(run_dir):
    return [(r["global_step"], r["loss"]) for r in map(json.loads, (Path(run_dir) / "log.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_digits):
    return train_run("ae", tiny_digits, tmp_path_factory.mktemp("faults") / "full", sets=TINY, progress=False)


@pytest.fixture(scope="module")
def cut_template(tmp_path_factory, tiny_digits):
    """A run interrupted right after its step-12 checkpoint (latest = main-00000012)."""
    run = tmp_path_factory.mktemp("faults") / "cut"
    with pytest.raises(Interrupted):
        train_run("ae", tiny_digits, run, sets=TINY, progress=False, interrupt_at=12)
    return run


@pytest.fixture
def cut(cut_template, tmp_path):
    run = tmp_path / "cut"
    shutil.copytree(cut_template, run)
    return run


# ---------------------------------------------------------------- SIGKILL


KILL_SETS = ["arch=mlp", "latent_dim=4", "width=32", "train.steps=60", "train.batch_size=32",
             "train.log_every=5", "train.lr=1e-3"]


def _latest_step(root: Path) -> int | None:
    try:
        text = (root / "latest.json").read_text()
    except FileNotFoundError:
        return None
    # never a torn file: json.loads must succeed whenever latest.json exists
    return int(json.loads(text)["checkpoint"].rsplit("-", 1)[1])


def _image_folder(folder: Path, images: torch.Tensor) -> Path:
    """The images as 8x8 PNGs: a `folder` dataset loads without scikit-learn/scipy, whose imports
    cost each launched process ~2.5 s of CPU."""
    from PIL import Image

    folder.mkdir()
    for i, x in enumerate(images):
        Image.fromarray((x[0] * 255).round().to(torch.uint8).numpy(), mode="L").save(folder / f"{i:03d}.png")
    return folder


# Runs genbench's CLI in a process whose os.fsync, on the first file of the checkpoint folder of a
# step >= target being written (`.main-<step>.partial/`), writes the file's path into `marker` and
# blocks: the parent's SIGKILL then lands, deterministically, in the middle of that checkpoint's write
# (the file's bytes written but neither synced nor renamed, state.json not written yet).
HOLD_MID_WRITE = r"""
import os, re, sys, time
marker, target = sys.argv.pop(1), int(sys.argv.pop(1))
real_fsync = os.fsync

def fsync(fd):
    path = os.readlink(f"/proc/self/fd/{fd}")
    m = re.fullmatch(r"\.main-(\d{8})\.partial", os.path.basename(os.path.dirname(path)))
    if m and int(m.group(1)) >= target:
        with open(marker + ".tmp", "w") as f:
            f.write(path)
        os.replace(marker + ".tmp", marker)
        time.sleep(600)
    return real_fsync(fd)

os.fsync = fsync
from genbench.cli import main
sys.exit(main())
"""


def _launch(run: Path, data: Path, resume: bool, hold: tuple[Path, int] | None = None) -> subprocess.Popen:
    """`genbench train` on the image folder; with `hold` = (marker, step), under HOLD_MID_WRITE."""
    prefix = ["-c", HOLD_MID_WRITE, str(hold[0]), str(hold[1])] if hold else ["-m", "genbench"]
    cmd = [sys.executable, *prefix, "train", "vae", "--dataset", "folder", "--data-dir", str(data),
           "--image-size", "8", "--no-progress", "--out", str(run)]
    cmd += ["--resume"] if resume else [a for s in KILL_SETS + ["train.ckpt_every=2"] for a in ("--set", s)]
    return subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 300
    while not condition():
        assert proc.poll() is None, f"training ended before {what}: {proc.stderr.read()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    proc.stderr.close()


def test_sigkill_at_random_moments_then_resume_is_exact(tmp_path, tiny_digits):
    """The VAE draws noise in every step, so exactness also covers the RNG stream across restarts."""
    from genbench.data import load_dataset

    data = _image_folder(tmp_path / "images", tiny_digits.train[:72])  # 64 train + 8 test images
    rng = random.Random(20240601)
    run, root = tmp_path / "killed", tmp_path / "killed" / "checkpoints"
    marker = tmp_path / "held"
    # kill once the checkpoint of a random step is on disk (+ a random delay, most of a step's time is
    # spent writing the next checkpoint), or, deterministically, while the first checkpoint of a step
    # >= target is being written (HOLD_MID_WRITE)
    plan = [("random", rng.randint(4, 14)), ("mid-write", rng.randint(20, 30)), ("random", rng.randint(36, 46))]
    proc = _launch(run, data, resume=False)
    try:
        for i, (mode, target) in enumerate(plan):
            if mode == "random":
                _wait_for(lambda t=target: (_latest_step(root) or 0) >= t, proc, f"the checkpoint of step {target}")
                time.sleep(rng.uniform(0.0, 0.05))
            else:
                _wait_for(marker.exists, proc, f"the write of a checkpoint of step >= {target}")
            _stop(proc)
            # what is on disk is a complete checkpoint whose sizes and hashes verify
            tensors, meta = load_checkpoint(root)
            assert any(k.startswith("optim.") for k in tensors)
            latest = json.loads((root / "latest.json").read_text())["checkpoint"]
            assert sorted(p.name for p in (root / latest).iterdir()) == ["state.json", "state.safetensors"]
            if mode == "random":
                assert meta["step"] >= target
            else:  # the kill tore the write: its folder is half written, latest.json names the one before
                torn = Path(marker.read_text())
                held = int(torn.parent.name[len(".main-"):-len(".partial")])
                assert held >= target and held % 2 == 0 and meta["step"] == held - 2
                assert torn.parent.parent == root and torn.name.startswith(".state.safetensors.tmp")
                assert sorted(p.name for p in torn.parent.iterdir()) == [torn.name]
            nxt = plan[i + 1] if i + 1 < len(plan) else None
            hold = (marker, nxt[1]) if nxt and nxt[0] == "mid-write" else None
            proc = _launch(run, data, resume=True, hold=hold)
        assert proc.wait(timeout=600) == 0, proc.stderr.read()
    finally:
        _stop(proc)
    # the next checkpoints removed the torn folder
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "main-00000060"]
    reference = train_run("vae", load_dataset("folder", data_dir=data, image_size=8), tmp_path / "reference",
                          sets=KILL_SETS + ["train.ckpt_every=1000"], progress=False)
    _assert_same_weights(reference, run)
    # the log too: steps logged after the last checkpoint were trimmed on resume, torn lines dropped
    assert _log(run) == _log(reference)
    assert json.loads((run / "run.json").read_text())["status"] == "complete"


# ---------------------------------------------------------------- full disk, unwritable folders


def _enospc_when(predicate):
    real = checkpoint_mod.atomic_write_bytes

    def write(path, data):
        if predicate(Path(path)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data)

    return write


@pytest.mark.parametrize("what", ["tensors", "pointer"])
def test_full_disk_at_save_keeps_previous_checkpoint(tmp_path, tiny_digits, full_run, monkeypatch, what):
    run = tmp_path / "r"
    if what == "tensors":  # the new checkpoint's state.safetensors cannot be written
        fails = _enospc_when(lambda p: "main-00000012" in str(p))
    else:  # the new checkpoint is complete, but latest.json cannot be replaced to point at it
        fails = _enospc_when(lambda p: p.name == "latest.json" and (run / "checkpoints" / "main-00000012").exists())
    monkeypatch.setattr(checkpoint_mod, "atomic_write_bytes", fails)
    with pytest.raises(GenbenchError, match=r"could not write checkpoint main-00000012 \(No space left on device\); "
                                            r"the previous one is kept"):
        train_run("ae", tiny_digits, run, sets=TINY, progress=False)
    _, meta = load_checkpoint(run / "checkpoints")
    assert meta["step"] == 6
    assert not any(p.name.endswith(".partial") for p in (run / "checkpoints").iterdir())
    monkeypatch.undo()  # space freed: resume and end where an uninterrupted run ends
    train_run("ae", tiny_digits, run, resume=True, progress=False)
    _assert_same_weights(full_run, run)
    assert _log(run) == _log(full_run)


def test_full_disk_detected_before_training(tmp_path, tiny_digits, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=50_000))
    with pytest.raises(GenbenchError, match=r"only 0\.0 MiB free on its disk, training needs about .* MiB"):
        train_run("ae", tiny_digits, tmp_path / "r", sets=TINY, progress=False)
    assert not (tmp_path / "r" / "checkpoints").exists()
    assert not (tmp_path / "r" / "log.jsonl").exists()


def test_full_disk_at_export_then_resume(tmp_path, tiny_digits, full_run, monkeypatch):
    run = tmp_path / "r"
    monkeypatch.setattr(checkpoint_mod, "atomic_write_bytes", _enospc_when(lambda p: p.name == "model.safetensors"))
    with pytest.raises(GenbenchError, match=r"cannot write the exported model \(No space left on device\).*--resume"):
        train_run("ae", tiny_digits, run, sets=TINY, progress=False)
    assert json.loads((run / "run.json").read_text())["status"] == "running"
    assert load_checkpoint(run / "checkpoints")[1]["step"] == 24
    monkeypatch.undo()
    train_run("ae", tiny_digits, run, resume=True, progress=False)
    _assert_same_weights(full_run, run)


def test_unwritable_run_folder_fails_before_training(tmp_path, tiny_digits):
    (tmp_path / "file").write_text("x")  # a path under a regular file: fails for root too
    with pytest.raises(GenbenchError, match="cannot create run folder"):
        train_run("ae", tiny_digits, tmp_path / "file" / "run", sets=TINY, progress=False)


def test_torn_log_is_repaired_on_resume(cut, tiny_digits, full_run):
    # a killed run may leave records of steps after its last checkpoint, and a half-written line
    with open(cut / "log.jsonl", "a") as f:
        f.write(json.dumps({"stage": "main", "step": 16, "global_step": 16, "loss": 1.0}) + "\n")
        f.write('{"stage": "main", "step": 20, "glo')
    train_run("ae", tiny_digits, cut, resume=True, progress=False)
    assert _log(cut) == _log(full_run)


# ---------------------------------------------------------------- damaged files refused on --resume


def _edit_json(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


CK = "checkpoints/main-00000012"


@pytest.mark.parametrize("damage, match", [
    (lambda r: (r / CK / "state.safetensors").write_bytes((r / CK / "state.safetensors").read_bytes()[:-64]),
     "truncated or replaced file"),
    (lambda r: (r / CK / "state.safetensors").write_bytes(
        (lambda b: b[:-9] + bytes([b[-9] ^ 0x10]) + b[-8:])((r / CK / "state.safetensors").read_bytes())),
     "sha256 does not match .* \\(corrupted file\\)"),
    (lambda r: (r / CK / "state.safetensors").unlink(), "state.safetensors: file not found"),
    (lambda r: (r / CK / "state.json").write_bytes((r / CK / "state.json").read_bytes()[:100]), "not valid JSON"),
    (lambda r: (r / CK / "state.json").write_bytes(b"\xff\xfe\x00garbage"), "not valid JSON"),
    (lambda r: (r / "checkpoints" / "latest.json").write_text('{"checkpoint": "main-000'), "not valid JSON"),
    (lambda r: (r / "checkpoints" / "latest.json").write_text('{"checkpoint": "main-00000018"}'), "file not found"),
    (lambda r: shutil.rmtree(r / CK), "state.json: file not found"),
    (lambda r: (r / "run.json").write_text((r / "run.json").read_text()[:50]), "run.json: not valid JSON"),
])
def test_damaged_checkpoint_or_config_is_refused(cut, tiny_digits, damage, match):
    damage(cut)
    with pytest.raises(GenbenchError, match=match):
        train_run("ae", tiny_digits, cut, resume=True, progress=False)


def test_damaged_run_is_refused_by_the_cli(cut, capsys):
    from genbench.cli import main

    data = bytearray((cut / CK / "state.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (cut / CK / "state.safetensors").write_bytes(bytes(data))
    argv = ["train", "ae", "--dataset", "digits", "--limit", "256", "--out", str(cut), "--resume", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("genbench: error:") and len(err.splitlines()) == 1 and "corrupted file" in err
