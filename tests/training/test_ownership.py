"""One owner per run folder: a second trainer (or comparison) is turned away having touched nothing;
a crashed owner leaves no stale lock; what killed writers left behind is cleaned on resume;
`genbench compare` never lets its training processes join a process group."""

import json
import os
import subprocess
import sys

import pytest

from genbench.cli import main
from genbench.data import DatasetSpec
from genbench.training.loop import Interrupted
from genbench.training.run import train_run
from genbench.training.run_folder import LOCK_FILE, RunFolder, lock_folder

SETS = ["arch=mlp", "latent_dim=4", "width=16", "train.steps=12", "train.ckpt_every=4", "train.batch_size=32"]
CLI = ["--dataset", "digits", "--limit", "256", "--no-progress", "--no-images"]


@pytest.fixture
def cut(tmp_path, tiny_digits):
    run = tmp_path / "cut"
    with pytest.raises(Interrupted):
        train_run("ae", tiny_digits, run, sets=SETS, progress=False, interrupt_at=4,
                  dataset_spec=DatasetSpec("digits", limit=256))
    return run


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_trainer_is_turned_away_having_touched_nothing(cut, capsys):
    before = _snapshot(cut)
    with lock_folder(cut):  # this process trains in it now
        assert main(["train", "ae", *CLI, "--out", str(cut), "--resume"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("genbench: error:") and len(err.splitlines()) == 1
        assert f"run folder {cut} is in use by pid {os.getpid()}" in err
        assert {k: v for k, v in _snapshot(cut).items() if k.name != LOCK_FILE} == before
    assert not (cut / LOCK_FILE).exists()  # released and removed
    assert main(["train", "ae", *CLI, "--out", str(cut), "--resume"]) == 0  # free again
    assert RunFolder(cut).is_complete()


def test_another_process_holding_the_folder_is_named(cut):
    """The lock is the kernel's (flock): another process's hold is seen, with its pid."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from genbench.training.run_folder import lock_folder; "
        f"lock = lock_folder({str(cut)!r}); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = subprocess.run([sys.executable, "-m", "genbench", "train", "ae", *CLI, "--out", str(cut), "--resume"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and f"is in use by pid {holder.pid}" in proc.stderr
    finally:
        holder.kill()
        holder.wait()
    # killed with the lock held: no stale lock, the next trainer takes the folder
    assert (cut / LOCK_FILE).exists()
    proc = subprocess.run([sys.executable, "-m", "genbench", "train", "ae", *CLI, "--out", str(cut), "--resume"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert RunFolder(cut).is_complete() and not (cut / LOCK_FILE).exists()


def test_a_comparison_folder_has_one_owner(tmp_path, capsys):
    out = tmp_path / "cmp"
    with lock_folder(out, "comparison folder"):
        assert main(["compare", "--dataset", "digits", "--models", "ae", "--out", str(out), "--no-progress"]) == 2
    assert f"comparison folder {out} is in use by pid {os.getpid()}" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == []


def test_leftovers_of_killed_writers_are_removed_on_resume(cut, tiny_digits):
    run = RunFolder(cut)
    junk = [cut / ".run.json.tmp123", run.checkpoints / ".latest.json.tmp456", run.checkpoints / ".main-00000008.partial"]
    junk[0].write_text("{")
    junk[1].write_text("{")
    junk[2].mkdir()
    (junk[2] / ".state.safetensors.tmp789").write_bytes(b"\0" * 10)
    keep = cut / ".notes.tmp.txt"  # not a temporary of ours: left alone
    keep.write_text("mine")
    train_run("ae", tiny_digits, cut, resume=True, progress=False)
    assert not any(p.exists() for p in junk) and keep.exists()
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["latest.json", "main-00000012"]


def test_compare_refuses_to_run_under_torchrun(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["compare", "--dataset", "digits", "--models", "ae", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "run it without torchrun" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_compare_starts_its_training_processes_outside_any_process_group(tmp_path, monkeypatch, capsys):
    """Rendezvous variables in compare's environment never reach its `genbench train` children."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "MASTER_ADDR=[$MASTER_ADDR] MASTER_PORT=[$MASTER_PORT] RANK=[$RANK]"\nexit 3\n')
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.9")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert main(["compare", "--dataset", "digits", "--models", "ae,vae", "--jobs", "2", "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    assert "MASTER_ADDR=[] MASTER_PORT=[] RANK=[]" in capsys.readouterr().err


def test_the_lock_record_names_its_owner(tmp_path):
    with lock_folder(tmp_path / "r") as lock:
        record = json.loads(lock.path.read_text())
        assert record["pid"] == os.getpid() and record["host"] and record["since"]
