"""The report's opening summary (evaluation/summary.py): every sentence against the rows it was made
from, written out by hand: the lowest value wins, ties as printed are named together, NaN and missing
values never win and are named, reference rows never win, an unmeasured aspect says so."""

from genbench.evaluation.summary import summary

NAN = float("nan")

ROWS = [
    {"name": "train set (floor)", "kind": "reference", "fd": 0.5, "mse": 0.0, "sample_ms_per_image": 0.0},
    {"name": "uniform noise (ceiling)", "kind": "reference", "fd": 89.3},
    {"name": "ae", "kind": "model", "fd": 6.0, "mse": 0.0073, "recon_fd": 0.36, "bits_per_dim": None,
     "sample_ms_per_image": 0.002, "train_wall_time_s": 4.1},
    {"name": "vae", "kind": "model", "fd": 6.7, "mse": 0.0072, "recon_fd": 0.38, "bits_per_dim": 3.626,
     "sample_ms_per_image": 0.0021, "train_wall_time_s": 8.5},
    {"name": "vqgan", "kind": "model", "fd": 2.43, "mse": 0.0067, "recon_fd": 0.31, "bits_per_dim": 4.44,
     "sample_ms_per_image": 0.76, "train_wall_time_s": 65.0},
    {"name": "ddpm", "kind": "model", "fd": 1.39, "mse": None, "bits_per_dim": NAN, "sample_ms_per_image": 7.63,
     "train_wall_time_s": 92.8},
    {"name": "ldm", "kind": "model", "fd": 1.386, "mse": 0.0055, "recon_fd": 0.41, "sample_ms_per_image": 7.0,
     "train_wall_time_s": 99.5},
]


def test_each_aspect_names_the_measured_winner():
    s = dict(summary(ROWS))
    assert list(s) == ["Sample quality", "Likelihood", "Reconstruction", "Sampling cost", "Training cost"]
    # 1.39 and 1.386 print alike: a tie (named in the rows' order), never a win by a hair; 2.43 / 1.386 = 1.75
    assert s["Sample quality"] == (
        "ddpm and ldm tie for the lowest FD, 1.39 (Fréchet distance of samples to the test set); next vqgan, "
        "2.43 (75% higher). For scale: train set (floor) 0.5; uniform noise (ceiling) 89.3.")
    # NaN (ddpm), None (ae) and an absent key (ldm) are all "no likelihood"
    assert s["Likelihood"] == (
        "vae has the lowest bits/dim, 3.63 (an upper bound on the test negative log-likelihood); next vqgan, 4.44 "
        "(22% higher). ae, ddpm and ldm have no likelihood.")
    assert s["Reconstruction"] == (
        "ldm has the lowest reconstruction error, 0.0055 (MSE per pixel); next vqgan, 0.0067 (22% higher). "
        "The most realistic reconstructions, by rFD: vqgan, 0.31. ddpm does not reconstruct.")
    # 0.002 and 0.0021 print differently: no tie; the reference's 0.0 never wins
    assert s["Sampling cost"] == ("ae samples fastest, 0.002 ms per image; ddpm is slowest, 7.63 ms per image "
                                  "(3,815× as long).")
    assert s["Training cost"] == "ae trained fastest, 4.10 s; ldm took longest, 99.5 s (24× as long)."


def test_same_winner_for_mse_and_rfd_is_said_once():
    rows = [{"name": "a", "kind": "model", "mse": 0.001, "recon_fd": 0.2},
            {"name": "b", "kind": "model", "mse": 0.002, "recon_fd": 0.3}]
    assert dict(summary(rows))["Reconstruction"] == (
        "a has the lowest reconstruction error, 0.001 (MSE per pixel); next b, 0.002 (2.0× as high). "
        "a also has the most realistic reconstructions (rFD 0.2).")


def test_nothing_measured_and_all_tied():
    rows = [{"name": "a", "kind": "model", "fd": 2.0, "sample_ms_per_image": 1.0},
            {"name": "b", "kind": "model", "fd": 2.0, "sample_ms_per_image": 1.0}]
    s = dict(summary(rows))
    assert s["Sample quality"] == "a and b tie for the lowest FD, 2.00 (Fréchet distance of samples to the test set)."
    assert s["Likelihood"] == "No model reports a likelihood (bits/dim)."
    assert s["Reconstruction"] == "No model reconstructs test images."
    assert s["Sampling cost"] == "a and b sample fastest, 1.00 ms per image."
    assert s["Training cost"] == "No model has a measured training time."
    assert summary([r for r in ROWS if r["kind"] == "reference"]) == []
