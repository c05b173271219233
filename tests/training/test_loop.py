"""The shared trainer: exact resume, NaN stop, EMA, checkpoint atomicity, config validation."""

import json
import math
from contextlib import contextmanager

import numpy as np
import pytest
import torch

import genbench.utils
from genbench.files import read_tensors
from genbench.training.checkpoint import load_checkpoint, prefixed
from genbench.models import GenerativeModel
from genbench.models.ae import AE
from genbench.models.base import get_model_class
from genbench.errors import GenbenchError
from genbench.training.config import TrainConfig, lr_at
from genbench.training.ema import EMA
from genbench.training.loop import Interrupted, TrainingDiverged, rng_seed
from genbench.training.run import resolve_configs, train_run

TINY = ["latent_dim=4", "width=32", "arch=mlp", "train.steps=24", "train.batch_size=32",
        "train.ckpt_every=6", "train.log_every=4", "train.lr=1e-3"]


def _weights(run_dir):
    return read_tensors(run_dir / "model" / "model.safetensors")


@pytest.mark.parametrize("model", ["ae", "vae"])
@pytest.mark.parametrize("extra", [[], ["train.ema_decay=0.9", "train.grad_clip=1.0", "train.lr_schedule=cosine"]])
def test_resumed_run_equals_uninterrupted(tmp_path, tiny_digits, model, extra):
    sets = TINY + extra
    full = train_run(model, tiny_digits, tmp_path / "full", sets=sets, progress=False)
    with pytest.raises(Interrupted):
        train_run(model, tiny_digits, tmp_path / "cut", sets=sets, progress=False, interrupt_at=12)
    assert json.loads((tmp_path / "cut" / "run.json").read_text())["status"] == "running"
    with pytest.raises(GenbenchError, match="already holds a run"):
        train_run(model, tiny_digits, tmp_path / "cut", sets=sets, progress=False)
    train_run(model, tiny_digits, tmp_path / "cut", resume=True, progress=False)
    a, b = _weights(full), _weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the logged loss sequence is the same too
    la = [json.loads(line)["loss"] for line in (full / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(line)["loss"] for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert la == lb


def test_training_reduces_loss(tmp_path, tiny_digits):
    run = train_run("vae", tiny_digits, tmp_path / "r", sets=TINY[:-4] + ["train.steps=150", "train.batch_size=64",
                                                                          "train.lr=3e-3", "train.log_every=10"],
                    progress=False)
    losses = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.8 * losses[0]


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tmp_path, tiny_digits, monkeypatch):
    from genbench.models.ae import AE

    original = AE.loss

    def poisoned(self, batch, step=0, stage="main"):
        out = original(self, batch, step, stage)
        if step >= 9:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(AE, "loss", poisoned)
    with pytest.raises(TrainingDiverged, match="step 9") as err:
        train_run("ae", tiny_digits, tmp_path / "r", sets=TINY, progress=False)
    assert "last good checkpoint" in str(err.value)
    tensors, meta = load_checkpoint(tmp_path / "r" / "checkpoints")
    assert meta["step"] == 6
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if v.is_floating_point())


def test_nan_loss_before_any_checkpoint_says_none_was_kept(tmp_path, tiny_digits, monkeypatch):
    from genbench.models.ae import AE

    original = AE.loss

    def poisoned(self, batch, step=0, stage="main"):
        out = original(self, batch, step, stage)
        out["loss"] = out["loss"] * float("nan") if step >= 1 else out["loss"]
        return out

    monkeypatch.setattr(AE, "loss", poisoned)
    with pytest.raises(TrainingDiverged, match="step 1") as err:
        train_run("ae", tiny_digits, tmp_path / "r", sets=TINY, progress=False)
    assert "no checkpoint was written yet" in str(err.value) and "last good checkpoint" not in str(err.value)
    assert load_checkpoint(tmp_path / "r" / "checkpoints") is None


