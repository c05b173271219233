"""Checkpoints: safetensors + validated JSON, hashes checked, pickles refused, atomic pointer."""

import json
import pickle

import pytest
import torch

from genbench.checkpoint import load_checkpoint, load_pretrained, save_checkpoint, save_pretrained
from genbench.errors import GenbenchError
from genbench.models.vae import VAE, VAEConfig


@pytest.fixture
def saved(tmp_path):
    model = VAE(VAEConfig(arch="mlp", latent_dim=3, width=16))
    save_pretrained(model, tmp_path / "m")
    return model, tmp_path / "m"


def test_round_trip_is_exact(saved):
    model, folder = saved
    loaded = load_pretrained(folder)
    assert loaded.config == model.config
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_truncated_weights_refused(saved):
    _, folder = saved
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(GenbenchError, match="truncated"):
        load_pretrained(folder)


def test_corrupted_weights_refused(saved):
    _, folder = saved
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(GenbenchError, match="corrupted"):
        load_pretrained(folder)


def test_pickle_disguised_as_checkpoint_is_never_unpickled(saved, tmp_path):
    _, folder = saved

    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    payload = pickle.dumps({"state": Boom()})
    (folder / "model.safetensors").write_bytes(payload)
    meta = json.loads((folder / "config.json").read_text())
    import hashlib

    meta["weights"] = {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(GenbenchError, match="not a valid safetensors file"):
        load_pretrained(folder)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["config"].update(latent_dim="3"), "expected an integer"),
    (lambda m: m["config"].update(extra_field=1), "unknown field"),
    (lambda m: m.update(model="gpt5"), "unknown model 'gpt5'"),
    (lambda m: m["config"].update(likelihood="poisson"), "not one of"),
    (lambda m: m.pop("weights"), "not a genbench model config"),
])
def test_invalid_config_refused(saved, edit, match):
    _, folder = saved
    meta = json.loads((folder / "config.json").read_text())
    edit(meta)
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(GenbenchError, match=match):
        load_pretrained(folder)


def test_config_not_json(saved):
    _, folder = saved
    (folder / "config.json").write_text("{not json")
    with pytest.raises(GenbenchError, match="not valid JSON"):
        load_pretrained(folder)


def test_shape_mismatch_refused(saved):
    _, folder = saved
    meta = json.loads((folder / "config.json").read_text())
    meta["config"]["latent_dim"] = 5
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(GenbenchError, match="shape"):
        load_pretrained(folder)


def test_checkpoint_pointer_and_cleanup(tmp_path):
    root = tmp_path / "ck"
    save_checkpoint(root, "main-00000001", {"a": torch.ones(2)}, {"step": 1})
    save_checkpoint(root, "main-00000002", {"a": torch.full((2,), 2.0)}, {"step": 2})
    tensors, meta = load_checkpoint(root)
    assert meta["step"] == 2 and torch.equal(tensors["a"], torch.full((2,), 2.0))
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "main-00000002"]
    # a partial folder left by a killed writer is ignored
    (root / ".main-00000003.partial").mkdir()
    assert load_checkpoint(root)[1]["step"] == 2


def test_unwritable_output_folder(tmp_path):
    import os

    if os.geteuid() == 0:
        # root ignores permission bits; use a path under a regular file instead
        (tmp_path / "file").write_text("x")
        target = tmp_path / "file" / "sub"
    else:
        tmp_path.chmod(0o500)
        target = tmp_path / "sub"
    model = VAE(VAEConfig(arch="mlp", latent_dim=3, width=16))
    with pytest.raises(GenbenchError, match="cannot create output folder"):
        save_pretrained(model, target)
