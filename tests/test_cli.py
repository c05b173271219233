"""The command line end to end on tiny configs, and its failure paths (one line, exit code 2)."""

import json
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


def test_reconstruct(vae_run, tmp_path, capsys):
    assert main(["reconstruct", str(vae_run), "-n", "8", "--out", str(tmp_path / "r.png")]) == 0
    assert "reconstruction MSE" in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["train", "gan9000", "--dataset", "digits"], "unknown model 'gan9000'"),
    (["train", "vae", "--dataset", "cifar"], "unknown dataset"),
    (["train", "vae", "--dataset", "digits", "--set", "latent_dim=-1"], "latent_dim must be >= 1"),
    (["train", "vae", "--dataset", "digits", "--set", "nope=1"], "unknown key 'nope'"),
    (["train", "vae", "--dataset", "digits", "--preset", "huge"], "unknown preset 'huge'"),
    (["train", "vae", "--dataset", "fashion-mnist", "--data-dir", "/nonexistent"], "fashion-mnist"),
    (["sample", "/nonexistent/run", "--out", "x.png"], "run folder not found"),
])
def test_errors_are_one_line_exit_2(argv, match, tmp_path, capsys):
    argv = [*argv, "--out", str(tmp_path / "o")] if argv[0] == "train" else argv
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("genbench: error:") and len(err.splitlines()) == 1
    assert match in err


def test_sample_bad_suffix(vae_run, capsys):
    assert main(["sample", str(vae_run), "--out", "samples.jpg"]) == 2
    assert ".png" in capsys.readouterr().err


def test_console_script_help_and_models(capsys):
    out = subprocess.run([sys.executable, "-m", "genbench", "models"], capture_output=True, text=True, check=True).stdout
    assert "ae " in out and "vae " in out
    for cmd in ("train", "sample", "reconstruct", "evaluate", "compare"):
        with pytest.raises(SystemExit) as exit_info:
            main([cmd, "--help"])
        assert exit_info.value.code == 0 and "usage" in capsys.readouterr().out
