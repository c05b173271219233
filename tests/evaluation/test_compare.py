"""The comparison as a library function: `run_comparison` from Python, no argparse, on tiny budgets."""

import json

import pytest

from genbench.data import DatasetSpec
from genbench.errors import GenbenchError
from genbench.evaluation.compare import run_comparison, split_model_sets

SETS = {
    "ae": ["arch=mlp", "train.steps=20"],
    "vqvae": ["train.stages.autoencoder.steps=20", "train.stages.prior.steps=10", "prior_layers=1", "prior_embd=16",
              "prior_heads=2"],
    "ddpm": ["train.steps=5"],  # not compared below: items for other known models are ignored
}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("lib")
    return out, run_comparison(DatasetSpec("digits"), out, models=["ae", "vqvae"], sets=SETS, num_samples=200,
                               eval_limit=64, jobs=1, progress=False)


def test_the_result_is_returned_and_written(result):
    out, res = result
    assert [r["name"] for r in res["rows"]] == ["train set (floor)", "uniform noise (ceiling)", "ae", "vqvae"]
    assert res["dataset"] == {"name": "digits", "data_dir": None, "image_size": None, "limit": None}
    assert res["num_samples"] == 200 and res["eval_test_images"] == 64 and res["preset"] == "quick"
    on_disk = json.loads((out / "metrics.json").read_text())
    assert [r["fd"] for r in on_disk["rows"]] == [r["fd"] for r in res["rows"]]
    assert set(res["reports"]) == {"json", "md", "html"} and all(open(p) for p in res["reports"].values())
    # the request's items, then the FD probes' interval compare adds: about 8 over the last stage
    for m, every in (("ae", 3), ("vqvae", 2)):
        assert json.loads((out / m / "run.json").read_text())["sets"] == SETS[m] + [f"train.fd_every={every}"]


def test_every_model_logs_fd_against_training_compute(result):
    """FD probes in the last stage only (VQ-VAE: its prior), at the steps fd_every gives and the last,
    with training FLOPs counted per step kind (the prior's points include the autoencoder's FLOPs)
    and CPU seconds increasing; the row's totals close the curve."""
    rows = {r["name"]: r for r in result[1]["rows"]}
    ae, vq = rows["ae"]["quality_curve"], rows["vqvae"]["quality_curve"]
    assert ae["global_step"] == [3, 6, 9, 12, 15, 18, 20]
    assert vq["global_step"] == [22, 24, 26, 28, 30]  # prior steps 2..10 after 20 autoencoder steps
    for row, curve in ((rows["ae"], ae), (rows["vqvae"], vq)):
        assert all(f > 0 for f in curve["fd"])
        assert curve["train_flops"] == sorted(curve["train_flops"]) and curve["train_flops"][-1] == row["train_flops"]
        # process CPU time of a multi-threaded process is read with scheduler-tick slack: a few ms
        assert curve["train_cpu_s"] == sorted(curve["train_cpu_s"])
        assert curve["train_cpu_s"][-1] == pytest.approx(row["train_cpu_time_s"], abs=0.05)
    # equal FLOPs per step within a stage: the AE's curve is linear in its steps
    per_step = ae["train_flops"][0] / 3
    assert ae["train_flops"] == [round(per_step * s) for s in ae["global_step"]]
    assert vq["train_flops"][0] > 20 * (vq["train_flops"][1] - vq["train_flops"][0]) / 2  # the autoencoder's share


def test_every_model_with_a_latent_space_shows_interpolations(result):
    """VQ models interpolate in their continuous pre-quantization latents (decoded through the codebook)."""
    rows = {r["name"]: r for r in result[1]["rows"]}
    for m in ("ae", "vqvae"):
        assert {"samples", "reconstructions", "interpolations"} <= set(rows[m]["images_png"]), m
    assert "codebook" in rows["vqvae"]["images_png"] and "codebook" not in rows["ae"]["images_png"]
    assert rows["vqvae"]["family"]["latent"].startswith("discrete code grid")


def test_a_finished_comparison_is_reused(result):
    out, res = result
    again = run_comparison(DatasetSpec("digits"), out, models=["ae", "vqvae"], sets=SETS, num_samples=200,
                           eval_limit=64, jobs=1, progress=False)
    assert [r["fd"] for r in again["rows"]] == [r["fd"] for r in res["rows"]]


def test_another_request_is_refused_or_replaced_by_choice(tmp_path):
    kw = dict(models=["ae"], num_samples=100, eval_limit=32, jobs=1, progress=False)
    first = run_comparison(DatasetSpec("digits"), tmp_path, sets={"ae": ["arch=mlp", "train.steps=10"]}, **kw)
    record = (tmp_path / "ae" / "run.json").read_bytes()
    other = {"ae": ["arch=mlp", "train.steps=10", "latent_dim=8"]}
    for request in ({"sets": other}, {"sets": {"ae": ["arch=mlp", "train.steps=10"]}, "preset": "standard"}):
        with pytest.raises(GenbenchError, match="holds a run of another request .*choose another --out, or pass --replace"):
            run_comparison(DatasetSpec("digits"), tmp_path, **request, **kw)
        assert (tmp_path / "ae" / "run.json").read_bytes() == record  # nothing touched
    with pytest.raises(GenbenchError, match=r"dataset.limit: None here, 300 requested"):
        run_comparison(DatasetSpec("digits", limit=300), tmp_path, sets={"ae": ["arch=mlp", "train.steps=10"]}, **kw)
    replaced = run_comparison(DatasetSpec("digits"), tmp_path, sets=other, replace=True, **kw)
    assert (tmp_path / "ae.replaced-1" / "run.json").read_bytes() == record  # moved aside, not deleted
    assert json.loads((tmp_path / "ae" / "run.json").read_text())["model_config"]["latent_dim"] == 8
    assert replaced["rows"][2]["fd"] != first["rows"][2]["fd"]


