"""A run from request to exported model: a run folder is reused or resumed only for the request that
made it; anything else is one error naming the difference, before any work."""

import json

import pytest

from genbench.data import DatasetSpec
from genbench.errors import GenbenchError
from genbench.training import run as run_mod
from genbench.training.loop import Interrupted
from genbench.training.run import train_run
from genbench.training.run_folder import RunFolder

SETS = ["arch=mlp", "latent_dim=4", "width=16", "train.steps=6", "train.ckpt_every=3", "train.batch_size=32"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_digits):
    out = tmp_path_factory.mktemp("runs") / "ae"
    train_run("ae", tiny_digits, out, sets=SETS, progress=False, dataset_spec=DatasetSpec("digits", limit=256))
    return out


@pytest.fixture
def no_training(monkeypatch):
    """Any training at all fails the test: reuse must not train, a refusal must come first."""
    def fail(*args, **kwargs):
        raise AssertionError("trained")

    monkeypatch.setattr(run_mod, "train", fail)


def test_the_same_request_reuses_the_finished_run_without_training(finished, tiny_digits, no_training):
    before = finished.joinpath("run.json").read_bytes()
    spec = DatasetSpec("digits", limit=256)
    assert train_run("ae", tiny_digits, finished, preset="quick", sets=list(reversed(SETS)), resume=True,
                     dataset_spec=spec) == finished  # the order of --set items does not matter
    assert train_run("ae", tiny_digits, finished, resume=True, dataset_spec=spec) == finished  # "as recorded"
    assert finished.joinpath("run.json").read_bytes() == before


@pytest.mark.parametrize("model, preset, sets, spec, match", [
    ("vae", "quick", SETS, DatasetSpec("digits", limit=256), r"model: ae here, vae requested"),
    ("ae", "quick", SETS[:-1] + ["train.batch_size=64"], DatasetSpec("digits", limit=256),
     r"train.batch_size: 32 here, 64 requested"),
    ("ae", "quick", SETS + ["latent_dim=5"], DatasetSpec("digits", limit=256), r"model.latent_dim: 4 here, 5 requested"),
    ("ae", "standard", SETS, DatasetSpec("digits", limit=256), r"train.lr: 0.002 here, 0.001 requested"),
    ("ae", "quick", SETS, DatasetSpec("digits", limit=200), r"dataset.limit: 256 here, 200 requested"),
    ("ae", None, None, DatasetSpec("digits"), r"dataset.limit: 256 here, None requested"),
])
def test_another_request_on_a_finished_run_is_refused_naming_the_difference(finished, tiny_digits, no_training,
                                                                           model, preset, sets, spec, match):
    with pytest.raises(GenbenchError, match=match):
        train_run(model, tiny_digits, finished, preset=preset, sets=sets, resume=True, dataset_spec=spec)


def test_an_unfinished_run_is_resumed_only_for_its_own_request(tmp_path, tiny_digits):
    spec = DatasetSpec("digits", limit=256)
    with pytest.raises(Interrupted):
        train_run("ae", tiny_digits, tmp_path / "r", sets=SETS, progress=False, interrupt_at=3, dataset_spec=spec)
    with pytest.raises(GenbenchError, match="model: ae here, vqvae requested"):
        train_run("vqvae", tiny_digits, tmp_path / "r", resume=True, dataset_spec=spec)
    with pytest.raises(GenbenchError, match="model.width: 16 here, 32 requested"):
        train_run("ae", tiny_digits, tmp_path / "r", preset="quick", sets=SETS[:2] + SETS[3:] + ["width=32"],
                  resume=True, dataset_spec=spec)
    assert not RunFolder(tmp_path / "r").is_complete()
    train_run("ae", tiny_digits, tmp_path / "r", resume=True, progress=False, dataset_spec=spec)
    assert RunFolder(tmp_path / "r").is_complete()


def test_differences_are_listed_all_at_once(finished):
    from genbench.training.run import request_differences

    info = RunFolder(finished).read_info()
    diffs = request_differences(info, "ae", DatasetSpec("digits", limit=100), (1, 8, 8), "quick",
                                SETS + ["latent_dim=6", "train.lr=0.5"])
    assert diffs == ["dataset.limit: 256 here, 100 requested", "model.latent_dim: 4 here, 6 requested",
                     "train.lr: 0.002 here, 0.5 requested"]
    assert request_differences(info, "ae", DatasetSpec("digits", limit=256), (1, 8, 8), "quick", SETS) == []


def test_a_run_recorded_with_only_a_dataset_name_matches_the_full_spec(finished, tiny_digits, no_training, tmp_path):
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(finished, copy)
    info = json.loads((copy / "run.json").read_text())
    info["dataset"] = {"name": "digits", "limit": 256}  # fields left out mean their defaults
    (copy / "run.json").write_text(json.dumps(info))
    assert train_run("ae", tiny_digits, copy, resume=True, dataset_spec=DatasetSpec("digits", limit=256)) == copy


# ---------------------------------------------------------------------------------------------
# --set on resume: what an unfinished run may change is applied and recorded, the rest refused


