"""The model contract (models/base.py): every registered model keeps it, capabilities are declared
truthfully, and the exported-model folder (save_pretrained / from_pretrained) round-trips exactly and
refuses corrupt, hostile or mismatched files."""

import json
import pickle

import pytest
import torch

from genbench.errors import GenbenchError
from genbench.models import GenerativeModel, available_models, get_model_class
from genbench.models.base import pretrained_folder, read_pretrained_config
from genbench.models.presets import DATASET_PRESETS, PRESETS
from genbench.models.vae import VAE, VAEConfig
from genbench.training.run import resolve_configs


@pytest.fixture
def saved(tmp_path):
    model = VAE(VAEConfig(arch="mlp", latent_dim=3, width=16))
    model.save_pretrained(tmp_path / "m")
    return model, tmp_path / "m"


def test_round_trip_is_exact(saved):
    model, folder = saved
    loaded = GenerativeModel.from_pretrained(folder)
    assert loaded.config == model.config
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_truncated_weights_refused(saved):
    _, folder = saved
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(GenbenchError, match="truncated"):
        GenerativeModel.from_pretrained(folder)


def test_corrupted_weights_refused(saved):
    _, folder = saved
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(GenbenchError, match="corrupted"):
        GenerativeModel.from_pretrained(folder)


def test_pickle_disguised_as_checkpoint_is_never_unpickled(saved, tmp_path):
    _, folder = saved

    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    payload = pickle.dumps({"state": Boom()})
    (folder / "model.safetensors").write_bytes(payload)
    meta = json.loads((folder / "config.json").read_text())
    import hashlib

    meta["weights"] = {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(GenbenchError, match="not a valid safetensors file"):
        GenerativeModel.from_pretrained(folder)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["config"].update(latent_dim="3"), "expected an integer"),
    (lambda m: m["config"].update(extra_field=1), "unknown field"),
    (lambda m: m.update(model="gpt5"), "unknown model 'gpt5'"),
    (lambda m: m["config"].update(likelihood="poisson"), "not one of"),
    (lambda m: m.pop("weights"), "not a genbench model config"),
])
def test_invalid_config_refused(saved, edit, match):
    _, folder = saved
    meta = json.loads((folder / "config.json").read_text())
    edit(meta)
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(GenbenchError, match=match):
        GenerativeModel.from_pretrained(folder)


def test_config_not_json(saved):
    _, folder = saved
    (folder / "config.json").write_text("{not json")
    with pytest.raises(GenbenchError, match="not valid JSON"):
        GenerativeModel.from_pretrained(folder)


def test_shape_mismatch_refused(saved):
    _, folder = saved
    meta = json.loads((folder / "config.json").read_text())
    meta["config"]["latent_dim"] = 5
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(GenbenchError, match="shape"):
        GenerativeModel.from_pretrained(folder)


def test_unwritable_output_folder(tmp_path):
    import os

    if os.geteuid() == 0:
        # root ignores permission bits; use a path under a regular file instead
        (tmp_path / "file").write_text("x")
        target = tmp_path / "file" / "sub"
    else:
        tmp_path.chmod(0o500)
        target = tmp_path / "sub"
    model = VAE(VAEConfig(arch="mlp", latent_dim=3, width=16))
    with pytest.raises(GenbenchError, match="cannot create output folder"):
        model.save_pretrained(target)


# ---------------------------------------------------------------------------------------------
# the contract, for every registered model

TINY = {  # a few-millisecond model of each family on 8x8 digits (quick preset + these)
    "ae": [], "vae": [],
    "vqvae": ["prior_layers=1", "prior_embd=16", "prior_heads=2"],
    "vqgan": ["prior_layers=1", "prior_embd=16", "prior_heads=2", "perceptual_weight=0"],
    "ddpm": ["unet.base_channels=8", "unet.num_heads=1", "diffusion.num_timesteps=20", "sampler.steps=3",
             "bpd_timesteps=5"],
    "ldm": ['unet={"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [], '
            '"num_heads": 1}', 'diffusion={"num_timesteps": 20, "schedule": "linear", "beta_end": 0.5}',
            "sampler.steps=3", "scale_factor=1.0"],
}


def tiny(name):
    model_cfg, _ = resolve_configs(name, "digits", (1, 8, 8), "quick", TINY[name])
    torch.manual_seed(0)
    return get_model_class(name)(model_cfg).eval()


