"""DDPM model: trains through the shared trainer, resumes exactly, samples in range, reports a finite bound."""

import json

import pytest
import torch

from genbench.files import read_tensors
from genbench.models import GenerativeModel
from genbench.config import from_dict
from genbench.errors import GenbenchError
from genbench.models.presets import PRESETS
from genbench.models.ddpm import DDPM, DDPMConfig
from genbench.training.loop import Interrupted
from genbench.training.run import train_run

# a tiny U-Net and a 100-step cosine process keep every test in seconds
TINY = ["unet.base_channels=8", "unet.channel_mult=[1,2]", "unet.num_res_blocks=1", "unet.attention_levels=[]",
        "unet.num_heads=1", "unet.dropout=0.0", "diffusion.num_timesteps=100", "sampler.steps=10",
        "bpd_timesteps=10", "bpd_images=32", "train.batch_size=32", "train.lr=2e-3", "train.warmup_steps=0",
        "train.log_every=10", "train.ckpt_every=1000"]


def fixed_batch_loss(model, x, draws=8):
    """Simple loss on fixed images with common random numbers (same t and eps for every model)."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        return sum(model.diffusion.training_loss(model.unet, x * 2 - 1, generator=g) for _ in range(draws)) / draws


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_digits):
    run = train_run("ddpm", tiny_digits, tmp_path_factory.mktemp("ddpm") / "run",
                    sets=TINY + ["train.steps=60", "train.ema_decay=0.8"], progress=False)
    return run


def test_training_lowers_the_loss_on_a_fixed_batch(trained, tiny_digits):
    x = tiny_digits.test[:64]
    model = GenerativeModel.from_pretrained(trained / "model")
    torch.manual_seed(0)
    fresh = DDPM(model.config)  # zero-initialised output: eps_hat = 0, so the eps loss is E||eps||^2 = 1
    before, after = fixed_batch_loss(fresh, x), fixed_batch_loss(model, x)
    assert abs(before - 1.0) < 0.05
    print(f"\nfixed-batch loss before {before:.3f} after {after:.3f}")
    assert after < 0.6 * before, (before, after)
    info = json.loads((trained / "run.json").read_text())
    assert info["status"] == "complete" and info["model_config"]["diffusion"]["num_timesteps"] == 100


def test_samples_have_the_image_shape_and_range(trained):
    model = GenerativeModel.from_pretrained(trained / "model")
    a = model.sample(6, generator=torch.Generator().manual_seed(1))
    b = model.sample(6, generator=torch.Generator().manual_seed(1))
    assert a.shape == (6, 1, 8, 8) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)  # DDIM eta = 0 from the same x_T
    assert a.std() > 0.05  # not a constant image
    model.config.sampler.name = "ddpm"
    c = model.sample(3, generator=torch.Generator().manual_seed(1))
    assert c.shape == (3, 1, 8, 8) and c.min() >= 0 and c.max() <= 1


def test_sample_leaves_training_mode_alone(trained):
    model = GenerativeModel.from_pretrained(trained / "model").train()
    model.sample(2)
    assert model.training and model.unet.training


def test_evaluate_reports_a_finite_bound_better_than_untrained(trained, tiny_digits):
    model = GenerativeModel.from_pretrained(trained / "model")
    ev = model.evaluate(tiny_digits.test, generator=torch.Generator().manual_seed(0))
    assert ev["bpd_estimator"].startswith("variational bound (Ho et al. 2020 eq. 5), 10 of 99 KL timesteps")
    parts = ev["prior_bpd"] + ev["diffusion_bpd"] + ev["decoder_bpd"]
    assert ev["bits_per_dim"] == pytest.approx(parts) and 0 < ev["bits_per_dim"] < 100
    torch.manual_seed(0)
    untrained = DDPM(model.config).evaluate(tiny_digits.test, generator=torch.Generator().manual_seed(0))
    assert ev["bits_per_dim"] < untrained["bits_per_dim"]


def logged_values(run):
    """Every logged record except the throughput, which depends on the machine's load."""
    lines = (run / "log.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "images_per_s"} for line in lines]


def test_resumed_run_equals_uninterrupted(tmp_path, tiny_digits):
    """Every draw in loss() comes from the global RNG, re-seeded from the step: resume is bit-identical,
    in the weights and in every logged record (steps and losses)."""
    sets = TINY + ["train.steps=8", "train.ckpt_every=4", "train.ema_decay=0.5", "train.log_every=2"]
    full = train_run("ddpm", tiny_digits, tmp_path / "full", sets=sets, progress=False)
    with pytest.raises(Interrupted):
        train_run("ddpm", tiny_digits, tmp_path / "cut", sets=sets, progress=False, interrupt_at=4)
    cut = train_run("ddpm", tiny_digits, tmp_path / "cut", resume=True, progress=False)
    a, b = read_tensors(full / "model" / "model.safetensors"), read_tensors(cut / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(k.startswith("unet.") for k in a)  # the schedule is derived from the config, not stored
    assert [r["step"] for r in logged_values(full)] == [2, 4, 6, 8]
    assert logged_values(cut) == logged_values(full)


@pytest.mark.parametrize(
    "data,match",
    [
        ({"sampler": {"steps": 2000}}, r"sampler: steps \(2000\) must be <= diffusion.num_timesteps \(1000\)"),
        ({"sampler": {"eta": -1.0}}, "eta must be >= 0"),
        ({"bpd_timesteps": 1000}, r"bpd_timesteps must be in \[0, 999\]"),
        ({"sampler": {"name": "euler"}}, "is not one of"),
        ({"unet": {"num_heads": 3}}, "num_heads=3 must divide"),
        ({"diffusion": {"prediction": "score"}}, r"diffusion.prediction: 'score' is not one of"),
        ({"unet": {"width": 3}}, r"unknown field\(s\) \['width'\]"),
    ],
)
def test_config_errors_name_the_field(data, match):
    with pytest.raises(GenbenchError, match=match):
        from_dict(DDPMConfig, data)


def test_presets_build_and_validate():
    for preset, size in (("quick", 8), ("standard", 28)):
        over = PRESETS["ddpm"][preset]["model"]
        cfg = from_dict(DDPMConfig, {**over, "image_channels": 1, "image_size": size})
        model = DDPM(cfg)
        out = model.unet(torch.randn(2, 1, size, size), torch.tensor([0, 999]))
        assert out.shape == (2, 1, size, size)


def test_configs_saved_before_the_shared_sampler_config_still_load():
    """Runs written by earlier versions kept the sampler as flat fields; they load unchanged."""
    from genbench.models.ldm import LDMConfig

    old = {"sampler": "ddpm", "sample_steps": 20, "eta": 0.5, "diffusion": {"num_timesteps": 100, "schedule": "cosine"}}
    cfg = from_dict(DDPMConfig, {**old, "bpd_timesteps": 10})
    assert (cfg.sampler.name, cfg.sampler.steps, cfg.sampler.eta) == ("ddpm", 20, 0.5)
    assert from_dict(LDMConfig, {"sample_steps": 7}).sampler.steps == 7
    with pytest.raises(GenbenchError, match=r"sampler: steps \(200\) must be <="):
        from_dict(DDPMConfig, {"sample_steps": 200, "diffusion": {"num_timesteps": 100, "schedule": "cosine"}, "bpd_timesteps": 10})