def test_resume_applies_and_records_the_changes_an_unfinished_run_may_take(tmp_path, tiny_digits):
    spec = DatasetSpec("digits", limit=256)
    with pytest.raises(Interrupted):
        train_run("ae", tiny_digits, tmp_path / "r", sets=SETS, progress=False, interrupt_at=3, dataset_spec=spec)
    changed = SETS[:4] + ["train.ckpt_every=2", "train.batch_size=32", "train.lr=0.0005", "train.grad_clip=1.0",
                          "train.steps=8", "train.log_every=1"]
    train_run("ae", tiny_digits, tmp_path / "r", sets=changed, resume=True, progress=False, dataset_spec=spec)
    info = RunFolder(tmp_path / "r").read_info()
    cfg = info["train_config"]
    assert (cfg["lr"], cfg["grad_clip"], cfg["steps"], cfg["log_every"], cfg["ckpt_every"]) == (5e-4, 1.0, 8, 1, 2)
    assert info["changed_on_resume"] == [{"sets": changed, "changes": {
        "train.ckpt_every": [3, 2], "train.grad_clip": [0.0, 1.0], "train.log_every": [50, 1], "train.lr": [0.002, 0.0005],
        "train.steps": [6, 8]}}]
    log = RunFolder(tmp_path / "r").read_log()
    assert [r["step"] for r in log][-5:] == [4, 5, 6, 7, 8] and all(r["lr"] <= 5e-4 for r in log if r["step"] > 3)
    assert info["status"] == "complete" and info["summary"]["stages"]["main"]["steps"] == 8


def test_resume_refuses_changes_that_would_make_another_run(tmp_path, tiny_digits):
    spec = DatasetSpec("digits", limit=256)
    with pytest.raises(Interrupted):
        train_run("ae", tiny_digits, tmp_path / "r", sets=SETS, progress=False, interrupt_at=3, dataset_spec=spec)
    before = (tmp_path / "r" / "run.json").read_bytes()
    for extra, match in ((["train.batch_size=16"], r"train.batch_size: 32 here, 16 requested"),
                         (["train.lr=0.1", "latent_dim=8"], r"\(model.latent_dim: 4 here, 8 requested\)")):
        with pytest.raises(GenbenchError, match=match + r".*an unfinished run may change only train.\{steps, lr, "):
            train_run("ae", tiny_digits, tmp_path / "r", sets=SETS + extra, resume=True, dataset_spec=spec)
    assert (tmp_path / "r" / "run.json").read_bytes() == before  # nothing half-applied


def test_a_finished_run_takes_no_changes(finished, tiny_digits):
    with pytest.raises(GenbenchError, match=r"train.lr: 0.002 here, 0.001 requested\); choose another --out$"):
        train_run("ae", tiny_digits, finished, sets=SETS + ["train.lr=0.001"], resume=True,
                  dataset_spec=DatasetSpec("digits", limit=256))


@pytest.mark.parametrize("model, item, match", [
    ("ae", "train.steps=0", "train config: steps must be >= 1"),
    ("vqvae", "train.stages.prior.steps=0", r"train config: stages.prior: steps must be >= 1"),
])
def test_zero_step_trainings_are_refused_up_front(tmp_path, tiny_digits, model, item, match):
    with pytest.raises(GenbenchError, match=match):
        train_run(model, tiny_digits, tmp_path / "r", sets=[item])
    assert not (tmp_path / "r").exists()


DDPM = ["train.steps=4", "train.ckpt_every=2", "train.batch_size=16", "unet.base_channels=8", "unet.num_heads=1",
        "diffusion.num_timesteps=20", "bpd_timesteps=2", "bpd_images=8", "sampler.steps=4"]


def test_the_sampler_is_no_part_of_training(tmp_path, tiny_digits):
    """An unfinished run takes another sampler (recorded); a finished run refuses it through train and
    says where a sampler is chosen; a caller that samples itself (the comparison) reuses the run."""
    spec = DatasetSpec("digits", limit=256)
    with pytest.raises(Interrupted):
        train_run("ddpm", tiny_digits, tmp_path / "r", sets=DDPM, progress=False, interrupt_at=2, dataset_spec=spec)
    train_run("ddpm", tiny_digits, tmp_path / "r", sets=DDPM + ["sampler.name=heun"], resume=True, progress=False,
              dataset_spec=spec)
    info = RunFolder(tmp_path / "r").read_info()
    assert info["model_config"]["sampler"]["name"] == "heun"
    assert info["changed_on_resume"][0]["changes"] == {"model.sampler.name": ["dpm++2m", "heun"]}
    exported = json.loads((tmp_path / "r" / "model" / "config.json").read_text())
    assert exported["config"]["sampler"]["name"] == "heun"
    with pytest.raises(GenbenchError, match=r"model.sampler.steps: 4 here, 9 requested.*genbench sample RUN --sampler"):
        train_run("ddpm", tiny_digits, tmp_path / "r", sets=DDPM + ["sampler.name=heun", "sampler.steps=9"],
                  resume=True, dataset_spec=spec)
    assert train_run("ddpm", tiny_digits, tmp_path / "r", sets=DDPM + ["sampler.steps=9"], resume=True,
                     dataset_spec=spec, sampler_elsewhere=True) == tmp_path / "r"
