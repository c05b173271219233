"""VQ-GAN: adaptive weight and GAN losses against their formulas, the PatchGAN's shapes, the
discriminator's switch-on, exact resume through the shared trainer with two optimizers, sampling,
evaluation and the perceptual network's plumbing (cached, plug-in, never saved with the model)."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.special import expit

import genbench.nets.perceptual as perceptual
from genbench.files import read_tensors
from genbench.training.checkpoint import load_checkpoint
from genbench.models import GenerativeModel
from genbench.errors import GenbenchError
from genbench.core.losses import adaptive_weight, discriminator_loss, generator_loss, hinge_d_loss, vanilla_d_loss
from genbench.nets.discriminator import PatchDiscriminator
from genbench.models.presets import DATASET_PRESETS
from genbench.models.vqgan import VQGAN, VQGANConfig
from genbench.nets.perceptual import PerceptualTrainConfig, get_perceptual_network, images_hash, save_perceptual_weights
from genbench.training.loop import Interrupted
from genbench.training.run import resolve_configs, train_run

DISC_START = 3
STAGES = json.dumps({"autoencoder": {"steps": 6, "beta1": 0.5, "beta2": 0.9}, "prior": {"steps": 4}})
TINY = [
    "width=16", "n_res_blocks=1", "codebook_size=16", "code_dim=8", "dead_code_steps=3", "init_images=128",
    "prior_layers=1", "prior_heads=2", "prior_embd=32", "fit_images=200", "disc_width=8", "disc_layers=2",
    f"disc_start={DISC_START}", "train.batch_size=32", "train.ckpt_every=1", "train.log_every=1",
    f"train.stages={STAGES}",
]
TINY_CFG = dict(width=16, n_res_blocks=1, codebook_size=16, code_dim=8, init_images=128, prior_layers=1,
                prior_heads=2, prior_embd=32, disc_width=8, disc_layers=2, disc_start=DISC_START)
TINY_PERCEPTUAL = PerceptualTrainConfig(steps=25, batch_size=16)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A private perceptual cache and a few-step perceptual preset for every test of this module."""
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("cache")
        mp.setenv("GENBENCH_CACHE", str(cache))
        mp.setitem(perceptual.TRAIN_PRESETS, "small", TINY_PERCEPTUAL)
        yield cache


@pytest.fixture(scope="module")
def data():
    from genbench.data import load_dataset

    return load_dataset("digits", limit=256)


@pytest.fixture(scope="module")
def trained(env, data, tmp_path_factory):
    run = train_run("vqgan", data, tmp_path_factory.mktemp("vqgan") / "full", sets=TINY, progress=False)
    return run


# ----------------------------------------------------------------------------- formulas


def test_adaptive_weight_matches_formula_on_known_gradients():
    # last layer W (3x4) on a fixed input h: grad of sum((Wh - y)^2) is 2 (Wh - y) h^T, of -sum(c * Wh) is -c h^T
    rng = np.random.default_rng(0)
    w0, h, y, c = rng.normal(size=(3, 4)), rng.normal(size=4), rng.normal(size=3), rng.normal(size=3)
    W = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    out = W @ torch.tensor(h)
    rec = (out - torch.tensor(y)).pow(2).sum()
    g = -(torch.tensor(c) * out).sum()
    lam = adaptive_weight(rec, g, W, disc_weight=0.8)
    rec_norm = np.linalg.norm(2 * np.outer(w0 @ h - y, h))
    g_norm = np.linalg.norm(np.outer(c, h))
    assert lam.item() == pytest.approx(0.8 * rec_norm / (g_norm + 1e-4), rel=1e-6)
    assert not lam.requires_grad and W.grad is None  # detached, and autograd.grad accumulates nothing
    (rec + g).backward()  # both graphs were retained
    assert W.grad is not None


def test_adaptive_weight_clamped_to_1e4():
    W = torch.nn.Parameter(torch.ones(2, 2))
    rec = (W * 3).sum()  # ||grad|| = 6
    g = (W * 1e-9).sum()  # ||grad|| = 2e-9: the ratio 6 / (2e-9 + 1e-4) ~ 6e4 is clamped
    assert adaptive_weight(rec, g, W, disc_weight=2.0).item() == pytest.approx(2e4)
    assert adaptive_weight((W * 0).sum(), g, W).item() == 0


