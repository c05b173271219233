"""genbench: classic deep generative models from the math up, compared side by side."""

__version__ = "0.1.0"
