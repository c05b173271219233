"""The evaluation protocol (evaluation/protocol.py) on CPU for all six models: each trained as a tiny run
on 8x8 digits and evaluated by `EvalContext.evaluate_run`, the path `genbench compare` takes (on a GPU
tests/test_cuda.py runs it too, but only there; test_compare_report.py covers ae and vae end to end).

References: the model contract (base.py: `has_reconstruction` / `has_latent_space` decide which
metrics and pictures a row holds), each run's own record (run.json: the config fixes the network
calls per sample, the training summary the costs), the models themselves (samples drawn again with
the protocol's seed, reconstructions and latent paths computed here through
encode_latents / decode_latents, MSE and PSNR by their formulas), the test set scored as if it
were a model's samples (a perfect model: FD 0, precision = recall = coverage = 1, NN-distance ratio
1), and a loss curve worked by hand for `loss_stability`.
"""

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from genbench.evaluation.features import get_feature_network
from genbench.evaluation.latents import posterior_summary
from genbench.evaluation.protocol import (GRID_SIDE, EvalContext, count_network_calls, latent_interpolation,
                                          loss_stability)
from genbench.evaluation.report import COLUMNS, qualitative_rows
from genbench.images import make_grid
from genbench.models import GenerativeModel, get_model_class
from genbench.training.run import train_run

MODELS = ["ae", "vae", "vqvae", "vqgan", "ddpm", "ldm"]
NUM_SAMPLES, EVAL_LIMIT, SEED = 64, 32, 0


def _stages(**steps) -> str:
    return "train.stages=" + json.dumps(steps)


# Under a second of training each on one CPU thread, but long enough that no model decodes a constant
# image (the VQ autoencoders need ~20 steps at width 16 before their outputs leave 0): the checks
# below compare pictures and latents, which a constant decoder would pass trivially.
_LOG = ["train.batch_size=32", "train.log_every=1", "train.ckpt_every=1000"]
_MLP = ["arch=mlp", "latent_dim=4", "width=32", "train.steps=8", *_LOG]
_VQ = ["width=16", "n_res_blocks=1", "codebook_size=16", "code_dim=8", "dead_code_steps=3", "init_images=64",
       "prior_layers=1", "prior_heads=2", "prior_embd=16", "fit_images=64", *_LOG]
SETS = {
    "ae": _MLP,
    "vae": _MLP + ["iwae_samples=3"],
    "vqvae": _VQ + [_stages(autoencoder={"steps": 30}, prior={"steps": 8})],
    "vqgan": _VQ + ["perceptual_weight=0", "disc_width=8", "disc_layers=2", "disc_start=10",
                    _stages(autoencoder={"steps": 30, "beta1": 0.5, "beta2": 0.9}, prior={"steps": 8})],
    "ddpm": ["unet.base_channels=8", "unet.channel_mult=[1,2]", "unet.num_res_blocks=1", "unet.attention_levels=[]",
             "unet.num_heads=1", "unet.dropout=0.0", "diffusion.num_timesteps=20", "sampler.steps=4",
             "bpd_timesteps=3", "bpd_images=16", "train.steps=8", "train.ema_decay=0", *_LOG],
    "ldm": ['first_stage=vae', 'vae={"arch": "mlp", "latent_dim": 16, "width": 32, "beta": 0.01}',
            'unet={"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [], '
            '"num_heads": 1, "dropout": 0.0}',
            'diffusion={"num_timesteps": 20, "schedule": "linear", "beta_start": 1e-3, "beta_end": 0.5}',
            "sampler.steps=3", "eval_images=32", "scale_images=64", *_LOG,
            _stages(first_stage={"steps": 30}, diffusion={"steps": 8, "ema_decay": 0})],
}

# training steps per stage, as SETS asks for them
STEPS = {"ae": {"main": 8}, "vae": {"main": 8}, "ddpm": {"main": 8}, "vqvae": {"autoencoder": 30, "prior": 8},
         "vqgan": {"autoencoder": 30, "prior": 8}, "ldm": {"first_stage": 30, "diffusion": 8}}