def test_gan_losses_match_formulas():
    gen = torch.Generator().manual_seed(0)
    real, fake = torch.randn(4, 1, 3, 3, generator=gen) * 2, torch.randn(4, 1, 3, 3, generator=gen) * 2
    r, f = real.double().numpy(), fake.double().numpy()
    hinge = np.maximum(0, 1 - r).mean() + np.maximum(0, 1 + f).mean()
    assert hinge_d_loss(real, fake).item() == pytest.approx(hinge, rel=1e-6)
    vanilla = -np.log(expit(r)).mean() - np.log(1 - expit(f)).mean()
    assert vanilla_d_loss(real, fake).item() == pytest.approx(vanilla, rel=1e-6)
    assert discriminator_loss(real, fake, "hinge").item() == hinge_d_loss(real, fake).item()
    assert generator_loss(fake, "hinge").item() == pytest.approx(-f.mean(), rel=1e-6)
    assert generator_loss(fake, "vanilla").item() == pytest.approx(-np.log(expit(f)).mean(), rel=1e-6)
    with pytest.raises(GenbenchError, match="GAN loss must be one of"):
        generator_loss(fake, "wgan")


@pytest.mark.parametrize("size,n_layers,patch", [(8, 2, 2), (8, 3, 2), (28, 2, 5), (64, 3, 6)])
def test_patch_discriminator_shapes(size, n_layers, patch):
    # 64x64 with 3 layers is taming's unchanged NLayerDiscriminator: 64 -> 32 -> 16 -> 8 -> 7 -> 6
    d = PatchDiscriminator(1, size, width=8, n_layers=n_layers)
    x = torch.rand(3, 1, size, size)
    logits = d(x)
    assert logits.shape == (3, 1, patch, patch) == (3, 1, d.output_size, d.output_size)
    torch.testing.assert_close(d(x[:1]), logits[:1])  # per-image (GroupNorm): batch-mates do not matter
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in d.modules())
    if size >= 64:
        assert all(m.kernel_size == (4, 4) for m in d.net if isinstance(m, torch.nn.Conv2d))
    with pytest.raises(GenbenchError, match="norm must be one of"):
        PatchDiscriminator(1, size, norm="batch")


# ----------------------------------------------------------------------------- the discriminator's switch-on


def backward_like_trainer(model, out, stage="autoencoder"):
    groups = model.optimizer_groups(stage)
    for i, (g, params) in enumerate(groups.items()):
        loss = out["loss"] if g == "main" else out[f"loss_{g}"]
        loss.backward(inputs=params, retain_graph=i < len(groups) - 1)
    return groups


def test_discriminator_gets_no_gradient_before_disc_start_and_does_after(data):
    model = VQGAN(VQGANConfig(**TINY_CFG, perceptual_weight=0.0)).train()
    model.prepare_stage("autoencoder", data.train)
    x = data.train[:32]
    out = model.loss(x, step=DISC_START - 1)
    groups = backward_like_trainer(model, out)
    assert all(p.grad is None for p in groups["disc"])
    assert all(p.grad is not None for p in model.decoder.parameters())
    assert out["loss_disc"].item() == 0 and out["adaptive_weight"].item() == 0 and out["disc_factor"].item() == 0

    model.zero_grad(set_to_none=True)
    out = model.loss(x, step=DISC_START)
    out["loss"].backward(inputs=groups["main"], retain_graph=True)
    assert all(p.grad is None for p in groups["disc"])  # the generator's loss never reaches D
    main_grads = [p.grad.clone() for p in groups["main"] if p.grad is not None]
    out["loss_disc"].backward(inputs=groups["disc"])
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in groups["disc"])
    assert sum(float(p.grad.abs().sum()) for p in groups["disc"]) > 0
    assert all(torch.equal(a, p.grad) for a, p in zip(main_grads, [p for p in groups["main"] if p.grad is not None]))
    assert out["disc_factor"].item() == 1 and out["adaptive_weight"].item() > 0


