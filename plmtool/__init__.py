"""plmtool: compress and accelerate pre-trained language models."""

__version__ = "0.1.0"