# every key a model row carries: the report's columns and what render_html / qualitative_rows read
ROW_KEYS = {
    "name", "kind", "run_dir", "fd", "kid", "kid_std", "precision", "recall", "density", "coverage",
    "class_entropy", "class_coverage", "class_histogram", "memorization_ratio", "memorization_fraction_closer",
    "network_calls_per_sample", "mse", "psnr", "ssim", "recon_fd", "bits_per_dim", "bpd_estimator", "model_eval",
    "parameters", "train_wall_time_s", "train_images_per_s", "peak_memory_mb", "sample_ms_per_image", "device",
    "curves", "stability", "images_png", "family", "latent_shape", "train_cpu_time_s", "train_flops",
    "quality_curve",
}
# what a row adds by its model's capabilities (base.py): the numbers behind the family's picture
CAPABILITY_KEYS = {"has_sampler": {"sampler", "fd_by_sampler", "trajectory"}, "has_posterior": {"latent_space"},
                   "has_codebook": {"codebook"}}
PICTURES = {"has_posterior": "latent_space", "has_codebook": "codebook", "has_sampler": "trajectory"}
SAMPLE_KEYS = ["fd", "kid", "kid_std", "precision", "recall", "density", "coverage", "class_entropy",
               "class_coverage", "class_histogram", "memorization_ratio", "memorization_fraction_closer"]
RECON_KEYS = ["mse", "psnr", "ssim", "recon_fd"]


@pytest.fixture(scope="module")
def feats(tiny_digits):
    return get_feature_network(tiny_digits)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_digits):
    tmp = tmp_path_factory.mktemp("protocol")
    return {m: train_run(m, tiny_digits, tmp / m, sets=SETS[m], progress=False) for m in MODELS}


@pytest.fixture(scope="module")
def ctx(tiny_digits, feats):
    return EvalContext(tiny_digits, feats, num_samples=NUM_SAMPLES, eval_limit=EVAL_LIMIT, seed=SEED)


@pytest.fixture(scope="module")
def rows(ctx, runs):
    torch.manual_seed(1)  # the rows must not depend on the global RNG (see the determinism test)
    return {m: ctx.evaluate_run(runs[m], device="cpu") for m in MODELS}


def _model(runs, name):
    return GenerativeModel.from_pretrained(runs[name])


def _record(runs, name):
    return json.loads((runs[name] / "run.json").read_text())


