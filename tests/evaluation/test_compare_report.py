"""`genbench compare` end to end on a tiny budget, and the HTML report checked in headless Chromium."""

import json
import re
import shutil
import subprocess

import pytest
import torch

from genbench.cli import main
from genbench.evaluation.report import best_per_column

TINY = ["--set", "ae:arch=mlp", "--set", "ae:train.steps=30", "--set", "vae:arch=mlp", "--set", "vae:train.steps=30",
        "--set", "vae:iwae_samples=5", "--num-samples", "300", "--eval-limit", "100", "--no-progress"]


@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    assert main(["compare", "--dataset", "digits", "--models", "ae,vae", "--out", str(out), "--jobs", "2", *TINY]) == 0
    return out


def test_compare_writes_all_outputs(compare_dir):
    for name in ("report.html", "report.md", "metrics.json", "ae/run.json", "vae/model/model.safetensors"):
        assert (compare_dir / name).exists(), name
    m = json.loads((compare_dir / "metrics.json").read_text())
    names = [r["name"] for r in m["rows"]]
    assert names == ["train set (floor)", "uniform noise (ceiling)", "ae", "vae"]
    rows = {r["name"]: r for r in m["rows"]}
    # the protocol orders the references: real data beats noise on every sample metric
    assert rows["train set (floor)"]["fd"] < rows["uniform noise (ceiling)"]["fd"]
    assert rows["train set (floor)"]["coverage"] > rows["uniform noise (ceiling)"]["coverage"]
    # AE likelihood is undefined, shown as such (null, never 0); the VAE has a bound
    assert rows["ae"]["bits_per_dim"] is None and "undefined" in rows["ae"]["bpd_estimator"]
    assert rows["vae"]["bits_per_dim"] > 0 and "IWAE" in rows["vae"]["bpd_estimator"]
    assert rows["vae"]["sample_ms_per_image"] > 0 and rows["vae"]["parameters"] > 0
    assert rows["vae"]["network_calls_per_sample"] == {"decoder": 1}
    assert rows["vae"]["recon_fd"] > 0 and "recon_fd" not in rows["train set (floor)"]


def test_reconstruction_fd_is_zero_for_perfect_and_grows_with_blur(digits):
    import torch.nn.functional as F

    from genbench.evaluation.protocol import EvalContext
    from genbench.evaluation.features import get_feature_network

    ctx = EvalContext(digits, get_feature_network(digits), num_samples=10, eval_limit=300)
    perfect = ctx.reconstruction_fd(ctx.test.clone())
    blur1 = ctx.reconstruction_fd(F.avg_pool2d(ctx.test, 3, 1, 1))
    blur2 = ctx.reconstruction_fd(F.avg_pool2d(F.avg_pool2d(ctx.test, 3, 1, 1), 3, 1, 1))
    assert abs(perfect) < 1e-3 and 0 < blur1 < blur2


def test_training_in_processes_equals_training_in_process(compare_dir, tmp_path):
    """The fixture trained ae and vae in two `genbench train` processes at once (--jobs 2); the same
    comparison trained here in this process gives bit-identical weights and the same metrics."""
    from genbench.files import read_tensors

    out = tmp_path / "serial"
    assert main(["compare", "--dataset", "digits", "--models", "ae,vae", "--out", str(out), "--jobs", "1", *TINY]) == 0
    for m in ("ae", "vae"):
        assert (compare_dir / m / "train.log").exists() and not (out / m / "train.log").exists()
        a = read_tensors(compare_dir / m / "model" / "model.safetensors")
        b = read_tensors(out / m / "model" / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), m
    fd = [{r["name"]: r["fd"] for r in json.loads((d / "metrics.json").read_text())["rows"]} for d in (compare_dir, out)]
    assert fd[0] == fd[1]


