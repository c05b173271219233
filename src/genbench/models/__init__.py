"""One file per model family; shared building blocks in nets.py, quantizer.py, transformer.py, unet.py."""