def test_ema_update_formula():
    lin = torch.nn.Linear(2, 1)
    ema = EMA(lin, decay=0.9)
    before = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update(lin)
    torch.testing.assert_close(ema.shadow["weight"], 0.9 * before["weight"] + 0.1 * lin.weight)
    torch.testing.assert_close(ema.shadow["bias"], before["bias"])


def test_ema_warmup_decay():
    ema = EMA(torch.nn.Linear(2, 1), decay=0.995, warmup=True)
    assert ema.decay_at(1) == pytest.approx(2 / 11) and ema.decay_at(90) == pytest.approx(0.91)
    assert ema.decay_at(1790) == 0.995 and ema.decay_at(10**6) == 0.995  # capped at the configured decay
    assert EMA(torch.nn.Linear(2, 1), decay=0.995).decay_at(1) == 0.995


@pytest.mark.parametrize("warmup", [False, True])
def test_exported_weights_are_the_ema_of_the_live_trajectory(tmp_path, tiny_digits, warmup):
    """Exported = EMA_N = d^N w_0 + sum_k (1-d) d^(N-k) w_k, computed here in float64 from the live
    weights w_k after every step. Those are read from the checkpoint of a run interrupted after each
    step k and resumed (resume is bit-exact, and the EMA never feeds back into the live weights);
    w_0 is the model as train_run initialises it from the run's seed. The AE's buffers are fitted
    after training (finish_training) from the exported weights: recomputed from EMA_N in numpy.
    With warm-up, the k-th update's decay is d_k = min(d, (1 + k) / (10 + k)) instead, through a
    resume: EMA_k = d_k EMA_(k-1) + (1 - d_k) w_k."""
    d, n = 0.8, 6  # d^N = 0.26: the initial weights still weigh in
    sets = TINY + [f"train.steps={n}", "train.ckpt_every=1", f"train.ema_decay={d}", "train.device=cpu",
                   f"train.ema_warmup={str(warmup).lower()}"]  # exact resume
    run = tmp_path / "r"
    live = []
    for k in range(1, n):
        with pytest.raises(Interrupted):
            train_run("ae", tiny_digits, run, sets=sets, progress=False, interrupt_at=k, resume=k > 1)
        tensors, meta = load_checkpoint(run / "checkpoints")
        assert meta["step"] == k
        live.append(prefixed(tensors, "model."))
    train_run("ae", tiny_digits, run, resume=True, progress=False)
    tensors, meta = load_checkpoint(run / "checkpoints")
    assert meta["step"] == n  # saved before the EMA is copied into the model: the live w_N
    live.append(prefixed(tensors, "model."))

    model_cfg, train_cfg = resolve_configs("ae", "digits", tiny_digits.shape, "quick", sets)
    torch.manual_seed(train_cfg.seed)  # as train_run initialises the model
    initial = AE(model_cfg)
    w0 = initial.state_dict()
    params = [k for k, _ in initial.named_parameters()]
    ema = {k: w0[k].double() for k in params}
    for i, w in enumerate(live, 1):
        d_i = min(d, (1 + i) / (10 + i)) if warmup else d
        ema = {k: d_i * ema[k] + (1 - d_i) * w[k].double() for k in params}
    exported = _weights(run)
    assert exported.keys() == w0.keys()
    for k in params:
        torch.testing.assert_close(exported[k].double(), ema[k], rtol=1e-5, atol=1e-6, msg=k)
        assert not torch.allclose(exported[k], live[-1][k], rtol=1e-3, atol=1e-5), f"{k} is the live weight"
    # buffers: the latent Gaussian fitted to the training latents of the EMA model
    initial.load_state_dict({k: ema[k].float() for k in params}, strict=False)
    with torch.no_grad():
        z = initial.encode(tiny_digits.train).double().numpy()
    cov = np.cov(z.T) + 1e-5 * np.eye(z.shape[1])
    np.testing.assert_allclose(exported["latent_mean"].numpy(), z.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(exported["latent_scale_tril"].numpy(), np.linalg.cholesky(cov), rtol=1e-4, atol=1e-5)


def test_lr_schedule():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, lr_schedule="cosine")
    assert lr_at(cfg, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 55) == pytest.approx(0.5)
    assert lr_at(cfg, 100) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("bad, match", [
    (["train.lr=-1"], "lr must be > 0"),
    (["train.steps=ten"], "expected an integer"),
    (["train.nonsense=1"], "has no field 'nonsense'"),
    (["latent_dim=0"], "latent_dim must be >= 1"),
    (["arch=transformer"], "not one of"),
    (["bogus=1"], "unknown key 'bogus'"),
    (["train.stages={\"prior\": {\"steps\": 3}}"], "not stages of ae"),
    (["noequals"], "expected key=value"),
])
def test_bad_config_is_refused_before_anything_is_written(tmp_path, tiny_digits, bad, match):
    with pytest.raises(GenbenchError, match=match):
        train_run("ae", tiny_digits, tmp_path / "r", sets=TINY + bad, progress=False)
    assert not (tmp_path / "r" / "checkpoints").exists()