def test_adaptive_weight_inside_loss_is_eq_7(data):
    model = VQGAN(VQGANConfig(**TINY_CFG, perceptual_weight=0.0, disc_weight=0.5))
    model.prepare_stage("autoencoder", data.train)
    model.eval()  # the quantizer's state stays put, so a second forward pass is the same computation
    x = data.train[:16]
    out = model.loss(x, step=DISC_START)
    x_hat = model.decoder(model.quantizer(model.encoder(x)).quantized)
    rec_grad, = torch.autograd.grad((x_hat - x).abs().mean(), model.last_layer, retain_graph=True)
    g_grad, = torch.autograd.grad(-model.discriminator(x_hat).mean(), model.last_layer)
    expected = 0.5 * rec_grad.norm() / (g_grad.norm() + 1e-4)
    assert out["adaptive_weight"].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("rec_loss, disc_loss", [("l1", "hinge"), ("l2", "vanilla")])
def test_total_losses_are_the_sum_of_their_parts(env, data, rec_loss, disc_loss):
    """Esser et al. eq. 5-6 recomputed from the model's parts: L_rec = |x - x^|_1 (or squared, per-pixel
    mean) + w_p d_perc(x, x^), L_G = L_rec + L_vq + lambda f g_loss(D(x^)), L_D = f d_loss(D(x), D(x^)),
    f = disc_factor from disc_start on and 0 before, lambda by eq. 7 with torch.autograd.grad, the GAN
    losses written out (hinge: -mean l_fake, relu; vanilla: softplus). Weights != 1 so each one shows."""
    w_p, f_on, disc_weight = 0.6, 0.7, 0.5
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig(**TINY_CFG, rec_loss=rec_loss, disc_loss=disc_loss, perceptual_weight=w_p,
                              disc_factor=f_on, disc_weight=disc_weight, beta=2.0,
                              codebook_init="uniform"))  # codes away from the encoder outputs: L_vq shows
    model.prepare_stage("autoencoder", data.train)
    model.eval()  # the quantizer's state stays put, so each forward pass below is the same computation
    x = data.train[:16]
    relu, softplus = torch.nn.functional.relu, torch.nn.functional.softplus
    for step in (DISC_START - 1, DISC_START):
        out = model.loss(x, step=step)
        q = model.quantizer(model.encoder(x))
        x_hat = model.decoder(q.quantized)
        rec = (x_hat - x).abs().mean() if rec_loss == "l1" else (x_hat - x).pow(2).mean()
        l_rec = rec + w_p * model.perceptual_distance(x, x_hat).mean()
        if step < DISC_START:
            f, lam, g_loss, d_loss = 0.0, 0.0, torch.zeros(()), torch.zeros(())
        else:
            f = f_on
            fake = model.discriminator(x_hat)
            g_loss = -fake.mean() if disc_loss == "hinge" else softplus(-fake).mean()
            grad_rec, = torch.autograd.grad(l_rec, model.last_layer, retain_graph=True)
            grad_g, = torch.autograd.grad(g_loss, model.last_layer, retain_graph=True)
            lam = disc_weight * min(max((grad_rec.norm() / (grad_g.norm() + 1e-4)).item(), 0.0), 1e4)
            real, fake = model.discriminator(x), model.discriminator(x_hat.detach())
            d_loss = relu(1 - real).mean() + relu(1 + fake).mean() if disc_loss == "hinge" else \
                softplus(-real).mean() + softplus(fake).mean()
            assert lam > 0 and abs(g_loss.item()) > 1e-3 and d_loss.item() > 0.1
        assert q.loss.item() > 1e-2
        assert out["loss"].item() == pytest.approx((l_rec + q.loss + lam * f * g_loss).item(), rel=1e-5), step
        assert out["loss_disc"].item() == pytest.approx(f * d_loss.item(), rel=1e-5, abs=1e-12), step
        assert out["adaptive_weight"].item() == pytest.approx(lam, rel=1e-5)
        assert out["disc_factor"].item() == pytest.approx(f)


# ----------------------------------------------------------------------------- through the trainer


def initial_discriminator(data):
    cfg, train_cfg = resolve_configs("vqgan", "digits", data.shape, "quick", TINY)
    torch.manual_seed(train_cfg.seed)  # as train_run initialises the model
    return VQGAN(cfg).discriminator.state_dict()


