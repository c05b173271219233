"""The command line end to end on tiny configs, and its failure paths (one line, exit code 2)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from genbench.cli import main

TINY = ["--set", "arch=mlp", "--set", "latent_dim=4", "--set", "width=32", "--set", "train.steps=20",
        "--set", "train.batch_size=64", "--limit", "200", "--no-progress"]


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "vae"
    assert main(["train", "vae", "--dataset", "digits", "--out", str(out), *TINY]) == 0
    return out


def test_train_writes_run_folder(vae_run):
    info = json.loads((vae_run / "run.json").read_text())
    assert info["status"] == "complete" and info["model_config"]["latent_dim"] == 4
    assert info["summary"]["parameters"] > 0 and info["summary"]["wall_time_s"] > 0
    for name in ("samples.png", "reconstructions.png", "log.jsonl", "model/config.json", "model/model.safetensors"):
        assert (vae_run / name).exists(), name


def test_sample_png_and_npz(vae_run, tmp_path):
    assert main(["sample", str(vae_run), "-n", "10", "--out", str(tmp_path / "s.npz")]) == 0
    images = np.load(tmp_path / "s.npz")["images"]
    assert images.shape == (10, 1, 8, 8) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 1
    assert main(["sample", str(vae_run), "-n", "9", "--out", str(tmp_path / "s.png")]) == 0
    assert Image.open(tmp_path / "s.png").size[0] > 24
    # the same seed gives the same samples
    assert main(["sample", str(vae_run), "-n", "10", "--out", str(tmp_path / "t.npz")]) == 0
    assert np.array_equal(np.load(tmp_path / "t.npz")["images"], images)


def test_evaluate_json(vae_run, tmp_path, capsys):
    assert main(["evaluate", str(vae_run), "--limit", "20", "--out", str(tmp_path / "e.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((tmp_path / "e.json").read_text())
    assert printed == saved
    assert saved["bits_per_dim"] > 0 and "IWAE" in saved["bpd_estimator"]
    assert saved["test_iwae100_nats"] >= saved["test_elbo_nats"]


def test_reconstruct_writes_the_grid_and_the_true_mse(vae_run, tmp_path, capsys):
    """The printed MSE equals one computed here from the exported model and the test images; the
    grid holds the 8 test images beside their 8 reconstructions."""
    import re

    import torch

    from genbench.data import load_dataset
    from genbench.models import GenerativeModel

    assert main(["reconstruct", str(vae_run), "-n", "8", "--out", str(tmp_path / "r.png")]) == 0
    printed = float(re.search(r"reconstruction MSE ([0-9.]+) on 8 test images", capsys.readouterr().out).group(1))
    x = load_dataset("digits", limit=200).test[:8]
    with torch.no_grad():
        mse = torch.mean((GenerativeModel.from_pretrained(vae_run).reconstruct(x) - x) ** 2).item()
    assert printed == pytest.approx(mse, abs=5e-6)  # printed with 5 decimals
    grid = np.asarray(Image.open(tmp_path / "r.png"))
    assert grid.shape == (2 * 33 + 1, 8 * 33 + 1)  # 16 tiles of 8x8 upscaled x4, 8 per row, 1-pixel gaps
    first = (x[0, 0].numpy() * 255 + 0.5).astype(np.uint8).repeat(4, 0).repeat(4, 1)
    assert np.array_equal(grid[1:33, 1:33], first)  # the first tile is the first test image


@pytest.mark.parametrize("argv, match", [
    (["train", "gan9000", "--dataset", "digits"], "unknown model 'gan9000'"),
    (["train", "vae", "--dataset", "cifar"], "unknown dataset"),
    (["train", "vae", "--dataset", "digits", "--set", "latent_dim=-1"], "latent_dim must be >= 1"),
    (["train", "vae", "--dataset", "digits", "--set", "nope=1"], "unknown key 'nope'"),
    (["train", "vae", "--dataset", "digits", "--preset", "huge"], "unknown preset 'huge'"),
    (["train", "vae", "--dataset", "fashion-mnist", "--data-dir", "/nonexistent"], "fashion-mnist"),
    (["sample", "/nonexistent/run", "--out", "x.png"], "run folder not found"),
    (["train", "vae", "--dataset", "digits", "--fd-every", "-1"], "fd_every must be >= 0"),
    (["train", "vae", "--dataset", "digits", "--fd-samples", "1"], "--fd-samples must be >= 2"),
    (["compare", "--dataset", "digits", "--budget", "lots"], "--budget 'lots': expected training FLOPs"),
    (["compare", "--dataset", "digits", "--budget", "0"], "must be a positive, finite number"),
    (["compare", "--dataset", "digits", "--fd-points", "-1"], "fd_points must be >= 0"),
    (["compare", "--dataset", "digits", "--models", "ae", "--budget", "1e30"], "at most 10,000,000 per stage"),
])
def test_errors_are_one_line_exit_2(argv, match, tmp_path, capsys):
    argv = [*argv, "--out", str(tmp_path / "o")] if argv[0] in ("train", "compare") else argv
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("genbench: error:") and len(err.splitlines()) == 1
    assert match in err


@pytest.fixture(scope="module")
def unfinished_run(tmp_path_factory):
    from genbench.data import DatasetSpec, load_dataset
    from genbench.training.loop import Interrupted
    from genbench.training.run import train_run

    out = tmp_path_factory.mktemp("cli") / "cut"
    sets = ["arch=mlp", "latent_dim=4", "width=32", "train.steps=20", "train.batch_size=64", "train.ckpt_every=5"]
    with pytest.raises(Interrupted):
        train_run("vae", load_dataset("digits", limit=200), out, sets=sets, progress=False, interrupt_at=5,
                  dataset_spec=DatasetSpec("digits", limit=200))
    return out


@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "ddpm"
    sets = ["unet.base_channels=8", "unet.num_heads=1", "diffusion.num_timesteps=20", "sampler.steps=2",
            "bpd_timesteps=2", "bpd_images=8", "train.steps=2", "train.batch_size=16"]
    assert main(["train", "ddpm", "--dataset", "digits", "--limit", "64", "--out", str(out), "--no-progress",
                 "--no-images", *[a for s in sets for a in ("--set", s)]]) == 0
    return out


def _one_line_error(capsys, match):
    err = capsys.readouterr().err.strip()
    assert err.startswith("genbench: error:") and len(err.splitlines()) == 1, err
    assert match in err, err


@pytest.mark.parametrize("argv", [["sample", "{run}", "--out", "{tmp}/s.png"], ["evaluate", "{run}"],
                                  ["reconstruct", "{run}"]])
def test_an_unfinished_run_is_refused_with_how_to_finish_it(unfinished_run, tmp_path, capsys, argv):
    assert main([a.format(run=unfinished_run, tmp=tmp_path) for a in argv]) == 2
    _one_line_error(capsys, "training has not finished; continue it with `genbench train ... --resume`")
    assert not (unfinished_run / "eval.json").exists() and not (tmp_path / "s.png").exists()


def test_reconstruct_on_a_model_without_reconstruction(ddpm_run, tmp_path, capsys):
    assert main(["reconstruct", str(ddpm_run), "--out", str(tmp_path / "r.png")]) == 2
    _one_line_error(capsys, "ddpm has no reconstruction (it does not encode images)")
    assert not (tmp_path / "r.png").exists()


def test_evaluate_on_a_model_without_reconstruction_reports_its_bound(ddpm_run, tmp_path, capsys):
    assert main(["evaluate", str(ddpm_run), "--out", str(tmp_path / "e.json")]) == 0
    saved = json.loads((tmp_path / "e.json").read_text())
    assert "reconstruction_mse" not in saved and saved["bits_per_dim"] > 0 and "variational bound" in saved["bpd_estimator"]


@pytest.mark.parametrize("n", ["0", "-3"])
def test_sample_count_must_be_positive(vae_run, tmp_path, capsys, n):
    assert main(["sample", str(vae_run), "-n", n, "--out", str(tmp_path / "s.png")]) == 2
    _one_line_error(capsys, f"-n must be >= 1, got {n}")


@pytest.mark.parametrize("value", ["two", "0", "-1", "1.5"])
def test_a_bad_thread_count_variable_is_one_error(monkeypatch, capsys, value):
    monkeypatch.setenv("GENBENCH_THREADS", value)
    assert main(["models"]) == 2
    _one_line_error(capsys, f"GENBENCH_THREADS={value!r}: expected a positive integer")


def test_ctrl_c_exits_130_with_a_hint(monkeypatch, capsys):
    import genbench.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_models", interrupted)
    assert main(["models"]) == 130
    assert "interrupted; continue with --resume" in capsys.readouterr().err


@pytest.mark.parametrize("extra, match", [
    (["--models", "ae,vae,ae"], "a model is listed twice"),
    (["--models", "ae", "--num-samples", "1"], "num_samples must be >= 2, got 1"),
    (["--models", "ae", "--set", "latent_dim=4"], "--set 'latent_dim=4': expected MODEL:KEY=VALUE"),
    (["--models", "ae", "--set", "ae:nope=1"], "unknown key 'nope'"),
])
def test_compare_request_errors_before_any_work(tmp_path, capsys, extra, match, monkeypatch):
    import genbench.evaluation.compare as compare

    monkeypatch.setattr(compare, "get_feature_network", lambda ds: pytest.fail("work started before the error"))
    assert main(["compare", "--dataset", "digits", "--out", str(tmp_path / "o"), "--no-progress", *extra]) == 2
    _one_line_error(capsys, match)
    assert not (tmp_path / "o").exists()


def test_sample_bad_suffix(vae_run, capsys):
    assert main(["sample", str(vae_run), "--out", "samples.jpg"]) == 2
    assert ".png" in capsys.readouterr().err


def test_console_script_help_and_models(capsys):
    import shutil
    from pathlib import Path

    script = shutil.which("genbench", path=str(Path(sys.executable).parent))  # the installed console script
    assert script is not None
    for cmd in ([script, "models"], [sys.executable, "-m", "genbench", "models"]):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        assert [line.split()[0] for line in out.splitlines()] == ["ae", "vae", "vqvae", "vqgan", "ddpm", "ldm"]
        assert all(len(line.split(maxsplit=1)) == 2 for line in out.splitlines())  # each with its description
    for cmd in ("train", "sample", "reconstruct", "evaluate", "compare"):
        with pytest.raises(SystemExit) as exit_info:
            main([cmd, "--help"])
        assert exit_info.value.code == 0 and "usage" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# hostile input that used to give a traceback and exit 1


@pytest.fixture
def damaged(vae_run, tmp_path):
    import shutil

    return shutil.copytree(vae_run, tmp_path / "run")


def _edit_json(path, fn):
    data = json.loads(path.read_text())
    path.write_text(json.dumps(fn(data)))


@pytest.mark.parametrize("file, edit, cmd, match", [
    ("run.json", lambda d: [], "sample", "run.json: expected a JSON object, got list"),
    ("run.json", lambda d: {**d, "dataset": "digits"}, "evaluate", "expected a mapping with a dataset name"),
    ("run.json", lambda d: {**d, "dataset": {"name": "digits", "limit": 10, "colour": True}}, "reconstruct",
     "unknown field(s) ['colour']"),
    ("model/config.json", lambda d: {**d, "weights": [1]}, "sample", "field 'weights' must be dict"),
    ("model/config.json", lambda d: [], "sample", "not a genbench model config"),
])
def test_damaged_run_records_are_one_line(damaged, tmp_path, capsys, file, edit, cmd, match):
    _edit_json(damaged / file, edit)
    argv = [cmd, str(damaged), "--out", str(tmp_path / ("o.png" if cmd != "evaluate" else "o.json"))]
    assert main(argv) == 2
    _one_line_error(capsys, match)


@pytest.mark.parametrize("argv, match", [
    (["sample", "{run}", "--out", "{tmp}/s.png", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["sample", "{run}", "--out", "{tmp}/s.png", "--batch-size", "-1"], "--batch-size must be >= 1, got -1"),
    (["sample", "{run}", "--out", "{tmp}/s.png", "--seed", "100000000000000000000"], "--seed 100000000000000000000"),
    (["sample", "{run}", "--out", "{tmp}/s.png", "--seed", "-1"], "--seed -1"),
    (["evaluate", "{run}", "--seed", "100000000000000000000"], "--seed 100000000000000000000"),
    (["sample", "{run}", "--out", "{tmp}/s.png", "--device", "foo"], "device 'foo': expected auto, cpu, cuda"),
    (["sample", "{run}", "--out", "{tmp}/s.png", "--device", "cuda:7"], "device 'cuda:7'"),
    (["sample", "{run}", "--out", "/nonexistent/dir/n.png"], "the folder /nonexistent/dir does not exist"),
    (["sample", "{run}", "--out", "{tmp}"], "is a folder; name a file"),
    (["reconstruct", "{run}", "--out", "{tmp}"], "is a folder; name a file"),
    (["evaluate", "{run}", "--out", "/nonexistent/e.json"], "the folder /nonexistent does not exist"),
    (["train", "vae", "--dataset", "digits", "--out", "{tmp}/t", "--seed", "-5"], "--seed -5"),
    (["compare", "--dataset", "digits", "--models", "ae", "--out", "{tmp}/c", "--seed", "100000000000000000000"],
     "seed 100000000000000000000"),
    (["compare", "--dataset", "digits", "--models", "ae", "--out", "{tmp}/c", "--device", "tpu"], "device 'tpu'"),
])
def test_bad_arguments_are_one_line_before_any_work(vae_run, tmp_path, capsys, argv, match):
    assert main([a.format(run=vae_run, tmp=tmp_path) for a in argv]) == 2
    _one_line_error(capsys, match)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_read_only_output_folder_is_one_line(vae_run, tmp_path, capsys, monkeypatch):
    """As root, permission bits do not stop writes, so the folder is read-only the way a read-only
    mount is: os.access says so (the check) and the write itself fails (the safety net)."""
    import genbench.files as files

    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(files.os, "access", lambda p, mode: False if str(p) == str(ro) else real_access(p, mode))
    assert main(["sample", str(vae_run), "--out", str(ro / "s.png")]) == 2
    _one_line_error(capsys, f"the folder {ro} is not writable")

    def refuse(path, data):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(files.os, "access", real_access)
    monkeypatch.setattr("genbench.images.atomic_write_bytes", refuse)
    assert main(["sample", str(vae_run), "--out", str(ro / "s.png")]) == 2
    _one_line_error(capsys, "s.png: cannot write (Read-only file system)")


# ---------------------------------------------------------------------------------------------
# choosing the sampler of a diffusion model when sampling


def test_sample_with_another_sampler(ddpm_run, tmp_path, capsys):
    argv = ["sample", str(ddpm_run), "-n", "6", "--out", str(tmp_path / "s.npz")]
    assert main([*argv, "--sampler", "dpm++2m", "--steps", "3"]) == 0
    assert "with DPM-Solver++(2M)" in capsys.readouterr().out
    a = np.load(tmp_path / "s.npz")["images"]
    assert main([*argv, "--sampler", "ddim", "--steps", "3"]) == 0
    b = np.load(tmp_path / "s.npz")["images"]
    assert a.shape == b.shape == (6, 1, 8, 8) and not np.array_equal(a, b)  # the sampler was really changed
    assert main([*argv]) == 0 and "DPM-Solver++(2M), 2 steps" in capsys.readouterr().out  # the run's own


@pytest.mark.parametrize("extra, match", [
    (["--sampler", "euler"], "sampler: name must be one of"),
    (["--sampler", "dpm++2m", "--eta", "1"], "eta applies to DDIM only"),
    (["--steps", "500"], r"sampler: steps \(500\) must be <= diffusion.num_timesteps \(20\)"),
    (["--spacing", "leading"], "spacing"),  # a DDIM grid, not one of DPM-Solver++'s
])
def test_bad_sampler_choices_are_one_line(ddpm_run, tmp_path, capsys, extra, match):
    assert main(["sample", str(ddpm_run), "-n", "2", "--out", str(tmp_path / "s.png"), *extra]) == 2
    _one_line_error(capsys, "")
    assert not (tmp_path / "s.png").exists()


def test_a_model_without_a_sampler_says_so(vae_run, tmp_path, capsys):
    assert main(["sample", str(vae_run), "-n", "2", "--out", str(tmp_path / "s.png"), "--steps", "10"]) == 2
    _one_line_error(capsys, "vae has no sampler to choose")


def test_train_with_fd_every_logs_fd_against_compute(tmp_path):
    out = tmp_path / "r"
    assert main(["train", "ae", "--dataset", "digits", "--limit", "128", "--out", str(out), "--no-progress",
                 "--no-images", "--set", "arch=mlp", "--set", "train.steps=6", "--set", "train.batch_size=16",
                 "--fd-every", "3", "--fd-samples", "40"]) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    probes = [r for r in records if "fd" in r]
    assert [r["step"] for r in probes] == [3, 6] and all(r["fd_samples"] == 40 and r["fd"] > 0 for r in probes)
    assert probes[1]["train_flops"] == 2 * probes[0]["train_flops"] > 0
