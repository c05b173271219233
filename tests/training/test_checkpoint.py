"""Training checkpoints: the atomic pointer, one reading rule for latest.json, validation on load."""

import json

import pytest
import torch

from genbench.errors import GenbenchError
from genbench.training.checkpoint import check_position, load_checkpoint, save_checkpoint

META = {"stage": "main", "optimizers": {}, "summary": {"stages": {}}}


def test_checkpoint_pointer_and_cleanup(tmp_path):
    root = tmp_path / "ck"
    meta = {"stage": "main", "optimizers": {}, "summary": {"stages": {}}}
    save_checkpoint(root, "main-00000001", {"model.a": torch.ones(2)}, {**meta, "step": 1})
    save_checkpoint(root, "main-00000002", {"model.a": torch.full((2,), 2.0)}, {**meta, "step": 2})
    tensors, meta = load_checkpoint(root)
    assert meta["step"] == 2 and torch.equal(tensors["model.a"], torch.full((2,), 2.0))
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "main-00000002"]
    # a partial folder left by a killed writer is ignored
    (root / ".main-00000003.partial").mkdir()
    assert load_checkpoint(root)[1]["step"] == 2


def test_no_checkpoint_is_none(tmp_path):
    assert load_checkpoint(tmp_path / "ck") is None


@pytest.mark.parametrize("name", ["../escape", "/etc", ".hidden", "a/b", "main 1", ""])
def test_pointer_must_name_a_checkpoint_folder(tmp_path, name):
    root = tmp_path / "ck"
    save_checkpoint(root, "main-00000001", {"model.a": torch.ones(2)}, {**META, "step": 1})
    (root / "latest.json").write_text(json.dumps({"checkpoint": name}))
    with pytest.raises(GenbenchError, match="invalid checkpoint name"):
        load_checkpoint(root)


@pytest.mark.parametrize("tensors, meta, match", [
    ({"rng.cpu": torch.ones(2)}, {}, "unexpected tensors"),
    ({"model.a": torch.ones(2)}, {"step": "1"}, "field 'step' must be int"),
    ({"model.a": torch.ones(2)}, {"step": True}, "field 'step' must be int"),
    ({"model.a": torch.ones(2)}, {"summary": {"stages": {"main": {"wall_time_s": "x"}}}}, "wall_time_s"),
])
def test_invalid_checkpoints_are_refused(tmp_path, tensors, meta, match):
    root = tmp_path / "ck"
    save_checkpoint(root, "main-00000001", tensors, {**META, "step": 1, **meta})
    with pytest.raises(GenbenchError, match=match):
        load_checkpoint(root)


def test_position_is_checked_against_the_model(tmp_path):
    root = tmp_path / "ck"
    save_checkpoint(root, "prior-00000007", {"model.a": torch.ones(2)}, {**META, "stage": "prior", "step": 7})
    _, meta = load_checkpoint(root)
    check_position(meta, ("autoencoder", "prior"), lambda s: 10)
    with pytest.raises(GenbenchError, match="stage 'prior' is not a stage of this model"):
        check_position(meta, ("main",), lambda s: 10)
    with pytest.raises(GenbenchError, match=r"step 7 is outside \[0, 5\]"):
        check_position(meta, ("autoencoder", "prior"), lambda s: 5)
