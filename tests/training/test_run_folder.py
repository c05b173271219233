"""The run folder's one owner: run.json validated, the log trimmed on resume, curves and progress read
back, completion checked before anything loads a model."""

import json

import pytest

from genbench.errors import GenbenchError
from genbench.training.run_folder import RunFolder

INFO = {"model": "ae", "status": "running", "model_config": {}, "train_config": {}}


def test_layout(tmp_path):
    run = RunFolder(tmp_path / "r")
    assert run.run_json == tmp_path / "r" / "run.json" and run.log_path.name == "log.jsonl"
    assert run.checkpoints.name == "checkpoints" and run.model_dir.name == "model"


def test_info_round_trip_and_completion(tmp_path):
    run = RunFolder(tmp_path)
    assert not run.exists() and not run.is_complete()
    run.write_info(INFO)
    assert run.read_info() == INFO and not run.is_complete()
    with pytest.raises(GenbenchError, match="training has not finished"):
        run.require_complete()
    run.write_info({**INFO, "status": "complete"})
    assert run.is_complete()
    with pytest.raises(GenbenchError, match="training has not finished"):  # complete, but no exported model
        run.require_complete()
    run.model_dir.mkdir()
    (run.model_dir / "config.json").write_text("{}")
    assert run.require_complete()["status"] == "complete"


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"),
    ("[]", "expected a JSON object"),
    (json.dumps({**INFO, "status": "done"}), "status must be 'running' or 'complete'"),
    (json.dumps({**INFO, "model": 3}), "field 'model' must be str"),
    (json.dumps({k: v for k, v in INFO.items() if k != "train_config"}), "field 'train_config' must be dict"),
])
def test_bad_run_json_is_refused_but_never_counts_as_complete(tmp_path, content, match):
    run = RunFolder(tmp_path)
    run.run_json.write_text(content)
    with pytest.raises(GenbenchError, match=match):
        run.read_info()
    assert not run.is_complete()


def test_missing_folder(tmp_path):
    with pytest.raises(GenbenchError, match="run folder not found"):
        RunFolder(tmp_path / "nope").require_complete()


def _records(stage, steps, offset=0):
    return [{"stage": stage, "step": s, "global_step": offset + s, "loss": 1.0 / s} for s in steps]


def test_log_is_trimmed_to_the_resumed_step_and_torn_lines_dropped(tmp_path):
    run = RunFolder(tmp_path)
    lines = [json.dumps(r) for r in _records("autoencoder", [5, 10]) + _records("prior", [5, 10], offset=10)]
    run.log_path.write_text("\n".join(lines) + '\n{"stage": "prior", "st')  # killed mid-line
    assert [r["global_step"] for r in run.read_log()] == [5, 10, 15, 20]
    assert run.last_global_step() == 20
    log = run.open_log(15)
    log.append({"stage": "prior", "step": 6, "global_step": 16, "loss": 0.5})
    log.close()
    assert [r["global_step"] for r in run.read_log()] == [5, 10, 15, 16]
    assert run.log_path.read_text().splitlines()[:3] == lines[:3]  # kept lines are kept byte for byte
    assert run.curves() == {"autoencoder": {"step": [5, 10], "loss": [0.2, 0.1]},
                            "prior": {"step": [5, 6], "loss": [0.2, 0.5]}}


def test_fresh_log_and_progress_before_any_record(tmp_path):
    run = RunFolder(tmp_path)
    assert run.read_log() == [] and run.curves() == {} and run.last_global_step() == 0
    log = run.open_log(0)
    log.close()
    assert run.log_path.exists() and run.last_global_step() == 0


def test_last_global_step_reads_only_the_tail(tmp_path):
    run = RunFolder(tmp_path)
    records = _records("main", range(1, 2001))
    run.log_path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert run.log_path.stat().st_size > 4096 and run.last_global_step() == 2000


def test_unwritable_log_is_one_clear_error(tmp_path):
    run = RunFolder(tmp_path)
    run.log_path.mkdir()  # a folder where the log should be
    with pytest.raises(GenbenchError, match="cannot read the training log"):
        run.open_log(0)
