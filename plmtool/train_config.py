"""The trainer settings every training command shares (`trainer.*`): one schema, which a command's
own trainer schema extends, and the checks no loop can do without.

Plain dataclasses, no torch or hydra: configs are composed and checked before anything heavy loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from plmtool.errors import PlmtoolError

PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class TrainerConfig:
    """The settings of a training loop; a command's own trainer schema extends it."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 elsewhere | bf16 | fp32
    grad_clip: float = 1.0  # gradient norm clipped to this (0 = no clipping)
    log_every: int = 10  # training loss every N steps (0 = never)
    save_every: int = 200  # resumable checkpoint every N steps (0 = only at the end and at the time limit)


def check_trainer(t: Any) -> None:
    """PlmtoolError for trainer settings no loop can run (before anything is loaded)."""
    if t.precision not in PRECISIONS:
        raise PlmtoolError(f"trainer.precision must be {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}, got '{t.precision}'")
    if t.lr <= 0:
        raise PlmtoolError(f"trainer.lr must be > 0, got {t.lr}")
    for name in ("max_steps", "batch_size", "grad_accum"):
        if getattr(t, name) < 1:
            raise PlmtoolError(f"trainer.{name} must be >= 1, got {getattr(t, name)}")
    for name in ("warmup_steps", "weight_decay", "grad_clip", "log_every", "save_every"):
        if getattr(t, name) < 0:
            raise PlmtoolError(f"trainer.{name} must be >= 0, got {getattr(t, name)}")
