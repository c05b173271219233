"""The six models, one file each, on one contract (base.py); their budgets side by side in presets.py."""

from .base import GenerativeModel, available_models, get_model_class, register

__all__ = ["GenerativeModel", "available_models", "get_model_class", "register"]
