"""The run folder: one owner of its format. Everything that reads or writes a run asks `RunFolder`.

    <run>/run.json        the request and its outcome: model name, dataset spec, preset, --set items,
                          resolved model and train configs, status ("running" | "complete"),
                          versions, and once complete the training summary (wall time, images/s
                          per stage, peak memory, device, parameters)
    <run>/log.jsonl       one JSON record per logged step: stage, step, global_step, lr,
                          images_per_s and the model's loss scalars
    <run>/checkpoints/    training checkpoints (format: genbench.training.checkpoint)
    <run>/model/          the exported model (format: genbench.models.base, save_pretrained)
    <run>/train.log       stdout/stderr of a training process started by `genbench compare`
    <run>/samples.png, reconstructions.png   pictures written after training (genbench.evaluation)

    <run>/.lock           who trains in the folder now: one process at a time (see `lock_folder`)

Only rank 0 of a distributed run touches the folder (genbench.training.distributed.on_main), and
only while it holds the folder's lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import IO

from genbench.errors import GenbenchError
from genbench.files import atomic_write_bytes, ensure_writable_folder, read_json, remove_stale_temporaries, require_fields, write_json
from genbench.models.base import EXPORT_SUBDIR

LOCK_FILE = ".lock"


class FolderLock:
    """An exclusive advisory lock (flock) on `<folder>/.lock`, which records its owner's pid and host.

    The kernel drops the lock when its process ends, however it ends, so a crash leaves no stale
    lock behind: the file may stay, unlocked, and the next process takes it over. `release()`
    removes the file. A lock is taken only on the file the path names at that moment (a holder that
    released and removed it in between makes the taker retry on the new file)."""

    def __init__(self, folder: Path, what: str):
        ensure_writable_folder(folder, what)
        self.path = folder / LOCK_FILE
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise GenbenchError(f"{what} {folder} is in use by {_owner(self.path)}; wait for it to finish, or "
                                    "stop that process (a killed process releases the folder)") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the file was removed (released) while we waited for it: lock the new one
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(record) + "\n").encode())
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked: nobody holds the file we remove
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _owner(lock_path: Path) -> str:
    try:
        record = json.loads(lock_path.read_text())
        return f"pid {record['pid']} on {record['host']} (since {record['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def lock_folder(folder: str | os.PathLike, what: str = "run folder") -> FolderLock:
    return FolderLock(Path(folder), what)

STATUSES = ("running", "complete")


class RunFolder:
    """Paths and records of one run folder."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.run_json = self.path / "run.json"
        self.log_path = self.path / "log.jsonl"
        self.checkpoints = self.path / "checkpoints"
        self.model_dir = self.path / EXPORT_SUBDIR
        self.train_log = self.path / "train.log"
        self.samples_png = self.path / "samples.png"
        self.reconstructions_png = self.path / "reconstructions.png"

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # ---------------------------------------------------------------- run.json

    def exists(self) -> bool:
        return self.run_json.exists()

    def read_info(self) -> dict:
        """run.json, checked field by field (its configs are checked by from_dict where they are used)."""
        info = require_fields(read_json(self.run_json), self.run_json, model=str, status=str, model_config=dict,
                              train_config=dict)
        if info["status"] not in STATUSES:
            raise GenbenchError(f"{self.run_json}: status must be 'running' or 'complete', got {info['status']!r}")
        return info

    def write_info(self, info: dict) -> None:
        try:
            write_json(self.run_json, info)
        except OSError as e:
            raise GenbenchError(f"{self.run_json}: cannot write ({e.strerror or e})") from None

    def is_complete(self) -> bool:
        """True when run.json reads and says complete; False for a missing, unfinished or unreadable run."""
        try:
            return self.read_info()["status"] == "complete"
        except GenbenchError:
            return False

    def require_complete(self) -> dict:
        """run.json of a finished run whose exported model is there, else a clear error."""
        if not self.path.is_dir():
            raise GenbenchError(f"{self.path}: run folder not found")
        info = self.read_info()
        if info["status"] != "complete" or not (self.model_dir / "config.json").exists():
            raise GenbenchError(f"{self.path}: training has not finished; continue it with `genbench train ... --resume`")
        return info

    def lock(self) -> FolderLock:
        """Own the folder (created if needed) for training; a second trainer gets a clear error."""
        return lock_folder(self.path, "run folder")

    def clean_interrupted_writes(self) -> list[Path]:
        """Remove what writers killed mid-write left behind (temporary files, partial checkpoint
        folders); call it only while holding the lock."""
        removed = []
        for folder in (self.path, self.checkpoints, self.model_dir):
            if folder.is_dir():
                removed += remove_stale_temporaries(folder)
        if self.checkpoints.is_dir():
            for partial in self.checkpoints.glob(".*.partial"):
                shutil.rmtree(partial, ignore_errors=True)
                removed.append(partial)
        return removed

    def move_aside(self) -> Path:
        """Rename the folder to the first free `<name>.replaced-<k>` (nothing is deleted); returns it."""
        k = 1
        while (aside := self.path.with_name(f"{self.path.name}.replaced-{k}")).exists():
            k += 1
        try:
            self.path.rename(aside)
        except OSError as e:
            raise GenbenchError(f"{self.path}: cannot move the run aside to {aside} ({e.strerror or e})") from None
        return aside

    # ---------------------------------------------------------------- log.jsonl

    def read_log(self) -> list[dict]:
        """The logged records (lines that are not JSON objects, e.g. torn by a kill, are skipped)."""
        return [record for _, record in self._log_lines()]

    def _log_lines(self) -> list[tuple[str, dict]]:
        if not self.log_path.exists():
            return []
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as e:
            raise GenbenchError(f"{self.log_path}: cannot read the training log ({e.strerror or e})") from None
        out = []
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if isinstance(record, dict):
                out.append((line, record))
        return out

    def curves(self) -> dict[str, dict[str, list]]:
        """Training loss per stage: {stage: {"step": [...], "loss": [...]}}."""
        curves: dict[str, dict[str, list]] = {}
        for rec in self.read_log():
            if isinstance(rec.get("step"), int) and isinstance(rec.get("loss"), (int, float)):
                c = curves.setdefault(rec.get("stage", "main"), {"step": [], "loss": []})
                c["step"].append(rec["step"])
                c["loss"].append(rec["loss"])
        return curves

    def quality_curve(self) -> dict[str, list]:
        """The quality probes' records (genbench.training.loop, train.fd_every): {"global_step",
        "train_flops", "train_s", "train_cpu_s", "fd": [...]}, in training order; empty lists when
        the run was trained without probes."""
        keys = ("global_step", "train_flops", "train_s", "train_cpu_s", "fd")
        curve: dict[str, list] = {k: [] for k in keys}
        for rec in self.read_log():
            if isinstance(rec.get("fd"), (int, float)) and all(isinstance(rec.get(k), (int, float)) for k in keys):
                for k in keys:
                    curve[k].append(rec[k])
        return curve

    def last_global_step(self) -> int:
        """The latest `global_step` logged (0 before the first record); reads only the log's tail,
        so a progress bar can poll it cheaply."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, 2) - 4096))
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return 0
        for line in reversed(lines):
            try:
                step = json.loads(line).get("global_step")
            except (ValueError, AttributeError):
                continue
            if isinstance(step, int):
                return step
        return 0

    def open_log(self, resume_from_global_step: int) -> TrainingLog:
        """The log, opened for appending after the records up to the step being resumed from: steps a
        killed run logged after its last checkpoint are trained again, and a line torn by the kill is
        dropped."""
        keep = [line + "\n" for line, r in self._log_lines()
                if isinstance(r.get("global_step"), int) and r["global_step"] <= resume_from_global_step]
        try:
            if self.log_path.exists():
                atomic_write_bytes(self.log_path, "".join(keep).encode())
            return TrainingLog(open(self.log_path, "a"))
        except OSError as e:
            raise GenbenchError(f"{self.log_path}: cannot write the training log ({e.strerror or e})") from None


class TrainingLog:
    """log.jsonl opened for appending: one flushed JSON line per record."""

    def __init__(self, file: IO[str]):
        self.file = file

    def append(self, record: dict) -> None:
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as e:
            raise GenbenchError(f"{self.file.name}: cannot write the training log ({e.strerror or e})") from None

    def close(self) -> None:
        self.file.close()
