"""Training FLOPs (genbench.training.flops) and the equal-compute budget (genbench.training.budget)."""

import json

import pytest
import torch

from genbench.errors import GenbenchError
from genbench.models.ae import AE, AEConfig
from genbench.models.vqgan import VQGAN, VQGANConfig
from genbench.training.budget import plan_budget, training_flops
from genbench.training.flops import StepFlops, count_step_flops, phase_steps
from genbench.training.run import resolve_configs, train_run


def test_an_mlp_step_costs_three_forward_passes_minus_the_input_gradient():
    """Closed form for the MLP AE (six Linear layers, widths 64-w-w-d-w-w-64): forward 2 B sum(in x out);
    backward 2 B in x out for every weight gradient and every input gradient but the first layer's
    (the images need none)."""
    w, d, B = 32, 5, 7
    model = AE(AEConfig(arch="mlp", image_size=8, latent_dim=d, width=w))
    layers = [(64, w), (w, w), (w, d), (d, w), (w, w), (w, 64)]
    forward = sum(2 * B * i * o for i, o in layers)
    expected = 3 * forward - 2 * B * 64 * w
    assert count_step_flops(model, "main", torch.rand(B, 1, 8, 8), step=0) == expected


def test_counting_leaves_the_model_and_the_rng_alone(tiny_digits):
    """Counted on a copy: a VQ-GAN's codebook EMA, its weights and the global RNG are untouched."""
    cfg = VQGANConfig(image_size=8, downsample=2, width=16, n_res_blocks=1, codebook_size=16, code_dim=4,
                      disc_width=8, disc_layers=2, disc_start=3, perceptual_weight=0.0)
    torch.manual_seed(0)
    model = VQGAN(cfg)
    model.prepare_stage("autoencoder", tiny_digits.train)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    count_step_flops(model, "autoencoder", tiny_digits.train[:16], step=5)
    assert torch.equal(torch.rand(3), expected_next)
    assert all(torch.allclose(before[k], v, rtol=0, atol=0, equal_nan=True)  # perceptual_accuracy: NaN
               for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_a_gan_step_costs_more_once_the_discriminator_runs(tiny_digits):
    cfg = VQGANConfig(image_size=8, downsample=2, width=16, n_res_blocks=1, codebook_size=16, code_dim=4,
                      disc_width=8, disc_layers=2, disc_start=3, perceptual_weight=0.0)
    model = VQGAN(cfg)
    batch = tiny_digits.train[:16]
    before, after = (count_step_flops(model, "autoencoder", batch, s) for s in (2, 3))
    assert after > before
    counter = StepFlops(model)
    assert [counter("autoencoder", s, batch) for s in range(5)] == [before] * 3 + [after] * 2
    assert set(counter.counted) == {("autoencoder", 0), ("autoencoder", 1)}  # each kind counted once
    assert phase_steps(model, "autoencoder", 5) == {0: (0, 3), 1: (3, 2)}  # (first step, steps) per phase


def test_training_logs_the_flops_it_counts_and_a_resumed_run_agrees(tmp_path, tiny_digits):
    sets = ["arch=mlp", "width=32", "train.steps=12", "train.batch_size=16", "train.log_every=4", "train.ckpt_every=4"]
    whole = train_run("ae", tiny_digits, tmp_path / "whole", sets=sets, progress=False)
    per_step = count_step_flops(AE(resolve_configs("ae", "digits", (1, 8, 8), "quick", sets)[0]), "main",
                                tiny_digits.train[:16], 0)
    info = json.loads((whole / "run.json").read_text())
    assert info["summary"]["train_flops"] == 12 * per_step == info["summary"]["stages"]["main"]["flops"]
    assert info["summary"]["cpu_time_s"] > 0
    logged = [json.loads(line)["train_flops"] for line in (whole / "log.jsonl").read_text().splitlines()]
    assert logged == [4 * per_step, 8 * per_step, 12 * per_step]
    from genbench.training.loop import Interrupted
    with pytest.raises(Interrupted):
        train_run("ae", tiny_digits, tmp_path / "cut", sets=sets, progress=False, interrupt_at=8)
    train_run("ae", tiny_digits, tmp_path / "cut", sets=sets, progress=False, resume=True)
    again = json.loads((tmp_path / "cut" / "run.json").read_text())
    assert again["summary"]["train_flops"] == info["summary"]["train_flops"]


def test_fd_every_without_a_probe_is_refused(tmp_path, tiny_digits):
    with pytest.raises(GenbenchError, match="fd_every > 0 needs a quality probe"):
        train_run("ae", tiny_digits, tmp_path / "r", sets=["arch=mlp", "train.steps=4", "train.fd_every=2"],
                  progress=False)


def test_the_probe_scores_the_ema_weights_and_leaves_training_unchanged(tmp_path, tiny_digits):
    """Probing (every 3 steps) must not change a single trained weight, and the probe sees the model as
    it would be exported: the AE's finish_training has fitted its latent Gaussian."""
    seen = []

    def probe(model):
        seen.append((model.training, float(model.latent_scale_tril.diagonal().prod())))
        return {"fd": 1.0 + len(seen)}

    sets = ["arch=mlp", "width=32", "train.steps=9", "train.batch_size=16", "train.ema_decay=0.5"]
    plain = train_run("ae", tiny_digits, tmp_path / "plain", sets=sets, progress=False)
    probed = train_run("ae", tiny_digits, tmp_path / "probed", sets=sets + ["train.fd_every=3"], progress=False,
                       probe=probe)
    a = (plain / "model" / "model.safetensors").read_bytes()
    assert a == (probed / "model" / "model.safetensors").read_bytes()
    assert [t for t, _ in seen] == [False] * 3 and all(d != 1.0 for _, d in seen)  # fitted, not the identity
    records = [json.loads(x) for x in (probed / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "fd" in r] == [3, 6, 9]


def test_a_budget_scales_every_stage_to_the_same_compute(tiny_digits):
    budget = 4e10
    plans = {m: plan_budget(m, "digits", tiny_digits.train, "quick", sets, budget) for m, sets in {
        "ae": ["arch=mlp"],
        "vqgan": ["width=16", "codebook_size=16", "prior_layers=1", "prior_embd=16", "perceptual_weight=0",
                  "disc_width=8"],
    }.items()}
    for m, p in plans.items():
        assert abs(p.flops - budget) / budget < 0.01, (m, p.flops)  # rounding to whole steps only
        assert p.scale == pytest.approx(budget / p.preset_flops)
    vq = plans["vqgan"]
    # the preset: 800 autoencoder steps, disc_start 300 -> both scaled by the same k
    assert vq.steps["autoencoder"] == round(vq.scale * 800) and f"disc_start={round(vq.scale * 300)}" in vq.sets
    again = plan_budget("vqgan", "digits", tiny_digits.train, "quick", vq.sets[:0] + [
        "width=16", "codebook_size=16", "prior_layers=1", "prior_embd=16", "perceptual_weight=0", "disc_width=8"], budget)
    assert again.sets == vq.sets and again.flops == vq.flops  # deterministic
    # priced from the preset's per-step table with the moved disc_start: the same as counting anew
    vq_sets = ["width=16", "codebook_size=16", "prior_layers=1", "prior_embd=16", "perceptual_weight=0",
               "disc_width=8"]
    model_cfg, train_cfg = resolve_configs("vqgan", "digits", (1, 8, 8), "quick", vq_sets + vq.sets)
    assert sum(training_flops("vqgan", model_cfg, train_cfg, tiny_digits.train).values()) == vq.flops


def test_training_flops_count_the_ldm_first_stage(tiny_digits):
    sets = ['vae={"arch": "mlp", "latent_dim": 16, "width": 32, "beta": 0.01}', "train.stages.first_stage.steps=3",
            "train.stages.diffusion.steps=2"]
    model_cfg, train_cfg = resolve_configs("ldm", "digits", (1, 8, 8), "quick", sets)
    flops = training_flops("ldm", model_cfg, train_cfg, tiny_digits.train)
    assert set(flops) == {"first_stage", "diffusion"} and all(v > 0 for v in flops.values())
