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
    # the pictures of how the family works, with their numbers: the VAE's posterior, not the AE's
    space = rows["vae"]["latent_space"]
    assert 0 <= space["active_units"] <= space["latent_dims"] == len(space["unit_variances"]) == 16
    assert space["active_units"] == sum(v > 0.01 for v in space["unit_variances"]) and "pca" not in space
    assert "latent_space" not in rows["ae"] and "codebook" not in rows["vae"] and "trajectory" not in rows["vae"]
    assert rows["ae"]["latent_shape"] == rows["vae"]["latent_shape"] == "16 continuous"


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


def test_report_md_table_has_row_per_model(compare_dir):
    md = (compare_dir / "report.md").read_text()
    assert re.search(r"^\| ae \|", md, re.M) and re.search(r"^\| vae \|", md, re.M)


# What a reader sees, measured in the page once it has loaded: images that did not decode, the model
# rows of the metrics table, the page's horizontal overflow, every element whose right edge lies past the
# window's content width or that scrolls sideways inside itself, and per model section the figures it
# shows with their drawn and natural widths; the summary's items.
CHECK_JS = """
<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || e.type)), true);
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);
  const rows = [...document.querySelectorAll('#metrics tbody tr.model')].map(r => r.dataset.model);
  const page = document.documentElement.clientWidth;
  const wide = [...document.body.querySelectorAll('*')].filter(e => {
    const r = e.getBoundingClientRect();
    const scrolls = e.scrollWidth > e.clientWidth + 1 && getComputedStyle(e).overflowX !== 'visible';
    return r.width > 0 && (r.right > page + 0.5 || scrolls);
  }).map(e => `${e.tagName}${e.id ? '#' + e.id : ''} ${e.alt || ''} right ${e.getBoundingClientRect().right}`);
  const models = {};
  for (const s of document.querySelectorAll('section.model')) {
    models[s.dataset.model] = Object.fromEntries([...s.querySelectorAll('figure')].map(f => {
      const i = f.querySelector('img');
      return [f.dataset.kind, [i.getBoundingClientRect().width, i.naturalWidth]];
    }));
  }
  const summary = [...document.querySelectorAll('#summary li')].map(li => li.textContent);
  const out = document.createElement('pre');
  out.id = 'check';
  const overflow = document.documentElement.scrollWidth - window.innerWidth;
  out.textContent = JSON.stringify({images: imgs.length, bad, rows, errors: window.__errors, overflow, wide, models,
                                    summary});
  document.body.appendChild(out);
});
</script>
"""
WINDOWS = (1400, 1280)  # px: the width, and a laptop's


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _flags(tmp_path):
    return ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}"]


def _seen_in_chromium(html: str, tmp_path, width: int) -> dict:
    """The CHECK_JS measurements of `html` opened in headless Chromium in a window `width` px wide."""
    assert "http://" not in html and "https://" not in html  # self-contained, readable offline
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</head>", CHECK_JS + "</head>", 1))
    dom = subprocess.run([_chromium(), *_flags(tmp_path), f"--window-size={width},900", "--virtual-time-budget=10000",
                          "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    m = re.search(r'<pre id="check">(.*?)</pre>', dom, re.S)
    assert m, f"the check script did not run; DOM head: {dom[:300]!r}"
    return json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def _check_as_a_reader(seen: dict, models: list[str]) -> None:
    """Nothing wider than the window, every image decoded, every model its samples at the grid's own size
    (tiles of at least GRID_SIDE px: readable, never shrunk), its interpolations where it has a latent
    space, the picture of its family, and a five-point summary."""
    from genbench.evaluation.protocol import GRID_SIDE
    from genbench.models.base import get_model_class

    assert seen["errors"] == [] and seen["bad"] == []
    assert seen["overflow"] <= 0 and seen["wide"] == []
    assert seen["rows"] == models and list(seen["models"]) == models
    for m in models:
        figs, cls = seen["models"][m], get_model_class(m)
        drawn, natural = figs["samples"]
        assert drawn == natural and drawn >= 8 * GRID_SIDE, m
        assert ("interpolations" in figs) == cls.has_latent_space, m
        assert ("reconstructions" in figs) == cls.has_reconstruction, m
        assert ("latent_space" in figs) == cls.has_posterior, m
        assert ("codebook" in figs) == cls.has_codebook, m
        assert ("trajectory" in figs) == cls.has_sampler, m
        assert all(w <= n for w, n in figs.values()), m  # a figure may shrink to fit, never blow up
    assert [item.split(".")[0] for item in seen["summary"]] == [
        "Sample quality", "Likelihood", "Reconstruction", "Sampling cost", "Training cost"]


@pytest.mark.skipif(_chromium() is None, reason="Chromium not installed (make test installs Debian's chromium)")
@pytest.mark.parametrize("width", WINDOWS)
def test_report_in_headless_chromium(compare_dir, tmp_path, width):
    html = (compare_dir / "report.html").read_text()
    seen = _seen_in_chromium(html, tmp_path, width)
    _check_as_a_reader(seen, ["ae", "vae"])
    assert seen["images"] == 3 + 4 + 3  # ae: 3 grids; vae: 3 grids + latent space; FD against compute, curves, cost
    assert "ae and vae" not in seen["summary"][1] and "vae has the lowest bits/dim" in seen["summary"][1]
    shot = tmp_path / "report.png"
    subprocess.run([_chromium(), *_flags(tmp_path), f"--window-size={width},2000", f"--screenshot={shot}",
                    (compare_dir / "report.html").as_uri()], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000


@pytest.mark.skipif(_chromium() is None, reason="Chromium not installed (make test installs Debian's chromium)")
@pytest.mark.parametrize("width", WINDOWS)
def test_six_family_report_in_headless_chromium(tmp_path, width):
    """Every family's figures, drawn by the report's own code from synthetic rows as wide as real
    ones (a cheap stand-in for the whole comparison, which the demo runs)."""
    from genbench.evaluation.report import render_html
    from tests.evaluation.test_report import six_family_result

    seen = _seen_in_chromium(render_html(six_family_result()), tmp_path, width)
    _check_as_a_reader(seen, ["ae", "vae", "vqvae", "vqgan", "ddpm", "ldm"])


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


def test_evaluation_takes_the_threads_of_a_machine_to_itself_and_gives_them_back(compare_dir, monkeypatch):
    from genbench.evaluation import compare as compare_mod
    from genbench.evaluation.protocol import EvalContext

    seen = []
    evaluate = EvalContext.evaluate_run

    def spy(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(EvalContext, "evaluate_run", spy)
    monkeypatch.setattr(compare_mod, "threads_when_alone", lambda: 3)
    before = torch.get_num_threads()
    assert main(["compare", "--dataset", "digits", "--models", "vae", "--out", str(compare_dir), *TINY]) == 0
    assert seen == [3] and torch.get_num_threads() == before
    assert json.loads((compare_dir / "metrics.json").read_text())["evaluation_threads"] == 3