def test_failed_training_process_is_reported_with_its_log(tmp_path, monkeypatch, capsys):
    """A child that dies: the comparison stops with the model, its exit status and its log's end."""
    import sys

    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'CUDA out of memory (simulated)'\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    out = tmp_path / "o"
    assert main(["compare", "--dataset", "digits", "--models", "ae,vae", "--jobs", "2", "--out", str(out),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "training vae failed (exit status 3)" in err or "training ae failed (exit status 3)" in err
    assert "CUDA out of memory (simulated)" in err and "train.log" in err
    assert not (out / "report.html").exists()


def test_compare_rejects_bad_jobs(tmp_path, capsys):
    assert main(["compare", "--dataset", "digits", "--models", "ae", "--jobs", "0", "--out", str(tmp_path / "o")]) == 2
    assert "jobs must be >= 1, got 0" in capsys.readouterr().err


def test_compare_rejects_unknown_model_before_work(tmp_path, capsys):
    assert main(["compare", "--dataset", "digits", "--models", "ae,gan9000", "--out", str(tmp_path / "o")]) == 2
    assert "unknown model 'gan9000'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_best_value_marking():
    rows = [{"name": "ref", "kind": "reference", "fd": 0.1},
            {"name": "a", "kind": "model", "fd": 3.0, "psnr": 20.0},
            {"name": "b", "kind": "model", "fd": 2.0, "psnr": None}]
    best = best_per_column(rows)
    assert best["fd"] == {2}  # the reference row never wins
    assert best["psnr"] == {1}


def test_training_curves_of_six_models_fit_a_laptop_page():
    import io

    from PIL import Image

    from genbench.evaluation.report import curves_png

    rows = [{"name": f"m{i}", "kind": "model", "curves": {"main": {"step": [1, 2, 3], "loss": [3.0, 2.0, 1.0]}}}
            for i in range(6)]
    width, height = Image.open(io.BytesIO(curves_png(rows))).size
    assert width <= 1100 and height > 400  # wrapped into rows, each panel still full size


def test_report_md_table_has_row_per_model(compare_dir):
    md = (compare_dir / "report.md").read_text()
    assert re.search(r"^\| ae \|", md, re.M) and re.search(r"^\| vae \|", md, re.M)


CHECK_JS = """
<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || e.type)), true);
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);
  const rows = [...document.querySelectorAll('#metrics tbody tr.model')].map(r => r.dataset.model);
  const out = document.createElement('pre');
  out.id = 'check';
  const overflow = document.documentElement.scrollWidth - window.innerWidth;
  out.textContent = JSON.stringify({images: imgs.length, bad, rows, errors: window.__errors, overflow});
  document.body.appendChild(out);
});
</script>
"""


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(_chromium() is None, reason="Chromium not installed (make test installs Debian's chromium)")
def test_report_in_headless_chromium(compare_dir, tmp_path):
    html = (compare_dir / "report.html").read_text()
    assert "http://" not in html and "https://" not in html  # self-contained, readable offline
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</head>", CHECK_JS + "</head>", 1))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([_chromium(), *flags, "--window-size=1400,900", "--virtual-time-budget=10000", "--dump-dom",
                          probe.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    m = re.search(r'<pre id="check">(.*?)</pre>', dom, re.S)
    assert m, f"the check script did not run; DOM head: {dom[:300]!r}"
    result = json.loads(m.group(1).replace("&quot;", '"'))
    assert result["errors"] == []
    assert result["bad"] == [] and result["images"] >= 6  # samples/recons/interps x2 + curves + cost
    assert result["rows"] == ["ae", "vae"]
    assert result["overflow"] <= 0  # nothing wider than a laptop's page
    shot = tmp_path / "report.png"
    subprocess.run([_chromium(), *flags, "--window-size=1400,2000", f"--screenshot={shot}",
                    (compare_dir / "report.html").as_uri()], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000


# last: it rewrites the report of the shared folder with one model
def test_compare_reuses_finished_runs_without_training(compare_dir, capsys, monkeypatch):
    from genbench.training import run as run_mod

    def fail(*args, **kwargs):
        raise AssertionError("a finished run of the same request was trained again")

    monkeypatch.setattr(run_mod, "train", fail)
    before = (compare_dir / "vae" / "run.json").read_bytes()
    assert main(["compare", "--dataset", "digits", "--models", "vae", "--out", str(compare_dir), *TINY]) == 0
    assert (compare_dir / "vae" / "run.json").read_bytes() == before
    # another request on the same folder: refused before any work, naming the difference
    changed = [a.replace("vae:train.steps=30", "vae:train.steps=31") for a in TINY]
    assert main(["compare", "--dataset", "digits", "--models", "vae", "--out", str(compare_dir), *changed]) == 2
    err = capsys.readouterr().err
    assert "holds a run of another request (train.steps: 30 here, 31 requested)" in err and "--replace" in err
    assert (compare_dir / "vae" / "run.json").read_bytes() == before
