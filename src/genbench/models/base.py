"""The model contract, the registry of models by name, and the exported-model folder format.

Every genbench model is a `GenerativeModel`: an nn.Module with a typed config dataclass, trained by
the one trainer (genbench.training) and evaluated by the one protocol (genbench.evaluation). The
contract is written here once; the trainer and the evaluation call these methods and nothing else.

What every model provides
    Config                      its config dataclass (validated JSON, see genbench.config)
    name                        set by @register
    FAMILY                      FAMILY["latent"] says what its latent is (the report's family table)
    stages                      names of its training stages, trained in order ("main" by default;
                                VQ models: "autoencoder" then "prior"; LDM: "first_stage" then "diffusion")
    loss(batch, step, stage)    dict of scalars with a "loss" key (and "loss_<group>" per extra group)
    sample(n, generator)        (n, C, H, W) images in [0, 1]

What a model may provide (the defaults do nothing, or refuse with a clear error)
    optimizer_groups(stage)     {"main": params, ...}: one AdamW each (a GAN adds "disc")
    prepare_stage(stage, x)     before a stage's first step: data-dependent init (codebooks, scales)
    finish_training(x)          after the last stage: fit what needs the trained model (AE's prior)
    flops_phase(stage, step)    which kind of step this is, for counting training FLOPs once per kind
                                (genbench.training.flops); a step's cost may change within a stage
                                (VQ-GAN's discriminator from disc_start): 0 by default
    schedule_sets(config, k)    --set items that stretch the model's own step-based schedule by k when
                                a compute budget scales its training steps (VQ-GAN's disc_start)
    evaluate(test, generator)   likelihood figures: "bits_per_dim" (None when undefined) and
                                "bpd_estimator" (how it was computed, or why it is undefined)

Capabilities, declared as class attributes rather than probed with hasattr
    has_reconstruction = True   encode(x) -> its latent (continuous, or code indices for VQ models),
                                decode(latent) -> images, reconstruct(x) = decode(encode(x))
    has_latent_space = True     encode_latents(x, sample=False) -> continuous latents (B, ...),
                                decode_latents(z) -> images: the space the report interpolates in and
                                latent diffusion diffuses in (a VQ model's pre-quantization latents,
                                quantized when decoded; `sample` draws z ~ q(z|x) where the
                                encoder is stochastic)
    has_sampler = True          config.sampler (genbench.core.samplers.SamplerConfig) chooses how
                                sample() solves the reverse diffusion of self.diffusion; set_sampler
                                changes it for this instance (an evaluation choice: training ignores it);
                                sample(n, generator, callback) passes callback(t, x_t, x0_hat) to the
                                sampler (the trajectory, in the space the diffusion runs in), and
                                diffusion_to_images(x) shows a point of that space as images
    has_posterior = True        posterior(x) -> (mean, log_var) of a diagonal Gaussian q(z|x), prior
                                N(0, I): what active units and the latent-space picture are measured on
    has_codebook = True         encode(x) gives code indices (B, h, w) into `codebook_size` codes

Exported-model folder (`save_pretrained` / `from_pretrained`, mirrors of each other): config.json
(format version, model name, config, size and sha256 of the weights) + model.safetensors. A run
folder keeps its exported model in `<run>/EXPORT_SUBDIR`; `from_pretrained` accepts either folder.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from genbench.config import from_dict, to_dict
from genbench.errors import GenbenchError
from genbench.files import (ensure_writable_folder, read_json, read_safetensors_header, read_tensors, require_fields,
                            write_json, write_tensors)
from genbench.limits import check_memory

FORMAT_VERSION = 1
EXPORT_SUBDIR = "model"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# ---------------------------------------------------------------------------------------------
# the contract


class GenerativeModel(nn.Module):
    """Base class of every genbench model: the contract above, with its defaults."""

    Config: ClassVar[type]
    name: ClassVar[str] = "model"
    FAMILY: ClassVar[dict[str, str]] = {}
    stages: tuple[str, ...] = ("main",)
    has_reconstruction: ClassVar[bool] = False
    has_latent_space: ClassVar[bool] = False
    has_sampler: ClassVar[bool] = False
    has_posterior: ClassVar[bool] = False
    has_codebook: ClassVar[bool] = False

    config: Any

    # ---- required

    def loss(self, batch: Tensor, step: int = 0, stage: str = "main") -> dict[str, Tensor]:
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    # ---- training hooks

    def check_stage(self, stage: str) -> None:
        if stage not in self.stages:
            raise GenbenchError(f"{self.name}: unknown stage {stage!r}; stages are {list(self.stages)}")

    def optimizer_groups(self, stage: str) -> dict[str, list[nn.Parameter]]:
        self.check_stage(stage)
        return {"main": [p for p in self.parameters() if p.requires_grad]}

    def prepare_stage(self, stage: str, train_images: Tensor) -> None:
        self.check_stage(stage)

    def finish_training(self, train_images: Tensor) -> None:
        pass

    def flops_phase(self, stage: str, step: int) -> int:
        return 0

    @classmethod
    def schedule_sets(cls, config, k: float) -> list[str]:
        return []

    # ---- evaluation

    def evaluate(self, test_images: Tensor, generator: torch.Generator | None = None) -> dict:
        return {"bits_per_dim": None, "bpd_estimator": "not defined for this model"}

    # ---- capabilities

    def encode(self, x: Tensor) -> Tensor:
        raise GenbenchError(f"{self.name} has no reconstruction (it does not encode images)")

    def decode(self, z: Tensor) -> Tensor:
        raise GenbenchError(f"{self.name} has no reconstruction (it does not encode images)")

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def encode_latents(self, x: Tensor, sample: bool = False) -> Tensor:
        raise GenbenchError(f"{self.name} has no continuous latent space")

    def decode_latents(self, z: Tensor) -> Tensor:
        raise GenbenchError(f"{self.name} has no continuous latent space")

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise GenbenchError(f"{self.name} has no Gaussian posterior q(z|x)")

    @property
    def codebook_size(self) -> int:
        raise GenbenchError(f"{self.name} has no codebook")

    def diffusion_to_images(self, x: Tensor) -> Tensor:
        raise GenbenchError(f"{self.name} has no diffusion process")

    def set_sampler(self, sampler) -> None:
        """Draw samples with `sampler` (a SamplerConfig) from now on (models with has_sampler)."""
        if not self.has_sampler:
            raise GenbenchError(f"{self.name} has no sampler to choose (the diffusion models have one)")
        sampler.validate(self.diffusion.num_timesteps)
        self.config.sampler = sampler

    # ---- the exported-model folder

    def save_pretrained(self, folder: str | os.PathLike, extra: dict | None = None) -> None:
        """Write `folder/model.safetensors`, then `folder/config.json` (which records the weights' hash)."""
        folder = Path(folder)
        ensure_writable_folder(folder)
        record = write_tensors(folder / WEIGHTS_FILE, self.state_dict())
        write_json(folder / CONFIG_FILE, {
            "format_version": FORMAT_VERSION,
            "model": self.name,
            "config": to_dict(self.config),
            "weights": record,
            **(extra or {}),
        })

    @staticmethod
    def from_pretrained(folder: str | os.PathLike, device: str | torch.device = "cpu") -> GenerativeModel:
        """Mirror of `save_pretrained`: validated config, verified weights, model in eval mode. Any
        registered model; `folder` may also be a run folder holding one in `EXPORT_SUBDIR`."""
        folder = pretrained_folder(folder)
        meta = _read_meta(folder)
        cls, config = _class_and_config(meta, folder)
        # config and weights agree, and fit in memory, before anything is allocated
        plan = planned_state(cls, config, f"{folder / CONFIG_FILE}")
        check_memory(2 * state_bytes(plan), f"{folder}: loading the {cls.name} model its {CONFIG_FILE} describes")
        check_header(plan, read_safetensors_header(folder / WEIGHTS_FILE), folder / WEIGHTS_FILE)
        state = read_tensors(folder / WEIGHTS_FILE, meta["weights"])
        model = cls(config)
        load_state(model, state, folder / WEIGHTS_FILE)
        return model.to(device).eval()


@contextmanager
def eval_mode(module: nn.Module):
    """Dropout off while sampling/evaluating; the previous mode is restored (training may resume)."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


# ---------------------------------------------------------------------------------------------
# sizes known before anything is allocated

_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def planned_state(cls: type[GenerativeModel], config, where: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{name: (shape, dtype)} of the state_dict `cls(config)` would have, found by building the model
    on PyTorch's meta device, where tensors have shapes but no memory."""
    try:
        with torch.device("meta"):
            model = cls(config)
    except GenbenchError:
        raise
    except (RuntimeError, ValueError, OverflowError, MemoryError) as e:
        raise GenbenchError(f"{where}: a {cls.name} model of this size cannot be built ({str(e)[:120]})") from None
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def state_bytes(plan: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
    return sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size() for shape, dtype in plan.values())


def check_header(plan: dict, header: dict[str, tuple[str, tuple[int, ...]]], source) -> None:
    """The weights file's header holds exactly the tensors (names, shapes, dtypes) the config implies."""
    missing, unexpected = sorted(set(plan) - set(header)), sorted(set(header) - set(plan))
    if missing or unexpected:
        raise GenbenchError(f"{source}: weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    for k, (shape, dtype) in plan.items():
        if header[k] != (_ST_DTYPES.get(dtype), shape):
            raise GenbenchError(f"{source}: {k} is {header[k][0]} {header[k][1]}, the model's config implies "
                                f"{_ST_DTYPES.get(dtype)} {shape}")


def pretrained_folder(path: str | os.PathLike) -> Path:
    """`path` if it holds an exported model, else `path/EXPORT_SUBDIR` if that does (a run folder)."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() and (path / EXPORT_SUBDIR / CONFIG_FILE).is_file():
        return path / EXPORT_SUBDIR
    return path


def read_pretrained_config(folder: str | os.PathLike) -> tuple[type[GenerativeModel], Any]:
    """(model class, validated config) of an exported model folder, without reading its weights."""
    return _class_and_config(_read_meta(Path(folder)), Path(folder))


def _read_meta(folder: Path) -> dict:
    where = folder / CONFIG_FILE
    meta = read_json(where)
    if not isinstance(meta, dict) or not {"model", "config", "weights"} <= set(meta):
        raise GenbenchError(f"{where}: not a genbench model config (needs model, config, weights)")
    return require_fields(meta, where, model=str, config=dict, weights=dict)


def _class_and_config(meta: dict, folder: Path) -> tuple[type[GenerativeModel], Any]:
    cls = get_model_class(meta["model"])
    return cls, from_dict(cls.Config, meta["config"], where=f"{folder / CONFIG_FILE}: config")


def load_state(module: nn.Module, state: dict[str, Tensor], source) -> None:
    """module.load_state_dict(state) after checking that names and shapes match, naming `source`."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise GenbenchError(
            f"{source}: weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise GenbenchError(f"{source}: {k} has shape {tuple(v.shape)}, the model expects {tuple(expected[k].shape)}")
    module.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# the registry: `genbench train <name>` finds a model class here by name

MODELS: dict[str, type[GenerativeModel]] = {}

# name -> module that registers it, in the canonical order; imported lazily so `genbench models` stays fast
_MODULES = {
    "ae": "genbench.models.ae",
    "vae": "genbench.models.vae",
    "vqvae": "genbench.models.vqvae",
    "vqgan": "genbench.models.vqgan",
    "ddpm": "genbench.models.ddpm",
    "ldm": "genbench.models.ldm",
}


def register(name: str):
    def wrap(cls):
        if not issubclass(cls, GenerativeModel):
            raise TypeError(f"model {name!r}: {cls.__name__} must subclass GenerativeModel")
        cls.name = name
        MODELS[name] = cls
        return cls

    return wrap


def available_models() -> list[str]:
    """Models whose module exists in this installation, in the canonical order."""
    return [name for name, module in _MODULES.items() if importlib.util.find_spec(module) is not None]


def get_model_class(name: str) -> type[GenerativeModel]:
    if name not in MODELS:
        if name not in _MODULES or importlib.util.find_spec(_MODULES[name]) is None:
            raise GenbenchError(f"unknown model {name!r}; available models: {', '.join(available_models())}")
        importlib.import_module(_MODULES[name])
    return MODELS[name]