@contextmanager
def _linear_output_dtypes():
    """dtypes of the outputs of every nn.Linear run in training mode while inside the block."""
    seen = []

    def hook(module, args, output):
        if isinstance(module, torch.nn.Linear) and module.training:
            seen.append(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def _first_step(model_name, data, sets):
    """(initial model, batch, loss RNG seed) of the trainer's step 0, rebuilt outside it: the model
    initialised from the run's seed (train_run), the first batch of the permutation seeded from
    (seed, stage, epoch) and the global RNG re-seeded from (seed, stage, step, rank) (loop._train_stage)."""
    model_cfg, cfg = resolve_configs(model_name, "digits", data.shape, "quick", sets)
    torch.manual_seed(cfg.seed)
    model = get_model_class(model_name)(model_cfg)
    n = data.train.shape[0]
    stage_seed = cfg.seed * 1_000_003 + sum(map(ord, "main"))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed((stage_seed * 100_003) % 2**63))
    return model, data.train[perm[: min(cfg.batch_size, n)]], rng_seed(cfg.seed, "main", 0, 0)


def _bf16_rounding_sd(model, batch, seed):
    """Standard deviation of the change of the fp32 loss when every bf16 rounding that autocast
    makes in the nn.Linear layers is applied: first order, each rounding an independent relative
    error of at most u = 2^-8 (8-bit significand, round to nearest), variance <= u^2/3. Rounded are
    each layer's input h (once per element), weight W and bias b (once for the whole batch) and
    output o, so Var = u^2/3 * sum((dL/dh h)^2 + (dL/dW W)^2 + (dL/db b)^2 + (dL/do o)^2)."""
    grads = []

    def hook(module, args, output):
        for t in (args[0], output):
            t.retain_grad()
        grads.append((module, args[0], output))

    batch = batch.clone().requires_grad_(True)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        torch.manual_seed(seed)
        loss = model.loss(batch)["loss"]
    finally:
        for h in handles:
            h.remove()
    loss.backward()
    var = sum(float((t.grad * t.detach()).pow(2).sum()) for m, h, o in grads for t in (h, o, m.weight, m.bias))
    return loss.item(), 2.0**-8 * math.sqrt(var / 3)