def _png(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    return np.asarray(img)


def _grid(images: torch.Tensor) -> np.ndarray:
    return make_grid(images, nrow=8, min_side=GRID_SIDE)[..., 0]  # 1 channel: png_bytes writes it as a grey image


# ---------------------------------------------------------------------------------------------
# the row of each model


@pytest.mark.parametrize("name", MODELS)
def test_row_keys_kinds_and_record(name, rows, runs):
    row, record = rows[name], _record(runs, name)
    cls = get_model_class(name)
    assert set(row) == ROW_KEYS.union(*(keys for cap, keys in CAPABILITY_KEYS.items() if getattr(cls, cap)))
    if cls.has_sampler:  # without a sweep: the one point of the row's own sampler
        assert row["fd_by_sampler"] == [{"sampler": "dpm++2m", "spacing": "logsnr", "steps": row["network_calls_per_sample"]["unet"],
                                         "network_calls": row["network_calls_per_sample"]["unet"], "fd": row["fd"],
                                         "sample_ms_per_image": row["sample_ms_per_image"]}]
        assert row["sampler"].startswith("DPM-Solver++(2M), ")
    assert {key for key, *_ in COLUMNS} <= set(row)  # every column of the report is filled from the row
    assert row["name"] == name and row["kind"] == "model" and row["run_dir"] == str(runs[name])
    assert row["family"] == cls.FAMILY and row["device"] == "cpu"
    # costs come from the run's own record
    summary = record["summary"]
    assert row["parameters"] == summary["parameters"] > 0
    assert row["train_wall_time_s"] == summary["wall_time_s"] > 0
    assert set(row["train_images_per_s"]) == set(cls.stages)
    assert all(v > 0 for v in row["train_images_per_s"].values())
    assert row["sample_ms_per_image"] > 0
    # training curves: one per stage, a point per logged step (log_every=1)
    assert {s: c["step"] for s, c in row["curves"].items()} == {s: list(range(1, n + 1)) for s, n in STEPS[name].items()}
    assert row["stability"] == loss_stability(row["curves"]) and set(row["stability"]) == set(cls.stages)
    assert all(v["finite"] for v in row["stability"].values())
    assert all(isinstance(v, (int, float, str)) or v is None for v in row["model_eval"].values())
    json.dumps({k: v for k, v in row.items() if k != "images_png"})  # metrics.json can hold it


@pytest.mark.parametrize("name", MODELS)
def test_sample_metrics_finite_and_in_range(name, rows, feats):
    row = rows[name]
    for key in ("fd", "kid", "kid_std", "density", "class_entropy", "memorization_ratio"):
        assert isinstance(row[key], float) and math.isfinite(row[key]), key
    assert row["fd"] >= 0 and row["kid_std"] >= 0 and row["density"] >= 0 and row["memorization_ratio"] > 0
    for key in ("precision", "recall", "coverage", "class_entropy", "class_coverage", "memorization_fraction_closer"):
        assert 0 <= row[key] <= 1, key
    hist = row["class_histogram"]
    assert len(hist) == feats.num_classes and sum(hist) == NUM_SAMPLES  # every sample classified once
    # class coverage is the share of classes holding >= 1% of the samples (ratio 0.1 of uniform 1/C)
    assert row["class_coverage"] == pytest.approx(np.mean([c / NUM_SAMPLES >= 0.1 / len(hist) for c in hist]))


@pytest.mark.parametrize("name", MODELS)
def test_reconstruction_metrics_exactly_where_declared(name, rows, runs, ctx):
    row, model = rows[name], _model(runs, name)
    if not model.has_reconstruction:
        assert all(row[k] is None for k in RECON_KEYS)
        return
    with torch.no_grad():
        rec = model.reconstruct(ctx.test).float().clamp(0, 1)
    assert len(ctx.test) == EVAL_LIMIT
    per_image = (rec.double() - ctx.test.double()).pow(2).mean(dim=(1, 2, 3))
    assert row["mse"] == pytest.approx(float(per_image.mean()), rel=1e-5)
    assert row["psnr"] == pytest.approx(float((10 * torch.log10(1 / per_image)).mean()), rel=1e-5)
    assert 0 < row["mse"] < 1 and -1 <= row["ssim"] <= 1 and row["ssim"] < 1
    assert math.isfinite(row["recon_fd"]) and row["recon_fd"] > 0


@pytest.mark.parametrize("name", MODELS)
def test_images_are_the_models_samples_reconstructions_and_interpolations(name, rows, runs, ctx):
    """Each picture is decoded and compared with the images computed here from the exported model."""
    row, model = rows[name], _model(runs, name)
    expected = {"samples", "reconstructions" if model.has_reconstruction else None,
                "interpolations" if model.has_latent_space else None} - {None}
    expected |= {key for cap, key in PICTURES.items() if getattr(model, cap)}
    assert set(row["images_png"]) == expected
    with torch.no_grad():
        samples = model.sample(NUM_SAMPLES, generator=torch.Generator().manual_seed(SEED)).float().clamp(0, 1)
        np.testing.assert_array_equal(_png(row["images_png"]["samples"]), _grid(samples))
        if model.has_reconstruction:
            test = ctx.test[:32]
            rec = model.reconstruct(test).float().clamp(0, 1)
            pairs = torch.stack([test, rec], 1).flatten(0, 1)  # each test image, then its reconstruction
            np.testing.assert_array_equal(_png(row["images_png"]["reconstructions"]), _grid(pairs))
        if model.has_latent_space:
            path = latent_interpolation(model, ctx.test[:8], steps=8)
            assert path.shape == (32, *ctx.test.shape[1:])  # 4 pairs x 8 steps
            np.testing.assert_array_equal(_png(row["images_png"]["interpolations"]), _grid(path))


@pytest.mark.parametrize("name", MODELS)
def test_family_pictures_hold_the_models_own_numbers(name, rows, runs, ctx):
    """The picture of each family decodes, and the numbers behind it are the model's, recomputed here:
    the VAE's posterior means, the VQ models' codes of the test images and their run's quantizer log,
    the diffusion models' sampler grid."""
    row, model = rows[name], _model(runs, name)
    for key in PICTURES.values():
        if key in row["images_png"]:
            assert _png(row["images_png"][key]).shape[1] <= 1000  # fits a laptop page
    with torch.no_grad():
        if model.has_posterior:
            ref = posterior_summary(model, ctx.test)
            assert {k: row["latent_space"][k] for k in ("active_units", "latent_dims", "unit_variances")} == {
                k: ref[k] for k in ("active_units", "latent_dims", "unit_variances")}
            assert row["latent_space"]["latent_dims"] == 4  # SETS: latent_dim=4
        if model.has_codebook:
            book = row["codebook"]
            assert book["counts"] == torch.bincount(model.encode(ctx.test).reshape(-1), minlength=16).tolist()
            log = [json.loads(line) for line in (runs[name] / "log.jsonl").read_text().splitlines()]
            quantizer = [r for r in log if r["stage"] == "autoencoder"]
            assert book["training"]["step"] == list(range(1, 31)) == [r["step"] for r in quantizer]
            assert book["training"]["perplexity"] == [r["perplexity"] for r in quantizer]
            assert book["training"]["unused_codes"] == [round(16 * (1 - r["window_usage"])) for r in quantizer]
        if model.has_sampler:
            seen = []
            model.sample(1, callback=lambda t, x, x0: seen.append(t))
            assert row["trajectory"] == {"t": seen, "space": "latent" if model.has_latent_space else "pixels"}
    shape = {"ae": "4 continuous", "vae": "4 continuous", "vqvae": "4×4 code indices into 16 codes",
             "vqgan": "4×4 code indices into 16 codes", "ddpm": "none: noise of the image's shape 1×8×8",
             "ldm": "1×4×4 continuous"}
    assert row["latent_shape"] == shape[name]


@pytest.mark.parametrize("name", MODELS)
def test_network_calls_follow_the_config(name, rows, runs):
    calls, cfg = rows[name]["network_calls_per_sample"], _record(runs, name)["model_config"]
    if name in ("ae", "vae"):
        assert calls == {"decoder": 1}
    elif name == "ddpm":
        assert cfg["sampler"]["name"] == "dpm++2m" and calls == {"unet": cfg["sampler"]["steps"]} == {"unet": 4}
    elif name == "ldm":
        assert cfg["sampler"]["name"] == "dpm++2m" and calls == {"unet": 3, "first_stage.decoder": 1}
    else:
        grid = cfg["image_size"] // cfg["downsample"]
        assert calls == {"prior": grid * grid, "decoder": 1}
    # the report's family table shows these counts
    family = {q["model"]: q for q in qualitative_rows([rows[name]])}[name]
    assert family["network calls per sample call"] == ", ".join(f"{k} ×{v}" for k, v in calls.items())


@pytest.mark.parametrize("name", MODELS)
def test_network_calls_count_every_sequential_network_evaluation(name, rows, runs):
    """count_network_calls' docstring: 1 for a decoder, T for a diffusion sampler, one per token for an
    autoregressive prior. Totals per sample call, as the config implies them."""
    cfg = _record(runs, name)["model_config"]
    total = sum(rows[name]["network_calls_per_sample"].values())
    if name in ("ae", "vae"):
        assert total == 1
    elif name == "ddpm":
        assert total == cfg["sampler"]["steps"]
    elif name == "ldm":
        assert total == cfg["sampler"]["steps"] + 1  # the diffusion's U-Net, then the decoder once
    else:
        grid = cfg["image_size"] // cfg["downsample"]
        assert total == grid * grid + 1  # a token per grid cell, then the decoder once


@pytest.mark.parametrize("name", MODELS)
def test_bits_per_dim_undefined_exactly_for_ae_and_ldm(name, rows):
    row = rows[name]
    if name in ("ae", "ldm"):
        assert row["bits_per_dim"] is None and row["bpd_estimator"].startswith(("undefined", "not defined"))
    else:
        # barely trained: a positive, finite bound; no upper limit is implied
        assert isinstance(row["bits_per_dim"], float) and math.isfinite(row["bits_per_dim"]) and row["bits_per_dim"] > 0
        assert row["bpd_estimator"] and "defined" not in row["bpd_estimator"]
    assert row["model_eval"]["bits_per_dim"] == row["bits_per_dim"]


def test_rows_are_deterministic_and_follow_the_seed(rows, runs, tiny_digits, feats):
    """A fresh context, another global RNG state: every model's row again, identical but for the timing.
    Another seed gives other samples (the seed is really used)."""
    again = EvalContext(tiny_digits, feats, num_samples=NUM_SAMPLES, eval_limit=EVAL_LIMIT, seed=SEED)
    torch.manual_seed(12345)
    for m in MODELS:
        row = again.evaluate_run(runs[m], device="cpu")
        for key in ROW_KEYS - {"sample_ms_per_image"}:
            assert row[key] == rows[m][key], (m, key)
    other = EvalContext(tiny_digits, feats, num_samples=NUM_SAMPLES, eval_limit=EVAL_LIMIT, seed=SEED + 1)
    row = other.evaluate_run(runs["vae"], device="cpu")
    assert row["images_png"]["samples"] != rows["vae"]["images_png"]["samples"] and row["fd"] != rows["vae"]["fd"]
    assert row["mse"] == rows["vae"]["mse"]  # reconstructions of the same test images do not depend on the seed


# ---------------------------------------------------------------------------------------------
# reference rows


def test_reference_rows_floor_below_noise_ceiling(ctx, tiny_digits):
    floor = ctx.reference_row("train set (floor)", tiny_digits.train)
    noise = ctx.reference_row("uniform noise (ceiling)", None)
    for r in (floor, noise):
        assert set(r) == {"name", "kind", *SAMPLE_KEYS} and r["kind"] == "reference"
    assert floor["name"] == "train set (floor)"
    assert floor["fd"] < noise["fd"] and floor["kid"] < noise["kid"]
    assert floor["coverage"] > noise["coverage"] and floor["precision"] > noise["precision"]
    assert floor["class_entropy"] > noise["class_entropy"]
    assert ctx.reference_row("again", None) == {**noise, "name": "again"}  # seeded


def test_the_test_set_scores_as_a_perfect_model(tiny_digits, feats):
    """The test images themselves as 'samples' (all of them, permuted): FD 0, every real point covered and
    every sample on the real manifold, and as far from the training set as the test set is (ratio 1)."""
    n = len(tiny_digits.test)
    ctx = EvalContext(tiny_digits, feats, num_samples=n, eval_limit=EVAL_LIMIT, seed=SEED)
    row = ctx.reference_row("test set", tiny_digits.test)
    noise = ctx.reference_row("noise", None)
    assert abs(row["fd"]) < 1e-6 * noise["fd"]
    assert row["precision"] == row["recall"] == row["coverage"] == 1.0
    assert row["memorization_ratio"] == 1.0
    assert row["class_histogram"] == np.bincount(feats.predict(tiny_digits.test), minlength=feats.num_classes).tolist()


# ---------------------------------------------------------------------------------------------
# latent interpolation, network-call counting and loss stability on their own


@pytest.mark.parametrize("name", ["ae", "vae", "vqvae", "vqgan", "ldm"])
def test_latent_interpolation_endpoints_and_midpoint(name, runs, ctx):
    """Rows: pairs (x0, x1), (x2, x3), ...; its ends decode the two images' latents, its middle their mean
    (steps=3: w = 0, 1/2, 1). An odd image out is left out."""
    model = _model(runs, name)
    x = ctx.test[:7]
    with torch.no_grad():
        out = latent_interpolation(model, x, steps=3)
        assert out.shape == (3 * 3, *x.shape[1:])
        out = out.view(3, 3, *x.shape[1:])
        za, zb = model.encode_latents(x[0:6:2]), model.encode_latents(x[1:6:2])
        start = model.decode_latents(za).clamp(0, 1)
        end = model.decode_latents(zb).clamp(0, 1)
        mid = model.decode_latents((za + zb) / 2).clamp(0, 1)
        assert not torch.allclose(start, end)  # the pairs are different images: the path moves
    torch.testing.assert_close(out[:, 0], start, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 2], end, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 1], mid, atol=1e-5, rtol=1e-5)
    if model.has_reconstruction and name != "vae":  # deterministic encoders: the ends are reconstructions
        torch.testing.assert_close(out[:, 0], model.reconstruct(x[0:6:2]).clamp(0, 1), atol=1e-5, rtol=1e-5)


