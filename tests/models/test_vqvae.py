"""VQ-VAE end to end through the shared trainer: two stages, exact resume, encode/decode/sample, evaluate."""

import json
import math

import numpy as np
import pytest
import torch

from genbench.files import read_tensors
from genbench.models import GenerativeModel
from genbench.errors import GenbenchError
from genbench.core.gaussian import discretized_gaussian_log_likelihood
from genbench.models.vqvae import VQVAE, VQVAEConfig, golden_section_max
from genbench.training.loop import Interrupted
from genbench.training.run import train_run

STAGES = json.dumps({"autoencoder": {"steps": 8}, "prior": {"steps": 8}})
TINY = [
    "width=16", "n_res_blocks=1", "codebook_size=16", "code_dim=8", "dead_code_steps=3", "init_images=128",
    "prior_layers=1", "prior_heads=2", "prior_embd=32", "prior_dropout=0.1", "fit_images=200",
    "train.batch_size=32", "train.ckpt_every=4", "train.log_every=2", f"train.stages={STAGES}",
]
TINY_CFG = dict(width=16, n_res_blocks=1, codebook_size=16, code_dim=8, init_images=128,
                prior_layers=1, prior_heads=2, prior_embd=32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from genbench.data import load_dataset

    data = load_dataset("digits", limit=256)
    torch.manual_seed(0)
    run = train_run("vqvae", data, tmp_path_factory.mktemp("vq") / "full", sets=TINY, progress=False)
    return run, data


def test_shapes_and_ranges_of_encode_decode_sample(trained):
    run, data = trained
    model = GenerativeModel.from_pretrained(run / "model")
    x = data.test[:5]
    idx = model.encode(x)
    assert idx.shape == (5, 4, 4) and idx.dtype == torch.long and 0 <= idx.min() and idx.max() < 16
    for images in (model.decode_indices(idx), model.reconstruct(x)):
        assert images.shape == (5, 1, 8, 8) and 0 <= images.min() and images.max() <= 1
    # the decoder applied to the codebook rows the indices select, laid out channel-first, clamped to [0, 1]
    with torch.no_grad():
        raw = model.decoder(model.quantizer.codebook[idx].permute(0, 3, 1, 2))
    assert ((raw < 0) | (raw > 1)).any()  # the clamp has work to do
    assert torch.equal(model.decode(idx), raw.clamp(0, 1)) and torch.equal(model.decode_indices(idx), raw.clamp(0, 1))
    a = model.sample(6, generator=torch.Generator().manual_seed(3))
    b = model.sample(6, generator=torch.Generator().manual_seed(3))
    assert a.shape == (6, 1, 8, 8) and 0 <= a.min() and a.max() <= 1 and torch.equal(a, b)


def test_both_stages_logged_with_codebook_health(trained):
    run, _ = trained
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == ["autoencoder"] * 4 + ["prior"] * 4
    for r in records:
        assert 1 <= r["perplexity"] <= 16 and 0 < r["usage"] <= 1 and math.isfinite(r["loss"])
    assert all("window_usage" in r and "rec_mse" in r for r in records[:4])
    assert all("prior_nll_per_token" in r for r in records[4:])


def test_evaluate_keys_finite_and_bound_adds_up(trained):
    run, data = trained
    model = GenerativeModel.from_pretrained(run / "model")
    ev = model.evaluate(data.test)
    json.dumps(ev)  # JSON-able
    numbers = {k: v for k, v in ev.items() if isinstance(v, float)}
    assert {"recon_mse", "codebook_usage", "codebook_perplexity", "prior_nll_nats", "prior_nll_nats_per_token",
            "decoder_nll_nats", "bits_per_dim", "prior_bits_per_dim"} <= numbers.keys()
    assert all(math.isfinite(v) for v in numbers.values())
    assert "upper bound" in ev["bpd_assumptions"] and "discretized Gaussian" in ev["bpd_assumptions"]
    # independent recomputation of the bound on the test set
    with torch.no_grad():
        idx = model.encode(data.test)
        prior = model.prior.nll(idx.flatten(1)).double()
        dec = -discretized_gaussian_log_likelihood(data.test, model.decode_indices(idx), model.decoder_log_scale)
        mse = float((model.reconstruct(data.test) - data.test).pow(2).mean())
    bpd = (prior + dec.double()).mean().item() / (64 * math.log(2))
    assert ev["bits_per_dim"] == pytest.approx(bpd, rel=1e-5)
    assert ev["prior_nll_nats_per_token"] == pytest.approx(prior.mean().item() / 16, rel=1e-5)
    assert ev["recon_mse"] == pytest.approx(mse, rel=1e-5)


def test_fitted_decoder_std_maximises_training_likelihood(trained):
    run, data = trained
    model = GenerativeModel.from_pretrained(run / "model")
    x = data.train[:200]
    with torch.no_grad():
        mean = model.reconstruct(x)
    s = float(model.decoder_log_scale)

    def ll(log_scale):
        return float(discretized_gaussian_log_likelihood(x, mean, log_scale).sum())

    assert ll(s) >= max(ll(s - 0.05), ll(s + 0.05))


@pytest.mark.parametrize("cut", [4, 12])  # inside the autoencoder stage; inside the prior stage (8 + 4)
def test_resumed_run_equals_uninterrupted(trained, tmp_path, cut):
    run, data = trained
    with pytest.raises(Interrupted):
        train_run("vqvae", data, tmp_path / "cut", sets=TINY, progress=False, interrupt_at=cut)
    train_run("vqvae", data, tmp_path / "cut", resume=True, progress=False)
    a = read_tensors(run / "model" / "model.safetensors")
    b = read_tensors(tmp_path / "cut" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert logged_values(run) == logged_values(tmp_path / "cut")


def logged_values(run):
    """Every logged record except the throughput, which depends on the machine's load."""
    lines = (run / "log.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "images_per_s"} for line in lines]


def test_prior_stage_trains_prior_only_and_leaves_quantizer_state_alone(tiny_digits):
    model = VQVAE(VQVAEConfig(**TINY_CFG)).train()
    model.prepare_stage("autoencoder", tiny_digits.train)
    before = {k: v.clone() for k, v in model.quantizer.state_dict().items()}
    out = model.loss(tiny_digits.train[:32], stage="prior")
    out["loss"].backward()
    assert all(p.grad is None for p in list(model.encoder.parameters()) + list(model.decoder.parameters()))
    assert all(p.grad is not None for p in model.prior.parameters())
    for k, v in model.quantizer.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert out["loss"].item() == pytest.approx(math.log(16), abs=0.2)  # untrained prior: ~uniform over 16 codes


def test_optimizer_groups_per_stage():
    model = VQVAE(VQVAEConfig(**TINY_CFG))
    prior = {id(p) for p in model.prior.parameters()}
    ae = {id(p) for p in model.optimizer_groups("autoencoder")["main"]}
    assert {id(p) for p in model.optimizer_groups("prior")["main"]} == prior
    assert not ae & prior and len(ae) == len(list(model.encoder.parameters())) + len(list(model.decoder.parameters()))
    grad_model = VQVAE(VQVAEConfig(**TINY_CFG, codebook_update="gradient"))
    assert any(p is grad_model.quantizer.codebook for p in grad_model.optimizer_groups("autoencoder")["main"])


def test_prepare_stage_initialises_codebook_from_encoder_outputs(tiny_digits):
    model = VQVAE(VQVAEConfig(**TINY_CFG))
    assert not bool(model.quantizer.initialised)
    model.prepare_stage("autoencoder", tiny_digits.train)
    assert bool(model.quantizer.initialised)
    assert float(model.data_variance) == pytest.approx(float(tiny_digits.train.var()), rel=1e-5)
    with torch.no_grad():
        out = model.quantizer.eval()(model.encoder(tiny_digits.train))
    assert float(out.usage) > 0.9  # k-means++ on encoder outputs: (almost) every code has data


@pytest.mark.parametrize("update", ["ema", "gradient"])
def test_autoencoder_loss_is_scaled_mse_plus_vq_loss(tiny_digits, update):
    """L = mean (x - x_hat)^2 / Var(x) + L_vq, L_vq = beta mean (z_e - e)^2 (+ mean (z_e - e)^2, the codebook
    term, with a gradient-trained codebook): e the nearest codes by brute force (float64 cdist), x_hat the
    decoder on them, Var(x) the (unbiased) variance of the training pixels in numpy. In eval mode the
    forward leaves the codebook as it is."""
    torch.manual_seed(0)
    beta = 0.4
    # a data-free codebook (U(-1/K, 1/K)) away from the encoder outputs: a commitment term of some weight
    model = VQVAE(VQVAEConfig(**TINY_CFG, codebook_update=update, beta=beta, codebook_init="uniform"))
    model.prepare_stage("autoencoder", tiny_digits.train)
    model.eval()
    x = tiny_digits.train[:16]
    out = model.loss(x)
    with torch.no_grad():
        z = model.encoder(x).double()  # (B, D, 4, 4)
        book = model.quantizer.codebook.double()
        rows = z.permute(0, 2, 3, 1).reshape(-1, book.shape[1])
        e = book[torch.cdist(rows, book).argmin(1)].view(16, 4, 4, -1).permute(0, 3, 1, 2)
        x_hat = model.decoder(e.float()).double()
    var = np.var(tiny_digits.train.numpy().astype(np.float64), ddof=1)
    mse = ((x_hat - x.double()) ** 2).mean().item()
    commitment = ((z - e) ** 2).mean().item()
    l_vq = beta * commitment + (commitment if update == "gradient" else 0.0)
    assert mse / var > 0.1 and l_vq > 0.005  # both terms weigh in (far above the tolerance below)
    assert out["loss"].item() == pytest.approx(mse / var + l_vq, rel=1e-5)
    assert out["rec_mse"].item() == pytest.approx(mse, rel=1e-5)
    assert out["commitment"].item() == pytest.approx(commitment, rel=1e-5)
    assert out["codebook_loss"].item() == pytest.approx(commitment if update == "gradient" else 0.0, rel=1e-5)


def test_golden_section_finds_maximum():
    assert golden_section_max(lambda s: -(s - 0.3) ** 2, -1.0, 1.0) == pytest.approx(0.3, abs=1e-5)


def test_greedy_sampling_ignores_generator():
    model = VQVAE(VQVAEConfig(**TINY_CFG, temperature=0.0)).eval()
    a = model.sample(3, generator=torch.Generator().manual_seed(0))
    b = model.sample(3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"downsample": 3}, "downsample must be a power of 2"),
        ({"downsample": 16}, "image_size 8 is not divisible by downsample 16"),
        ({"top_k": 600}, "top_k 600 exceeds codebook_size 512"),
        ({"prior_embd": 30, "prior_heads": 4}, "n_embd .30. must be divisible by n_head .4."),
        ({"ema_decay": 1.5}, "ema_decay must be in"),
    ],
)
def test_bad_config_raises(kw, match):
    with pytest.raises(GenbenchError, match=match):
        VQVAE(VQVAEConfig(**kw))


def test_bad_stage_and_unfitted_evaluate_raise(tiny_digits):
    model = VQVAE(VQVAEConfig(**TINY_CFG))
    with pytest.raises(GenbenchError, match="unknown stage 'main'"):
        model.loss(tiny_digits.train[:4], stage="main")
    with pytest.raises(GenbenchError, match="call finish_training"):
        model.evaluate(tiny_digits.test[:4])
    with pytest.raises(GenbenchError, match=r"indices must be \(B, 4, 4\)"):
        model.decode_indices(torch.zeros(2, 3, 3, dtype=torch.long))