def test_bf16_autocast_runs_the_forward_in_bf16_and_is_recorded(tmp_path, tiny_digits, monkeypatch):
    """bf16 forced on (as on a CPU with native bf16; `cpu_has_native_bf16` is looked up through the
    module global by `bf16_effective`): every Linear of the VAE computes in bf16 during training,
    the first logged loss (step 0: same weights, batch and noise as fp32) differs from fp32 by no
    more than 5 standard deviations of the bf16 rounding error of the loss (`_bf16_rounding_sd`), and
    run.json records it. Requested where the CPU has no native bf16, bf16 is skipped: fp32 activations,
    the fp32 run's exact losses, and `bf16_used` false."""
    sets = TINY + ["train.steps=6", "train.log_every=1", "train.batch_size=256", "train.device=cpu"]
    runs = {}
    for name, native, bf16 in [("fp32", True, False), ("bf16", True, True), ("no_native", False, True)]:
        monkeypatch.setattr(genbench.utils, "cpu_has_native_bf16", lambda native=native: native)
        with _linear_output_dtypes() as dtypes:
            run = train_run("vae", tiny_digits, tmp_path / name, sets=sets + [f"train.bf16={str(bf16).lower()}"],
                            progress=False)
        records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        summary = json.loads((run / "run.json").read_text())["summary"]
        runs[name] = dtypes, [r["loss"] for r in records], summary["bf16_used"]
        assert [r["step"] for r in records] == list(range(1, 7))
    monkeypatch.undo()

    # (6 steps + the one step whose FLOPs are counted, genbench.training.flops, with the same autocast)
    # x (3 encoder + 3 decoder layers)
    per_run = 7 * 6
    assert runs["fp32"][0] == [torch.float32] * per_run and runs["fp32"][2] is False
    assert runs["bf16"][0] == [torch.bfloat16] * per_run and runs["bf16"][2] is True
    assert runs["no_native"][0] == [torch.float32] * per_run and runs["no_native"][2] is False
    assert runs["no_native"][1] == runs["fp32"][1]

    model, batch, seed = _first_step("vae", tiny_digits, sets)
    loss32, sd = _bf16_rounding_sd(model, batch, seed)
    assert runs["fp32"][1][0] == pytest.approx(loss32, rel=1e-6)  # the rebuilt step 0 is the trainer's
    assert runs["bf16"][1][0] != loss32  # bf16 did change the computation...
    print(f"\nbf16 - fp32 loss at step 0: {runs['bf16'][1][0] - loss32:+.4f}, rounding sd {sd:.4f}")
    assert abs(runs["bf16"][1][0] - loss32) < 5 * sd, (runs["bf16"][1][0], loss32, sd)  # ...by rounding only
    model = GenerativeModel.from_pretrained(tmp_path / "bf16" / "model")
    assert torch.isfinite(model.sample(4)).all()


def test_bf16_requested_by_one_stage_is_recorded_for_that_stage_and_the_run(tmp_path, tiny_digits, monkeypatch):
    """The LDM's presets ask for bf16 in the diffusion stage only: run.json says so per stage, and
    the run's `bf16_used` is true (it once read the top-level setting, false there)."""
    monkeypatch.setattr(genbench.utils, "cpu_has_native_bf16", lambda: True)
    sets = TINY + ["train.steps=2", "train.device=cpu", 'train.stages={"main": {"bf16": true}}']
    run = train_run("vae", tiny_digits, tmp_path / "r", sets=sets, progress=False)
    summary = json.loads((run / "run.json").read_text())["summary"]
    assert summary["stages"]["main"]["bf16_used"] is True and summary["bf16_used"] is True


# ---------------------------------------------------------------- uint8 datasets and shards


def _uint8_dataset(n=256):
    from genbench.data import ImageDataset

    pixels = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    return ImageDataset("u8", pixels, pixels[:64].clone())


def test_uint8_pixels_train_exactly_as_their_float32_values(tmp_path):
    """Batches, and what finish_training sees, are converted from uint8 to the very floats a float32
    dataset holds: the same weights and losses, bit for bit."""
    from genbench.data import ImageDataset

    u8 = _uint8_dataset()
    f32 = ImageDataset("u8", u8.train, u8.test)
    assert f32.train_pixels.dtype == torch.float32
    a = train_run("ae", u8, tmp_path / "u8", sets=TINY, progress=False)
    b = train_run("ae", f32, tmp_path / "f32", sets=TINY, progress=False)
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    logs = [[{k: v for k, v in json.loads(line).items() if k != "images_per_s"}
             for line in (run / "log.jsonl").read_text().splitlines()] for run in (a, b)]
    assert logs[0] == logs[1]


