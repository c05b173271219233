"""Latent diffusion: both stages through the shared trainer, the scale factor, the wrapper's round trip,
a first stage loaded from a run, and the closed-form Gaussian oracle sampled through the LDM's path.

References: numpy's std of the first stage's own encoder outputs (scale factor); the VQ-VAE's and
VAE's own reconstructions (round trip); the exact output moments of the DDPM/DDIM chains with the
Gaussian oracle (tests/test_diffusion.py), pushed through a known linear decoder (sampling).
"""

import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from genbench.files import read_tensors
from genbench.models import GenerativeModel
from genbench.config import from_dict, to_dict
from genbench.core.samplers import ddim_timesteps
from genbench.errors import GenbenchError
from genbench.models.base import get_model_class
from genbench.models.presets import PRESETS
from genbench.models.ldm import LDM, LDMConfig, vector_grid
from genbench.training.checkpoint import load_checkpoint
from genbench.training.loop import Interrupted
from genbench.training.run import train_run
from tests.core.test_diffusion import GaussianOracle, assert_moments, exact_ddim_moments, exact_ddpm_moments, np_alphas_cumprod

# a tiny VQ-VAE (f = 2: 4x4x4 latents of 8x8 digits), a tiny U-Net and a 100-step process. Whole
# sections are set (not dotted keys like unet.base_channels), so the class's PRESETS stay untouched.
TINY_VQ = {"downsample": 2, "width": 16, "n_res_blocks": 1, "codebook_size": 16, "code_dim": 4, "init_images": 128,
           "dead_code_steps": 3}
TINY_UNET = {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [], "num_heads": 1,
             "dropout": 0.0}
TINY_DIFFUSION = {"num_timesteps": 100, "schedule": "linear", "beta_start": 1e-3, "beta_end": 0.1}
TINY = [
    "first_stage=vqvae", f"vqvae={json.dumps(TINY_VQ)}", f"unet={json.dumps(TINY_UNET)}",
    f"diffusion={json.dumps(TINY_DIFFUSION)}", "sampler.steps=10",
    "train.batch_size=32", "train.log_every=2", "train.ckpt_every=1000",
]


def stages(first: int, diffusion: int, **diffusion_over) -> str:
    return "train.stages=" + json.dumps({"first_stage": {"steps": first},
                                         "diffusion": {"steps": diffusion, **diffusion_over}})


def tiny_config(**over) -> LDMConfig:
    base = {"image_size": 8, "vqvae": TINY_VQ, "vae": {"arch": "mlp", "latent_dim": 16, "width": 32}, "unet": TINY_UNET,
            "diffusion": TINY_DIFFUSION, "sampler": {"steps": 10}}
    return from_dict(LDMConfig, {**base, **over})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_digits):
    return train_run("ldm", tiny_digits, tmp_path_factory.mktemp("ldm") / "run",
                     sets=TINY + [stages(8, 6, ema_decay=0.5)], progress=False)


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory, tiny_digits):
    """A finished tiny VQ-VAE run with the LDM's first-stage architecture."""
    vq_sets = [f"{k}={v}" for k, v in TINY_VQ.items()] + [s for s in TINY if s.startswith("train.")]
    st = json.dumps({"autoencoder": {"steps": 8}, "prior": {"steps": 2}})
    return train_run("vqvae", tiny_digits, tmp_path_factory.mktemp("vq") / "run",
                     sets=vq_sets + ["prior_layers=1", "prior_heads=1", "prior_embd=16", "fit_images=64",
                                     f"train.stages={st}"], progress=False)


# ----------------------------------------------------------------------------- both stages trained here


def test_both_stages_logged_and_first_stage_has_no_prior(trained):
    records = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == ["first_stage"] * 4 + ["diffusion"] * 3
    assert all("rec_mse" in r and "perplexity" in r for r in records[:4])  # the VQ-VAE's own loss
    assert all("latent_std" in r and np.isfinite(r["loss"]) for r in records[4:])
    weights = read_tensors(trained / "model" / "model.safetensors")
    assert any(k.startswith("first_stage.encoder.") for k in weights) and any(k.startswith("unet.") for k in weights)
    assert not any(".prior." in k or k.startswith("first_stage.prior") for k in weights)