def test_every_model_is_registered_with_presets_side_by_side():
    assert available_models() == ["ae", "vae", "vqvae", "vqgan", "ddpm", "ldm"]
    for name in available_models():
        cls = get_model_class(name)
        assert issubclass(cls, GenerativeModel) and cls.name == name
        assert set(PRESETS[name]) == {"quick", "standard"}, name
        assert cls.FAMILY.get("latent"), name
        for preset in PRESETS[name]:
            for dataset, shape in (("digits", (1, 8, 8)), ("fashion-mnist", (1, 28, 28)), ("emoji", (3, 32, 32))):
                resolve_configs(name, dataset, shape, preset)  # every budget resolves to a valid config
        assert ("quick", "emoji") in DATASET_PRESETS[name], name  # the digits-sized quick nets do not fit 3x32x32
    assert set(DATASET_PRESETS) <= set(PRESETS)


@pytest.mark.parametrize("name", ["ae", "vae", "vqvae", "vqgan", "ddpm", "ldm"])
def test_capabilities_are_declared_truthfully(name):
    model = tiny(name)
    x = torch.rand(4, 1, 8, 8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        samples = model.sample(3, generator=g)
        assert samples.shape == (3, 1, 8, 8) and 0 <= samples.min() and samples.max() <= 1
        for stage in model.stages:
            assert "main" in model.optimizer_groups(stage)
        if model.has_reconstruction:
            rec = model.reconstruct(x)
            assert rec.shape == x.shape
            torch.testing.assert_close(rec, model.decode(model.encode(x)))
        else:
            for call in (model.encode, model.reconstruct):
                with pytest.raises(GenbenchError, match="has no reconstruction"):
                    call(x)
        if model.has_latent_space:
            z = model.encode_latents(x)
            assert z.is_floating_point() and z.shape[0] == 4
            out = model.decode_latents(z)
            assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
            if name in ("vqvae", "vqgan"):  # decoding continuous latents quantizes them: a reconstruction
                torch.testing.assert_close(out, model.reconstruct(x))
        else:
            with pytest.raises(GenbenchError, match="has no continuous latent space"):
                model.encode_latents(x)
        if model.has_posterior:  # q(z|x): a mean and a log-variance of the latent's shape
            mean, log_var = model.posterior(x)
            assert mean.shape == log_var.shape == model.encode_latents(x).shape
        else:
            with pytest.raises(GenbenchError, match="has no Gaussian posterior"):
                model.posterior(x)
        if model.has_codebook:  # code indices of a (B, h, w) grid into codebook_size codes
            idx = model.encode(x)
            assert idx.dtype == torch.long and idx.ndim == 3 and 0 <= idx.min() and idx.max() < model.codebook_size
        else:
            with pytest.raises(GenbenchError, match="has no codebook"):
                model.codebook_size
        if model.has_sampler:  # the callback sees the states; shown as images, the last x0_hat is the sample
            seen = []
            again = model.sample(3, generator=torch.Generator().manual_seed(0),
                                 callback=lambda t, z, z0: seen.append(z0))
            assert torch.equal(again, samples)
            torch.testing.assert_close(model.diffusion_to_images(seen[-1]), samples, rtol=0, atol=1e-6)
        else:
            with pytest.raises(GenbenchError, match="has no diffusion process"):
                model.diffusion_to_images(x)
    with pytest.raises(GenbenchError, match=f"{name}: unknown stage 'nope'"):
        model.check_stage("nope")


def test_vq_latents_are_the_pre_quantization_encoder_outputs():
    model = tiny("vqvae")
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        z = model.encode_latents(x)
        torch.testing.assert_close(z, model.encoder(x))
        codes = model.quantizer.indices_to_codes(model.encode(x))  # the nearest codes of z
        assert not torch.allclose(z, codes)  # continuous, not yet quantized
        torch.testing.assert_close(model.decode_latents(codes), model.decode_latents(z))  # quantized when decoded


def test_register_refuses_a_class_outside_the_contract():
    from genbench.models.base import register

    with pytest.raises(TypeError, match="must subclass GenerativeModel"):
        register("plain")(torch.nn.Linear)


def test_pretrained_folder_accepts_a_run_folder(saved, tmp_path):
    model, folder = saved
    run = tmp_path / "run"
    model.save_pretrained(run / "model")
    assert pretrained_folder(run) == run / "model" and pretrained_folder(folder) == folder
    cls, config = read_pretrained_config(run / "model")
    assert cls is VAE and config == model.config
    loaded = GenerativeModel.from_pretrained(run)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