def test_count_network_calls_counts_forward_calls_of_children_and_unhooks():
    class Net(GenerativeModel):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

        def sample(self, n, generator=None):
            x = torch.zeros(n, 2)
            for _ in range(5):
                x = self.a(x)
            return self.b(x)

    net = Net()
    assert count_network_calls(net) == {"a": 5, "b": 1}
    assert count_network_calls(net) == {"a": 5, "b": 1}  # hooks removed: no double counting
    assert not net.a._forward_pre_hooks and not net.b._forward_pre_hooks


def test_loss_stability_by_hand():
    curves = {
        # second half [2, 1, 3, 3]: relative changes -1/2, +2/1, 0/3 -> median |.| 0.5, largest jump +2
        "a": {"step": list(range(7)), "loss": [10.0, 8.0, 4.0, 2.0, 1.0, 3.0, 3.0]},
        # second half [0, 0, 1e-8]: the scale is floored at 1e-8 -> changes 0, 1 -> median 0.5, max 1
        "b": {"step": list(range(6)), "loss": [5.0, 5.0, 5.0, 0.0, 0.0, 1e-8]},
        # a NaN in the first half: reported as not finite; the second half [1, 1, 1] is flat
        "c": {"step": list(range(6)), "loss": [float("nan"), 1.0, 1.0, 1.0, 1.0, 1.0]},
        # second half of 2 points: too short to judge, left out
        "d": {"step": list(range(4)), "loss": [1.0, 2.0, 3.0, 4.0]},
    }
    out = loss_stability(curves)
    assert set(out) == {"a", "b", "c"}
    assert out["a"] == {"median_abs_rel_change": pytest.approx(0.5), "max_rel_jump": pytest.approx(2.0), "finite": True}
    assert out["b"] == {"median_abs_rel_change": pytest.approx(0.5), "max_rel_jump": pytest.approx(1.0), "finite": True}
    assert out["c"] == {"median_abs_rel_change": 0.0, "max_rel_jump": 0.0, "finite": False}
    # a falling curve has no upward jump: the largest relative change is negative
    assert loss_stability({"m": {"step": [0, 1, 2, 3, 4, 5], "loss": [6, 5, 4, 3, 2, 1]}})["m"]["max_rel_jump"] == \
        pytest.approx(-1 / 3)
