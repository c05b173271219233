"""Model registry: `genbench train <name>` finds a model class here by name."""

from __future__ import annotations

import importlib

from .errors import GenbenchError

MODELS: dict[str, type] = {}

# name -> module that registers it; imported lazily so `genbench models` stays fast
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
        cls.name = name
        MODELS[name] = cls
        return cls

    return wrap


def available_models() -> list[str]:
    """Models whose module exists in this installation, in the canonical order."""
    names = []
    for name, module in _MODULES.items():
        if importlib.util.find_spec(module) is not None:
            names.append(name)
    return names


def get_model_class(name: str) -> type:
    if name not in MODELS:
        if name not in _MODULES or importlib.util.find_spec(_MODULES[name]) is None:
            raise GenbenchError(f"unknown model {name!r}; available models: {', '.join(available_models())}")
        importlib.import_module(_MODULES[name])
    return MODELS[name]
