"""Scoped TF32 settings for the matmuls of the pruning code (each restores the caller's setting)."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def exact_fp32():
    """TF32 off inside (the reference sets it globally off); restores the caller's settings."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


class tf32_matmuls:
    """TF32 matmuls allowed (or not) inside, restoring the caller's setting."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        self.old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.enabled
        return self

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.old
        return False