def test_scale_factor_gives_unit_variance_on_the_encoded_data(trained, tiny_digits):
    """s = 1/std of the VQ-VAE encoder's outputs on the training set (numpy, population std)."""
    model = GenerativeModel.from_pretrained(trained / "model")
    with torch.no_grad():
        raw = model.first_stage.encoder(tiny_digits.train).numpy().astype(np.float64)
        scaled = model.encode(tiny_digits.train).double()
        scaled_test = model.encode(tiny_digits.test).double()
    assert float(model.latent_scale) == pytest.approx(1.0 / raw.std(), rel=1e-5)
    assert scaled.var(correction=0).item() == pytest.approx(1.0, abs=1e-4)  # all 256 training images were used
    assert 0.7 < scaled_test.std().item() < 1.4  # held-out images: close to unit scale too
    # recorded in the exported config (the run's recipe keeps null = "measure")
    exported = json.loads((trained / "model" / "config.json").read_text())["config"]
    assert exported["scale_factor"] == float(model.latent_scale)
    assert json.loads((trained / "run.json").read_text())["model_config"]["scale_factor"] is None


def standalone_first_stage(config: dict, weights: dict):
    """The LDM's first stage rebuilt as a model of its own, outside the LDM: its class and config
    (the LDM config's overrides of that kind, at the LDM's image shape) and the LDM's `first_stage.*`
    weights. A VQ model's transformer prior, which the LDM does not build, is left untrained."""
    cls = get_model_class(config["first_stage"])
    cfg = from_dict(cls.Config, {**config[config["first_stage"]], "image_channels": config["image_channels"],
                                 "image_size": config["image_size"]})
    model = cls(cfg)
    state = {k[len("first_stage."):]: v for k, v in weights.items() if k.startswith("first_stage.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("prior.") for k in missing)
    return model.eval()


def test_decode_of_encode_equals_the_first_stage_reconstruction(trained, tiny_digits):
    """VQ first stage: the scale is inverted before the nearest-code lookup, so the wrapper's round
    trip is exactly the VQ-VAE's own reconstruction D(q(E(x))), here computed by a VQ-VAE built
    outside the LDM from the exported config and weights."""
    model = GenerativeModel.from_pretrained(trained / "model")
    vq = standalone_first_stage(json.loads((trained / "model" / "config.json").read_text())["config"],
                                read_tensors(trained / "model" / "model.safetensors"))
    x = tiny_digits.test[:64]
    with torch.no_grad():
        z = model.encode(x)
        out = model.decode(z)
        assert z.shape == (64, 4, 4, 4)
        expected = vq.reconstruct(x)
        assert torch.equal(out, expected)
        assert torch.equal(model.reconstruct(x), expected)
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1


def test_vae_first_stage_round_trip_and_layout(tiny_digits):
    torch.manual_seed(0)
    model = LDM(tiny_config(first_stage="vae")).eval()
    assert model.latent_shape == (1, 4, 4) and vector_grid(16) == (1, 4, 4) and vector_grid(12) == (3, 2, 2)
    model.prepare_stage("diffusion", tiny_digits.train)
    x = tiny_digits.test[:32]
    vae = standalone_first_stage(to_dict(model.config), model.state_dict())
    with torch.no_grad():
        z = model.encode(x)
        mean = vae.posterior(x)[0]  # the posterior mean, by the VAE outside the LDM
        torch.testing.assert_close(z.flatten(1), mean * model.latent_scale)
        torch.testing.assert_close(model.decode(z), vae.decode(mean), rtol=0, atol=1e-6)
        torch.testing.assert_close(model.reconstruct(x), vae.decode(mean), rtol=0, atol=1e-6)


def test_samples_shape_range_determinism_and_both_samplers(trained):
    model = GenerativeModel.from_pretrained(trained / "model")
    a = model.sample(6, generator=torch.Generator().manual_seed(1))
    b = model.sample(6, generator=torch.Generator().manual_seed(1))
    assert a.shape == (6, 1, 8, 8) and a.dtype == torch.float32 and torch.equal(a, b)
    assert 0 <= a.min() and a.max() <= 1
    z = model.sample_latents(6, generator=torch.Generator().manual_seed(1))
    assert z.shape == (6, 4, 4, 4) and torch.equal(model.decode(z), a)
    model.config.sampler.name = "ddpm"
    c = model.sample(3, generator=torch.Generator().manual_seed(1))
    assert c.shape == (3, 1, 8, 8) and 0 <= c.min() and c.max() <= 1
    model.train()
    model.sample(2)
    assert model.training and model.unet.training and model.first_stage.training


def test_evaluate_reports_latent_statistics_and_no_pixel_bound(trained, tiny_digits):
    model = GenerativeModel.from_pretrained(trained / "model")
    ev = model.evaluate(tiny_digits.test, generator=torch.Generator().manual_seed(0))
    assert ev["bits_per_dim"] is None and ev["bpd_estimator"].startswith("not defined")
    assert ev["latent_scale"] == float(model.latent_scale) and ev["latent_shape"] == "4x4x4"
    rec = model.first_stage.reconstruct(tiny_digits.test)
    assert ev["first_stage_recon_mse"] == pytest.approx(torch.mean((rec - tiny_digits.test) ** 2).item(), rel=1e-5)
    assert 0.5 < ev["test_latent_std"] < 2 and 0 < ev["test_diffusion_loss"] < 2


def logged_values(run):
    """Every logged record except the throughput, which depends on the machine's load."""
    lines = (run / "log.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "images_per_s"} for line in lines]


# each kind of first stage, on top of TINY's U-Net and process (VQ-GAN: discriminator on from step 1,
# so its optimizer has state at the first-stage cut; no perceptual network to train)
FIRST_STAGE_SETS = {
    "vqvae": [f"vqvae={json.dumps(TINY_VQ)}"],
    "vqgan": ["first_stage=vqgan", "vqgan=" + json.dumps({**TINY_VQ, "disc_width": 8, "disc_layers": 2, "disc_start": 1,
                                                          "perceptual_weight": 0.0})],
    "vae": ["first_stage=vae", "vae=" + json.dumps({"arch": "mlp", "latent_dim": 16, "width": 32, "beta": 0.01})],
}


@pytest.mark.parametrize("first_stage", sorted(FIRST_STAGE_SETS))
def test_resumed_run_equals_uninterrupted(tmp_path, tiny_digits, first_stage):
    """Interrupted inside the first stage (step 2 of 4) and inside the diffusion stage (step 6 = 4 + 2),
    then resumed: the same weights (bit for bit), the same log records and the same exported config
    as an uninterrupted run. Cut in the diffusion stage, the resumed process did not measure the
    scale itself, yet it records the same scale factor."""
    sets = [s for s in TINY if not s.startswith("vqvae=")] + FIRST_STAGE_SETS[first_stage] + \
        [stages(4, 4, ema_decay=0.5), "train.ckpt_every=2"]
    full = train_run("ldm", tiny_digits, tmp_path / "full", sets=sets, progress=False)
    a = read_tensors(full / "model" / "model.safetensors")
    cfg = json.loads((full / "model" / "config.json").read_text())["config"]
    assert cfg["first_stage"] == first_stage and cfg["scale_factor"] == float(a["latent_scale"])
    assert [(r["stage"], r["step"]) for r in logged_values(full)] == [("first_stage", 2), ("first_stage", 4),
                                                                      ("diffusion", 2), ("diffusion", 4)]
    for cut, stage in ((2, "first_stage"), (6, "diffusion")):
        with pytest.raises(Interrupted):
            train_run("ldm", tiny_digits, tmp_path / f"cut{cut}", sets=sets, progress=False, interrupt_at=cut)
        assert load_checkpoint(tmp_path / f"cut{cut}" / "checkpoints")[1]["stage"] == stage
        resumed = train_run("ldm", tiny_digits, tmp_path / f"cut{cut}", resume=True, progress=False)
        b = read_tensors(resumed / "model" / "model.safetensors")
        assert a.keys() == b.keys()
        for k in a:  # bit for bit (a VQ-GAN without perceptual network has a NaN buffer)
            assert (a[k].dtype, a[k].shape, a[k].numpy().tobytes()) == (b[k].dtype, b[k].shape, b[k].numpy().tobytes()), \
                (cut, k)
        assert logged_values(resumed) == logged_values(full), cut
        assert json.loads((resumed / "model" / "config.json").read_text())["config"] == cfg, cut


# the scale measured (VQ-VAE), or fixed (the untrained VAE's sampled latents have std ~1 already)
@pytest.mark.parametrize("first_stage, scale_factor", [("vqvae", None), ("vae", 2.5)])
def test_training_loss_is_l_simple_on_the_scaled_latents_of_a_frozen_first_stage(tiny_digits, first_stage,
                                                                                   scale_factor):
    """The diffusion stage's loss = mean (eps - eps_theta(sqrt(ab_t) s z + sqrt(1 - ab_t) eps, t))^2 with
    z = E(x) (VQ-VAE: pre-quantization) or z ~ q(z|x) (VAE: mu + sigma eps_z, laid out 1x4x4), recomputed
    from the same draws (global RNG seeded alike, drawn in the loss's order: eps_z, t, eps), ab_t from
    numpy (Ho et al. sec. 4). After backward the first stage, in eval mode, has no gradient."""
    torch.manual_seed(0)
    model = LDM(tiny_config(first_stage=first_stage, scale_factor=scale_factor))
    model.prepare_stage("diffusion", tiny_digits.train)
    with torch.no_grad():  # the U-Net's output layer starts at zero: perturb it, or the loss ignores z
        for p in model.unet.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.train()
    x = tiny_digits.train[:8]
    torch.manual_seed(11)
    out = model.loss(x, stage="diffusion")
    out["loss"].backward()
    assert not model.first_stage.training and model.unet.training
    assert all(p.grad is None for p in model.first_stage.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.unet.parameters())

    s, T = float(model.latent_scale), TINY_DIFFUSION["num_timesteps"]
    torch.manual_seed(11)
    with torch.no_grad():
        h = model.first_stage.encoder(x)
        if first_stage == "vae":
            mean, log_var = h.chunk(2, dim=1)
            h = (mean + (0.5 * log_var).exp() * torch.randn(mean.shape)).view(8, 1, 4, 4)
        z = s * h
        t = torch.randint(0, T, (8,))
        eps = torch.randn(z.shape)
        ab = torch.as_tensor(np_alphas_cumprod(T, "linear", TINY_DIFFUSION["beta_start"], TINY_DIFFUSION["beta_end"]))
        ab_t = ab[t].view(8, 1, 1, 1)
        x_t = (ab_t.sqrt() * z.double() + (1 - ab_t).sqrt() * eps.double()).float()
        expected = (model.unet(x_t, t) - eps).pow(2).mean()
    assert s != pytest.approx(1.0, abs=0.05)  # the scale matters
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["latent_std"].item() == pytest.approx(z.std().item(), rel=1e-5)


def test_vae_first_stage_trains_end_to_end(tmp_path, tiny_digits):
    sets = ["first_stage=vae", 'vae={"arch": "mlp", "latent_dim": 16, "width": 32, "beta": 0.01}'] + \
        [s for s in TINY if not s.startswith(("vqvae", "first_stage="))] + [stages(4, 4)]
    run = train_run("ldm", tiny_digits, tmp_path / "run", sets=sets, progress=False)
    model = GenerativeModel.from_pretrained(run / "model")
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == ["first_stage"] * 2 + ["diffusion"] * 2 and "kl" in records[0]
    assert model.latent_shape == (1, 4, 4) and model.first_stage.config.beta == 0.01
    assert model.sample(3).shape == (3, 1, 8, 8)


def test_grid_vae_first_stage_trains_end_to_end_on_its_spatial_latent(tmp_path, tiny_digits):
    """The KL first stage with a (2, 4, 4) latent grid: no vector layout, the diffusion runs on the
    grid as the VAE encodes it (posterior mean x scale), and the exported model reloads identically."""
    vae = {"arch": "grid", "downsample": 2, "latent_channels": 2, "width": 16, "beta": 0.01}
    sets = ["first_stage=vae", f"vae={json.dumps(vae)}"] + [s for s in TINY if not s.startswith(("vqvae", "first_stage="))] + \
        [stages(4, 4)]
    run = train_run("ldm", tiny_digits, tmp_path / "run", sets=sets, progress=False)
    model = GenerativeModel.from_pretrained(run / "model").eval()
    assert model.latent_shape == (2, 4, 4) and model.first_stage_latent_ndim == 3
    x = tiny_digits.test[:16]
    with torch.no_grad():
        z = model.encode(x)
        torch.testing.assert_close(z, model.first_stage.posterior(x)[0] * model.latent_scale)
        torch.testing.assert_close(model.decode(z), model.first_stage.decode(z / model.latent_scale))
    assert model.sample(3).shape == (3, 1, 8, 8)


def test_vq_first_stage_decodes_unquantized_latents_on_request(trained, tiny_digits):
    """decode_quantized=false feeds latents to the VQ decoder as they are: a reconstruction is then
    D(E(x)), not D(q(E(x)))."""
    model = GenerativeModel.from_pretrained(trained / "model").eval()
    vq = model.first_stage
    x = tiny_digits.test[:16]
    with torch.no_grad():
        z = model.encode(x)
        quantized = model.decode(z)
        model.config.decode_quantized = False
        raw = model.decode(z)
        torch.testing.assert_close(raw, vq.decoder(vq.encoder(x)).clamp(0, 1))
        torch.testing.assert_close(quantized, vq.reconstruct(x))
        assert not torch.equal(raw, quantized)


@pytest.mark.parametrize("preset, dataset, shape, at_most", [("quick", "digits", (1, 8, 8), 1 / 2),
                                                            ("standard", "fashion-mnist", (1, 28, 28), 1 / 4),
                                                            ("quick", "emoji", (3, 32, 32), 1 / 8)])
def test_preset_first_stages_compress(preset, dataset, shape, at_most):
    """Issue 17: the presets' latent holds fewer numbers than the image (digits), at least 4x fewer on
    28x28 and 8x fewer on 3x32x32 emoji, with the resolved configs a `genbench train ldm` would build."""
    from genbench.training.run import resolve_configs
    model_cfg, _ = resolve_configs("ldm", dataset, shape, preset)
    model = LDM(model_cfg)
    numbers = 1
    for n in model.latent_shape:
        numbers *= n
    assert numbers <= at_most * shape[0] * shape[1] * shape[2], (model.latent_shape, shape)
    assert model.config.first_stage == "vae" and model.config.diffusion.prediction == "v"


def test_vqgan_first_stage_trains_with_its_discriminator(tmp_path, tiny_digits):
    """The VQ-GAN's autoencoder stage, delegated: two optimizer groups ("main", "disc"), the
    discriminator switched on at disc_start (perceptual term off: no perceptual network to train)."""
    vqgan = {**TINY_VQ, "disc_width": 8, "disc_layers": 2, "disc_start": 2, "perceptual_weight": 0.0}
    sets = ["first_stage=vqgan", f"vqgan={json.dumps(vqgan)}"] + [s for s in TINY if not s.startswith(("vqvae", "first_stage="))] + \
        [stages(4, 2)]
    run = train_run("ldm", tiny_digits, tmp_path / "run", sets=sets, progress=False)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == ["first_stage"] * 2 + ["diffusion"]
    assert records[0]["disc_factor"] == 0 and records[1]["disc_factor"] == 1 and records[1]["disc_loss"] > 0
    model = GenerativeModel.from_pretrained(run / "model")
    assert model.first_stage.prior is None and model.latent_shape == (4, 4, 4)
    x = tiny_digits.test[:16]
    with torch.no_grad():
        assert torch.equal(model.decode(model.encode(x)), model.first_stage.reconstruct(x))


# ----------------------------------------------------------------------------- a first stage from a run


def test_first_stage_loaded_from_a_run(tmp_path, tiny_digits, vq_run):
    src = shutil.copytree(vq_run, tmp_path / "vq")  # deleted below: the LDM must not need it afterwards
    run = train_run("ldm", tiny_digits, tmp_path / "ldm", progress=False,
                    sets=TINY + [f"first_stage_run={src}", stages(3, 4)])
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == ["diffusion"] * 2  # train.stages.first_stage is unused
    info = json.loads((run / "run.json").read_text())
    assert list(info["summary"]["stages"]) == ["diffusion"]
    vq = GenerativeModel.from_pretrained(src / "model")
    model = GenerativeModel.from_pretrained(run / "model")
    theirs = {k: v for k, v in vq.state_dict().items() if not k.startswith("prior.")}
    ours = model.first_stage.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    x = tiny_digits.test[:32]
    with torch.no_grad():
        assert torch.equal(model.decode(model.encode(x)), vq.reconstruct(x))
    exported = json.loads((run / "model" / "config.json").read_text())["config"]
    assert exported["first_stage_run"] is None and exported["vqvae"] == json.loads(
        (src / "model" / "config.json").read_text())["config"]
    assert json.loads((run / "run.json").read_text())["model_config"]["first_stage_run"] == str(src)
    shutil.rmtree(src)
    again = GenerativeModel.from_pretrained(run / "model")  # self-contained
    assert torch.equal(again.sample(2, generator=torch.Generator().manual_seed(0)),
                       model.sample(2, generator=torch.Generator().manual_seed(0)))


def test_loaded_first_stage_has_only_the_diffusion_stage(tiny_digits, vq_run):
    model = LDM(tiny_config(first_stage_run=str(vq_run)))
    assert model.stages == ("diffusion",) and LDM.stages == ("first_stage", "diffusion")
    assert model.config.first_stage_run is None and model.config.vqvae["image_size"] == 8
    with pytest.raises(GenbenchError, match=r"unknown stage 'first_stage'; stages are \['diffusion'\] "
                                            r"\(the first stage is loaded from .*, not trained\)"):
        model.loss(tiny_digits.train[:4], stage="first_stage")


def test_bad_first_stage_runs_are_refused_before_training(tmp_path, tiny_digits, vq_run):
    cases = [
        (tmp_path / "missing", [], r"first_stage_run .* is not a finished run folder"),
        (vq_run, ["first_stage=vae"], r"holds a 'vqvae' model, but first_stage is 'vae'"),
    ]
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "run.json").write_text("{}")
    cases.append((unfinished, [], r"not a finished run folder: it holds no exported model.*--resume"))
    for i, (path, extra, match) in enumerate(cases):
        with pytest.raises(GenbenchError, match=match):
            train_run("ldm", tiny_digits, tmp_path / f"ldm{i}", progress=False,
                      sets=TINY + extra + [f"first_stage_run={path}", stages(1, 2)])
        assert not (tmp_path / f"ldm{i}").exists()  # refused while resolving the config
    fashion_sized = tiny_config(image_size=28, first_stage_run=None)
    fashion_sized.first_stage_run = str(vq_run)
    with pytest.raises(GenbenchError, match=r"was trained on 1x8x8 images, this dataset has 1x28x28"):
        fashion_sized.validate()


# ----------------------------------------------------------------------------- the Gaussian oracle in latent space


class FlatOracle(nn.Module):
    """The oracle of tests/test_diffusion.py (rows of D numbers) on latent grids (B, C, H, W)."""

    def __init__(self, oracle: GaussianOracle):
        super().__init__()
        self.oracle = oracle

    def forward(self, x, t):
        return self.oracle(x.flatten(1), t).view_as(x)


class LinearDecoder(nn.Module):
    """x = 0.5 + A z, A (64, D) small enough that no pixel is ever clamped."""

    def __init__(self, A):
        super().__init__()
        self.register_buffer("A", A)

    def forward(self, z):
        return (0.5 + z @ self.A.T).view(-1, 1, 8, 8)


@pytest.mark.parametrize("sampler,kwargs", [("ddim", {"steps": 25, "eta": 0.0}), ("ddim", {"steps": 50, "eta": 1.0}),
                                            ("ddpm", {})])
def test_gaussian_oracle_sampled_through_the_latent_path(sampler, kwargs):
    """With the exact denoiser for scaled latents s z ~ N(m, diag(sd^2)) in place of the U-Net, the
    LDM's sampler output has the exact moments of the chain (numpy recursion), and its images are
    those latents unscaled and decoded: for a linear decoder x = 0.5 + A z the pixel moments are
    0.5 + A mu / s and sum_j A_ij^2 var_j / s^2 (the chain is independent across dimensions)."""
    T, scale, n = 100, 0.5, 20_000
    rng = np.random.default_rng(0)
    m, sd = rng.uniform(-0.5, 0.5, 16), rng.uniform(0.3, 1.0, 16)
    model = LDM(tiny_config(first_stage="vae", sampler={"name": sampler, "steps": kwargs.get("steps", 10),
                                                        "eta": kwargs.get("eta", 0.0)}))
    ab = np_alphas_cumprod(T, "linear", TINY_DIFFUSION["beta_start"], TINY_DIFFUSION["beta_end"])
    model.unet = FlatOracle(GaussianOracle(ab, m, sd))
    A = torch.as_tensor(rng.normal(size=(64, 16)), dtype=torch.float32)
    A = 0.004 * A / A.norm(dim=1, keepdim=True)
    model.first_stage.decoder = LinearDecoder(A)
    model.latent_scale.fill_(scale)
    model.latent_scale_set.fill_(True)

    z = model.sample_latents(n, generator=torch.Generator().manual_seed(3))
    x = model.sample(n, generator=torch.Generator().manual_seed(3))
    if sampler == "ddpm":
        mean, var = exact_ddpm_moments(ab, m, sd, "beta_tilde")
    else:
        mean, var = exact_ddim_moments(ab, ddim_timesteps(T, kwargs["steps"]).numpy(), kwargs["eta"], m, sd)
    assert z.shape == (n, 1, 4, 4)
    assert_moments(z.flatten(1), mean, var)
    assert 0 < x.min() and x.max() < 1  # nothing clamped: the decoder stayed linear
    A64 = A.double().numpy()
    assert_moments(x.flatten(1), 0.5 + A64 @ mean / scale, (A64**2) @ var / scale**2)


# ----------------------------------------------------------------------------- configs and presets


@pytest.mark.parametrize(
    "over,match",
    [
        ({"scale_factor": 0.0}, "scale_factor must be > 0"),
        ({"sampler": {"steps": 200}}, r"sampler: steps \(200\) must be <= diffusion.num_timesteps \(100\)"),
        ({"sampler": {"eta": -1.0}}, "eta must be >= 0"),
        ({"first_stage": "pixelcnn"}, "is not one of"),
        ({"vqvae": {"code_width": 4}}, r"ldm config: vqvae: unknown field\(s\) \['code_width'\]"),
        ({"vqvae": {"image_size": 28}}, r"vqvae.image_size = 28 differs from the LDM's image_size 8"),
        ({"vqvae": {"downsample": 3}}, "downsample must be a power of 2"),
        ({"unet": {"num_heads": 3, "base_channels": 8}}, "num_heads=3 must divide"),
    ],
)
def test_config_errors_name_the_field(over, match):
    with pytest.raises(GenbenchError, match=match):
        tiny_config(**over)


def test_every_schedule_and_prediction_is_accepted():
    """The old refusal of eps-prediction under schedules with a large 1/sqrt(alpha_bar_T) is gone: it
    worked around VQ latents diverging under eps; on the VAE latents eps + cosine trains and samples
    (digits FD 1.50, docs/benchmarks.md) and the presets use v-prediction, which has no such gain."""
    for diffusion in ({"num_timesteps": 1000, "schedule": "cosine"},
                      {"num_timesteps": 1000, "schedule": "cosine", "prediction": "v"},
                      {"num_timesteps": 1000, "schedule": "linear", "prediction": "x0"}):
        LDM(tiny_config(diffusion=diffusion, sampler={"steps": 50}))


def test_latent_too_small_for_the_unet_fails_at_construction():
    with pytest.raises(GenbenchError, match=r"a 4x4 input is too small for 4 levels"):
        LDM(tiny_config(unet={"base_channels": 8, "channel_mult": [1, 2, 2, 2], "attention_levels": [],
                              "num_heads": 1}))


def test_scale_factor_must_be_measured_or_given(tiny_digits):
    model = LDM(tiny_config())
    with pytest.raises(GenbenchError, match="latent scale factor is not measured yet"):
        model.sample(2)
    fixed = LDM(tiny_config(scale_factor=2.0))
    fixed.prepare_stage("diffusion", tiny_digits.train)
    assert float(fixed.latent_scale) == 2.0 and fixed.config.scale_factor == 2.0
    assert fixed.sample(2).shape == (2, 1, 8, 8)


@pytest.mark.parametrize("preset,size,first_stage,latent", [
    ("quick", 8, "vqvae", (4, 4, 4)), ("quick", 8, "vae", (1, 4, 4)), ("quick", 8, "vqgan", (4, 4, 4)),
    ("standard", 28, "vqvae", (4, 7, 7)), ("standard", 28, "vae", (4, 7, 7)), ("standard", 28, "vqgan", (4, 7, 7)),
])
def test_presets_build_and_run_the_unet_on_their_latents(preset, size, first_stage, latent):
    cfg = from_dict(LDMConfig, {**PRESETS["ldm"][preset]["model"], "image_channels": 1, "image_size": size,
                                "first_stage": first_stage})
    model = LDM(cfg)
    assert model.latent_shape == latent
    with torch.no_grad():
        out = model.unet(torch.randn(2, *latent), torch.tensor([0, 999]))
    assert out.shape == (2, *latent)