@pytest.mark.parametrize("cut", [DISC_START, 8])  # the autoencoder stage, at disc_start; the prior stage (6 + 2)
def test_resumed_run_equals_uninterrupted(trained, data, tmp_path, cut):
    with pytest.raises(Interrupted):
        train_run("vqgan", data, tmp_path / "cut", sets=TINY, progress=False, interrupt_at=cut)
    if cut == DISC_START:
        # steps 0..disc_start-1 done: the discriminator is untouched and has no optimizer state yet
        tensors, meta = load_checkpoint(tmp_path / "cut" / "checkpoints")
        assert meta["step"] == DISC_START
        for k, v in initial_discriminator(data).items():
            assert torch.equal(tensors[f"model.discriminator.{k}"], v), k
        assert not [k for k in tensors if k.startswith("optim.disc.")]
        assert [k for k in tensors if k.startswith("optim.main.")]
    train_run("vqgan", data, tmp_path / "cut", resume=True, progress=False)
    a = read_tensors(trained / "model" / "model.safetensors")
    b = read_tensors(tmp_path / "cut" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    drop_speed = lambda run: [{k: v for k, v in json.loads(s).items() if k != "images_per_s"}  # noqa: E731
                              for s in (run / "log.jsonl").read_text().splitlines()]
    assert drop_speed(trained) == drop_speed(tmp_path / "cut")


def test_logs_and_discriminator_trained_after_start(trained, data):
    records = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    ae = [r for r in records if r["stage"] == "autoencoder"]
    assert [r["step"] for r in ae] == [1, 2, 3, 4, 5, 6]
    keys = {"loss", "rec_loss", "perceptual", "g_loss", "disc_loss", "adaptive_weight", "disc_factor",
            "disc_logits_real", "disc_logits_fake", "perplexity", "usage", "loss_disc"}
    assert all(keys <= r.keys() for r in ae)
    for r in ae:  # record of step s logs the loss of step s - 1
        on = r["step"] - 1 >= DISC_START
        assert r["disc_factor"] == float(on) and (r["adaptive_weight"] > 0) == on and (r["disc_loss"] > 0) == on
        assert r["perceptual"] > 0 and 1 <= r["perplexity"] <= 16
    assert all("prior_nll_per_token" in r for r in records if r["stage"] == "prior")
    final = GenerativeModel.from_pretrained(trained / "model").discriminator.state_dict()
    assert any(not torch.equal(final[k], v) for k, v in initial_discriminator(data).items())


def test_sample_shapes_range_and_determinism(trained):
    model = GenerativeModel.from_pretrained(trained / "model")
    a = model.sample(6, generator=torch.Generator().manual_seed(3))
    b = model.sample(6, generator=torch.Generator().manual_seed(3))
    assert a.shape == (6, 1, 8, 8) and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b)
    x = torch.rand(4, 1, 8, 8)
    idx = model.encode(x)
    assert idx.shape == (4, 4, 4) and model.reconstruct(x).shape == x.shape


def test_evaluate_reports_vqvae_metrics_and_the_perceptual_network(trained, data, env):
    model = GenerativeModel.from_pretrained(trained / "model")
    assert model._perceptual is None  # loading never needs the perceptual network
    ev = model.evaluate(data.test)
    json.dumps(ev)
    for k in ("recon_mse", "codebook_usage", "codebook_perplexity", "prior_nll_nats", "bits_per_dim"):
        assert math.isfinite(ev[k]), k
    assert "upper bound" in ev["bpd_assumptions"]
    net = get_perceptual_network(data.train)  # from the module's cache: what training used
    assert ev["perceptual_weights_sha256"] == net.weights_sha256
    assert "rotation prediction" in ev["perceptual_network"]
    assert images_hash(data.train)[:16] in ev["perceptual_network"]
    assert ev["perceptual_rotation_accuracy"] == pytest.approx(net.rotation_accuracy)
    assert ev["discriminator_patch_map"] == 2
    assert "rotation-prediction" in VQGAN.FAMILY["latent"]


def test_perceptual_network_is_not_saved_with_the_model(trained):
    state = read_tensors(trained / "model" / "model.safetensors")
    perceptual_keys = sorted(k for k in state if "perceptual" in k)
    assert perceptual_keys == ["perceptual_accuracy", "perceptual_images_sha256", "perceptual_weights_sha256"]
    model = GenerativeModel.from_pretrained(trained / "model")
    modules = {type(m).__name__ for m in model.modules()}
    assert "PerceptualVGG" not in modules
    n = sum(p.numel() for p in model.parameters())
    parts = (model.encoder, model.decoder, model.quantizer, model.prior, model.discriminator)
    assert n == sum(p.numel() for m in parts for p in m.parameters())