@pytest.mark.parametrize("kwargs, match", [
    ({"models": ["ae", "ae"]}, "a model is listed twice"),
    ({"models": ["ae", "gan9000"]}, "unknown model 'gan9000'"),
    ({"sets": {"gan9000": ["x=1"]}}, r"sets: unknown model\(s\) \['gan9000'\]"),
    ({"jobs": 0}, "jobs must be >= 1, got 0"),
    ({"num_samples": 1}, "num_samples must be >= 2, got 1"),
])
def test_bad_requests_fail_before_any_work(tmp_path, kwargs, match):
    with pytest.raises(GenbenchError, match=match):
        run_comparison(DatasetSpec("digits"), tmp_path / "o", **{"models": ["ae"], **kwargs})
    assert not (tmp_path / "o").exists()


def test_split_model_sets():
    assert split_model_sets(["vae:latent_dim=8", "ae:train.lr=1e-3", "vae:beta=0.5"]) == {
        "vae": ["latent_dim=8", "beta=0.5"], "ae": ["train.lr=1e-3"]}
    for bad in ("latent_dim=8", "gan:x=1"):
        with pytest.raises(GenbenchError, match="expected MODEL:KEY=VALUE"):
            split_model_sets([bad])


DDPM = ["train.steps=30", "unet.base_channels=8", "unet.num_heads=1", "diffusion.num_timesteps=50", "bpd_timesteps=5",
        "bpd_images=16"]


def test_diffusion_models_are_measured_against_network_calls_and_samplers_apply_to_finished_runs(tmp_path,
                                                                                               monkeypatch):
    from genbench.core.samplers import SamplerConfig
    from genbench.training import run as run_mod

    kw = dict(models=["ddpm"], num_samples=100, eval_limit=16, jobs=1, progress=False)
    sweep = [SamplerConfig("dpm++2m", 4), SamplerConfig("ddim", 4), SamplerConfig("heun", 5)]
    res = run_comparison(DatasetSpec("digits"), tmp_path, sets={"ddpm": DDPM + ["sampler.name=ddim", "sampler.steps=8"]},
                         sampler_sweep=sweep, **kw)
    row = res["rows"][2]
    points = row["fd_by_sampler"]
    assert [(p["sampler"], p["network_calls"]) for p in points] == [("ddim", 8), ("dpm++2m", 4), ("ddim", 4),
                                                                    ("heun", 5)]
    assert points[0]["fd"] == row["fd"] and row["network_calls_per_sample"] == {"unet": 8}
    assert all(p["fd"] > 0 and p["sample_ms_per_image"] > 0 for p in points)
    assert len({p["fd"] for p in points}) == 4  # each sampler really drew its own samples
    html = (tmp_path / "report.html").read_text()
    table = html[html.index("<table id='samplers'>"):]
    table = table[:table.index("</table>")]
    assert "FD against network calls per sample" in html and table.count("<tr><td>ddpm</td>") == 4
    assert "| ddpm | dpm++2m (logsnr) | 4 |" in (tmp_path / "report.md").read_text()

    # another sampler for the finished run: evaluated with it, not retrained
    monkeypatch.setattr(run_mod, "train", lambda *a, **k: pytest.fail("retrained for a sampler"))
    again = run_comparison(DatasetSpec("digits"), tmp_path, sets={"ddpm": DDPM + ["sampler.name=dpm++2m",
                                                                                 "sampler.steps=4",
                                                                                 "sampler.spacing=default"]},
                           sampler_sweep=[], **kw)
    row2 = again["rows"][2]
    assert row2["sampler"].startswith("DPM-Solver++(2M)") and row2["network_calls_per_sample"] == {"unet": 4}
    assert row2["fd"] == points[1]["fd"]  # the sweep's point for the same sampler, same seed
    assert [p["sampler"] for p in row2["fd_by_sampler"]] == ["dpm++2m"]


def test_a_bad_sampler_sweep_is_refused_before_any_work(tmp_path):
    from genbench.evaluation.compare import parse_sampler_sweep

    assert [(s.name, s.steps) for s in parse_sampler_sweep("dpm++2m:10, ddim:50")] == [("dpm++2m", 10), ("ddim", 50)]
    assert parse_sampler_sweep("") == ()
    for bad, match in (("dpm++2m", "expected SAMPLER:STEPS"), ("euler:5", "name must be one of"),
                       ("ddim:x", "expected SAMPLER:STEPS")):
        with pytest.raises(GenbenchError, match=match):
            parse_sampler_sweep(bad)
