"""edgetok: efficient transformers to NVIDIA edge and desktop GPUs."""

__version__ = "0.1.0"