def test_missing_or_changed_perceptual_network_is_a_clear_error(data, env, tmp_path, monkeypatch):
    x = data.train[:8]
    model = VQGAN(VQGANConfig(**TINY_CFG))
    with pytest.raises(GenbenchError, match="no perceptual network attached"):
        model.loss(x)
    model.prepare_stage("autoencoder", data.train)
    fresh = VQGAN(VQGANConfig(**TINY_CFG))  # a resumed run: buffers from the checkpoint, network from the cache
    fresh.load_state_dict(model.state_dict())
    assert torch.isfinite(fresh.loss(x)["perceptual"])
    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path))  # the cache is gone
    lost = VQGAN(VQGANConfig(**TINY_CFG))
    lost.load_state_dict(model.state_dict())
    with pytest.raises(GenbenchError, match="not in its cache"):
        lost.loss(x)
    monkeypatch.setenv("GENBENCH_CACHE", str(env))
    lost.perceptual_weights_sha256[0] ^= 1  # recorded hash differs from the cached network's
    with pytest.raises(GenbenchError, match="this run was trained with"):
        lost.loss(x)


def test_plug_in_perceptual_weights(data, env, tmp_path):
    path = tmp_path / "lpips.safetensors"
    save_perceptual_weights(get_perceptual_network(data.train), path)
    model = VQGAN(VQGANConfig(**TINY_CFG, perceptual_weights_path=str(path)))
    model.prepare_stage("autoencoder", data.train)
    assert model.perceptual_network().source == "file"
    assert "user weights" in model.perceptual_description()
    path.write_bytes(b"not safetensors at all")
    bad = VQGAN(VQGANConfig(**TINY_CFG, perceptual_weights_path=str(path)))
    with pytest.raises(GenbenchError, match="not a safetensors file"):
        bad.prepare_stage("autoencoder", data.train)


def test_perceptual_weight_zero_needs_no_network(data):
    model = VQGAN(VQGANConfig(**TINY_CFG, perceptual_weight=0.0))
    out = model.loss(data.train[:8])
    assert out["perceptual"].item() == 0 and "none" in model.perceptual_description()


# ----------------------------------------------------------------------------- configs and presets


def test_presets_resolve_and_standard_matches_vqvae_grid():
    for preset, name, shape in (("quick", "digits", (1, 8, 8)), ("standard", "fashion-mnist", (1, 28, 28)),
                                ("quick", "emoji", (3, 32, 32))):
        gan, gan_train = resolve_configs("vqgan", name, shape, preset)
        vq, _ = resolve_configs("vqvae", name, shape, preset)
        for field in ("codebook_size", "code_dim", "downsample", "width", "prior_layers", "prior_embd"):
            assert getattr(gan, field) == getattr(vq, field), (preset, field)
        assert gan.grid_size == vq.grid_size and gan.disc_start < gan_train.for_stage("autoencoder").steps
    assert resolve_configs("vqgan", "fashion-mnist", (1, 28, 28), "standard")[0].grid_size == 7
    # per dataset, the VQ-GAN's entries are the VQ-VAE's, plus when its discriminator starts
    assert set(DATASET_PRESETS["vqgan"]) == set(DATASET_PRESETS["vqvae"])
    for key, vq_over in DATASET_PRESETS["vqvae"].items():
        gan_over = DATASET_PRESETS["vqgan"][key]
        assert {k: v for k, v in gan_over["model"].items() if not k.startswith("disc_")} == vq_over["model"], key
        assert gan_over.get("train") == vq_over.get("train"), key


@pytest.mark.parametrize("field,value,match", [
    ("disc_start", -1, "vqgan config: disc_start must be >= 0"),
    ("disc_layers", 0, "vqgan config: disc_layers must be >= 1"),
    ("perceptual_weight", -0.5, "vqgan config: perceptual_weight must be >= 0"),
    ("width", 0, "vqgan config: width must be >= 1"),
])
def test_config_validation(field, value, match):
    with pytest.raises(GenbenchError, match=match):
        VQGANConfig(**{field: value}).validate()
    with pytest.raises(GenbenchError, match="unknown stage"):
        VQGAN(VQGANConfig(**TINY_CFG)).loss(torch.rand(2, 1, 8, 8), stage="main")