def test_prepare_and_finish_see_every_image_or_an_evenly_spaced_subset(tmp_path, monkeypatch):
    from genbench.training import loop

    seen = []
    monkeypatch.setattr(AE, "finish_training", lambda self, x: seen.append(x.clone()))
    u8 = _uint8_dataset()
    train_run("ae", u8, tmp_path / "all", sets=TINY, progress=False)
    assert torch.equal(seen[-1], u8.train)  # all of them, as float32
    monkeypatch.setattr(loop, "FULL_SET_BYTES", 4 * 64 * 50)  # room for 50 of the 256 float32 8x8 images
    train_run("ae", u8, tmp_path / "some", sets=TINY, progress=False)
    assert torch.equal(seen[-1], u8.train[torch.arange(50) * 256 // 50])


def test_a_shard_given_to_one_process_is_refused(tmp_path):
    from genbench.data import load_dataset

    half = load_dataset("digits", limit=256, shard=(0, 2))
    with pytest.raises(GenbenchError, match=r"128 images given as process 0's shard of 256, which holds 256: "
                                            r"load the dataset with shard=\(0, 1\)"):
        train_run("ae", half, tmp_path / "r", sets=TINY, progress=False)


# ---------------------------------------------------------------- channels-last training

CONV = ["arch=conv", "latent_dim=4", "width=8", "train.steps=12", "train.batch_size=32", "train.ckpt_every=4",
        "train.log_every=1", "train.lr=1e-3", "train.ema_decay=0.9", "train.device=cpu"]


def test_channels_last_trains_nhwc_the_same_function_and_hands_on_the_default_layout(tmp_path, tiny_digits, monkeypatch):
    """train.channels_last: every batch and every conv weight the loss sees is NHWC (so oneDNN picks its
    channels-last kernels), the losses are those of the default layout up to float32 summation order,
    and the weights come out (in memory and on disk) in the default layout, equal to the default run's
    up to the same rounding. An interrupted and resumed channels-last run equals the uninterrupted one
    exactly (the restored optimizer state is contiguous, the live weights NHWC: elementwise updates
    do not care)."""
    seen = []
    original = AE.loss

    def spy(self, batch, step=0, stage="main"):
        convs = [m.weight for m in self.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
        assert convs
        seen.append((batch.is_contiguous(memory_format=torch.channels_last),
                     all(w.is_contiguous(memory_format=torch.channels_last) for w in convs),
                     all(w.is_contiguous() for w in convs)))
        return original(self, batch, step, stage)

    monkeypatch.setattr(AE, "loss", spy)
    nhwc = train_run("ae", tiny_digits, tmp_path / "nhwc", sets=CONV + ["train.channels_last=true"], progress=False)
    nhwc_seen, seen[:] = list(seen), []
    nchw = train_run("ae", tiny_digits, tmp_path / "nchw", sets=CONV, progress=False)
    nchw_seen = list(seen)
    monkeypatch.undo()
    assert len(nhwc_seen) >= 12 and all(b and cl and not c for b, cl, c in nhwc_seen), nhwc_seen[:3]
    assert all(c and not cl for _, cl, c in nchw_seen)

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]

    # other kernels (the spy saw their layout), the same function: equal up to summation order
    np.testing.assert_allclose(losses(nhwc), losses(nchw), rtol=1e-4)
    a, b = _weights(nhwc), _weights(nchw)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].is_contiguous(), k
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
    model = GenerativeModel.from_pretrained(nhwc / "model")
    assert all(p.is_contiguous() for p in model.parameters())
    stages = {r: json.loads((r / "run.json").read_text())["summary"]["stages"]["main"] for r in (nhwc, nchw)}
    assert stages[nhwc]["channels_last"] is True and stages[nchw]["channels_last"] is False

    with pytest.raises(Interrupted):
        train_run("ae", tiny_digits, tmp_path / "cut", sets=CONV + ["train.channels_last=true"], progress=False,
                  interrupt_at=8)
    train_run("ae", tiny_digits, tmp_path / "cut", resume=True, progress=False)
    c = _weights(tmp_path / "cut")
    for k in a:
        assert torch.equal(a[k], c[k]), k
    assert losses(tmp_path / "cut") == losses(nhwc)
