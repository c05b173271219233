"""The CUDA paths: every model trained, sampled and evaluated on a GPU, and the diffusion samplers'
oracle check run there. Skipped where no GPU is present (CI, the 2-core CPU machine); run on a
GPU machine with `pytest tests/test_cuda.py`.

References: the closed-form output moments of the samplers under the Gaussian oracle
(tests/test_diffusion.py), and the CPU result of the same network on the same input.
"""

import json
import os

import numpy as np
import pytest
import torch

# GENBENCH_TEST_DEVICE=cpu runs the same checks on the CPU (to check the checks themselves)
DEVICE = os.environ.get("GENBENCH_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="needs a CUDA GPU")

from genbench.core.samplers import ddim_sample, ddim_timesteps, ddpm_sample  # noqa: E402
from genbench.training.run import train_run  # noqa: E402
from tests.core.test_diffusion import M, S, GaussianOracle, assert_moments, exact_ddim_moments, exact_ddpm_moments, make  # noqa: E402

# each model's tiny recipe from its own test module, so the GPU runs the same configurations as CPU CI
from tests.models import test_ddpm as test_models_ddpm  # noqa: E402
from tests.models import test_ldm as test_models_ldm  # noqa: E402
from tests.models import test_vqgan as test_models_vqgan  # noqa: E402
from tests.models import test_vqvae as test_models_vqvae  # noqa: E402

AE_VAE = ["arch=conv", "latent_dim=4", "width=16", "train.steps=20", "train.batch_size=64"]
TINY_SETS = {
    "ae": AE_VAE,
    "vae": AE_VAE + ["iwae_samples=5"],
    "vqvae": test_models_vqvae.TINY,
    "vqgan": test_models_vqgan.TINY,
    "ddpm": test_models_ddpm.TINY + ["train.steps=20", "train.ema_decay=0.8"],
    "ldm": test_models_ldm.TINY + [test_models_ldm.stages(8, 6, ema_decay=0.5)],
}


class DeviceOracle(GaussianOracle):
    """The exact denoiser with its tables on the GPU (the test module's keeps them on the CPU)."""

    def __call__(self, x, t):
        self.a, self.m, self.s = (v.to(x.device) for v in (self.a, self.m, self.s))
        return super().__call__(x, t)


@pytest.mark.parametrize("sampler,kwargs", [("ddpm", {"variance": "beta_tilde"}), ("ddim", {"steps": 50, "eta": 1.0})])
def test_oracle_sampler_on_cuda_matches_exact_moments(sampler, kwargs):
    d = make(T=200, schedule="cosine")
    oracle = DeviceOracle(d.alphas_cumprod.numpy(), M, S)
    fn = ddpm_sample if sampler == "ddpm" else ddim_sample
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = fn(d, oracle, (20000, len(M)), generator=g, clip_x0=None, progress=False, **kwargs)
    assert x.device.type == torch.device(DEVICE).type
    ab = d.alphas_cumprod.double().numpy()
    if sampler == "ddpm":
        mean, var = exact_ddpm_moments(ab, M, S, kwargs["variance"])
    else:
        mean, var = exact_ddim_moments(ab, ddim_timesteps(200, kwargs["steps"]).numpy(), kwargs["eta"], M, S)
    assert_moments(x.cpu(), mean, var)


def test_unet_on_cuda_matches_cpu():
    from genbench.nets.unet import UNet, UNetConfig

    torch.manual_seed(0)
    net = UNet(UNetConfig(base_channels=16, channel_mult=[1, 2, 4], num_res_blocks=1, attention_levels=[2],
                          num_heads=2, dropout=0.0), 1).eval()
    x, t = torch.randn(8, 1, 28, 28), torch.randint(0, 1000, (8,))
    with torch.no_grad():
        ref = net(x, t)
        out = net.to(DEVICE)(x.to(DEVICE), t.to(DEVICE)).cpu()
    # TF32 may be on for cuDNN convolutions: a relative tolerance of that precision
    torch.testing.assert_close(out, ref, rtol=5e-3, atol=5e-3 * ref.abs().max().item())


@pytest.fixture(scope="module")
def gpu_env(tmp_path_factory):
    import genbench.nets.perceptual as perceptual

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GENBENCH_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setitem(perceptual.TRAIN_PRESETS, "small", test_models_vqgan.TINY_PERCEPTUAL)
        yield


@pytest.mark.parametrize("name", list(TINY_SETS))
def test_model_trains_samples_and_evaluates_on_cuda(name, gpu_env, tiny_digits, tmp_path):
    from genbench.evaluation.protocol import EvalContext
    from genbench.evaluation.features import get_feature_network

    run = train_run(name, tiny_digits, tmp_path / name, sets=TINY_SETS[name] + [f"train.device={DEVICE}"],
                    progress=False)
    summary = json.loads((run / "run.json").read_text())["summary"]
    assert summary["device"].startswith(DEVICE), summary
    ctx = EvalContext(tiny_digits, get_feature_network(tiny_digits), num_samples=64, eval_limit=32, seed=0)
    row = ctx.evaluate_run(run, device=DEVICE)
    assert np.isfinite(row["fd"]) and row["sample_ms_per_image"] > 0
    if row.get("bits_per_dim") is not None:
        assert np.isfinite(row["bits_per_dim"]) and row["bits_per_dim"] > 0  # barely trained: no upper bound
    if row.get("mse") is not None:
        assert 0 <= row["mse"] < 1


def test_uint8_pixels_convert_on_the_gpu_to_the_cpu_floats():
    """CUDA divides by a Python scalar as a multiplication by its reciprocal; the conversion looks
    the values up in a table made on the CPU instead, so a batch converted on the GPU holds exactly
    the floats a CPU run (and genbench before uint8 storage) computes."""
    from genbench.data import unit_float

    p = torch.arange(256, dtype=torch.uint8).reshape(4, 1, 8, 8)
    expected = torch.from_numpy(np.arange(256, dtype=np.float32).reshape(4, 1, 8, 8) / 255.0)
    on_device = p.to(DEVICE)
    assert torch.equal(unit_float(on_device).cpu(), expected)
    assert torch.equal(unit_float(on_device, torch.tensor([3, 0], device=DEVICE)).cpu(), expected[[3, 0]])
