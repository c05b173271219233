"""The shared trainer: exact resume, NaN stop, EMA, checkpoint atomicity, config validation."""

import json

import pytest
import torch

from genbench.files import read_tensors
from genbench.training.checkpoint import load_checkpoint
from genbench.models import GenerativeModel
from genbench.errors import GenbenchError
from genbench.training.config import TrainConfig, lr_at
from genbench.training.loop import EMA, Interrupted, TrainingDiverged
from genbench.training.run import train_run

TINY = ["latent_dim=4", "width=32", "arch=mlp", "train.steps=24", "train.batch_size=32",
        "train.ckpt_every=6", "train.log_every=4", "train.lr=1e-3"]


def _weights(run_dir):
    return read_tensors(run_dir / "model" / "model.safetensors")


@pytest.mark.parametrize("model", ["ae", "vae"])
@pytest.mark.parametrize("extra", [[], ["train.ema_decay=0.9", "train.grad_clip=1.0", "train.lr_schedule=cosine"]])
def test_resumed_run_equals_uninterrupted(tmp_path, tiny_digits, model, extra):
    sets = TINY + extra
    full = train_run(model, tiny_digits, tmp_path / "full", sets=sets, progress=False)
    with pytest.raises(Interrupted):
        train_run(model, tiny_digits, tmp_path / "cut", sets=sets, progress=False, interrupt_at=12)
    assert json.loads((tmp_path / "cut" / "run.json").read_text())["status"] == "running"
    with pytest.raises(GenbenchError, match="already holds a run"):
        train_run(model, tiny_digits, tmp_path / "cut", sets=sets, progress=False)
    train_run(model, tiny_digits, tmp_path / "cut", resume=True, progress=False)
    a, b = _weights(full), _weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the logged loss sequence is the same too
    la = [json.loads(line)["loss"] for line in (full / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(line)["loss"] for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert la == lb


def test_training_reduces_loss(tmp_path, tiny_digits):
    run = train_run("vae", tiny_digits, tmp_path / "r", sets=TINY[:-4] + ["train.steps=150", "train.batch_size=64",
                                                                          "train.lr=3e-3", "train.log_every=10"],
                    progress=False)
    losses = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.8 * losses[0]


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tmp_path, tiny_digits, monkeypatch):
    from genbench.models.ae import AE

    original = AE.loss

    def poisoned(self, batch, step=0, stage="main"):
        out = original(self, batch, step, stage)
        if step >= 9:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(AE, "loss", poisoned)
    with pytest.raises(TrainingDiverged, match="step 9") as err:
        train_run("ae", tiny_digits, tmp_path / "r", sets=TINY, progress=False)
    assert "last good checkpoint" in str(err.value)
    tensors, meta = load_checkpoint(tmp_path / "r" / "checkpoints")
    assert meta["step"] == 6
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if v.is_floating_point())


def test_ema_update_formula():
    lin = torch.nn.Linear(2, 1)
    ema = EMA(lin, decay=0.9)
    before = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update(lin)
    torch.testing.assert_close(ema.shadow["weight"], 0.9 * before["weight"] + 0.1 * lin.weight)
    torch.testing.assert_close(ema.shadow["bias"], before["bias"])


def test_ema_weights_are_exported(tmp_path, tiny_digits):
    run = train_run("ae", tiny_digits, tmp_path / "r", sets=TINY + ["train.ema_decay=0.5"], progress=False)
    _, meta = load_checkpoint(run / "checkpoints")
    tensors, _ = load_checkpoint(run / "checkpoints")
    exported = _weights(run)
    for k, v in exported.items():
        if k.startswith("encoder"):
            assert torch.equal(v, tensors[f"ema.{k}"]), k


def test_lr_schedule():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, lr_schedule="cosine")
    assert lr_at(cfg, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 55) == pytest.approx(0.5)
    assert lr_at(cfg, 100) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("bad, match", [
    (["train.lr=-1"], "lr must be > 0"),
    (["train.steps=ten"], "expected an integer"),
    (["train.nonsense=1"], "has no field 'nonsense'"),
    (["latent_dim=0"], "latent_dim must be >= 1"),
    (["arch=transformer"], "not one of"),
    (["bogus=1"], "unknown key 'bogus'"),
    (["train.stages={\"prior\": {\"steps\": 3}}"], "not stages of ae"),
    (["noequals"], "expected key=value"),
])
def test_bad_config_is_refused_before_anything_is_written(tmp_path, tiny_digits, bad, match):
    with pytest.raises(GenbenchError, match=match):
        train_run("ae", tiny_digits, tmp_path / "r", sets=TINY + bad, progress=False)
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_bf16_autocast_trains(tmp_path, tiny_digits):
    run = train_run("vae", tiny_digits, tmp_path / "r", sets=TINY + ["train.bf16=true"], progress=False)
    model = GenerativeModel.from_pretrained(run / "model")
    assert torch.isfinite(model.sample(4)).all()
