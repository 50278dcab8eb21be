"""What the training loops of `draft train` and `experts train` share: the learning-rate schedule,
autocast, the random state, the resumable checkpoint and the time limit (their settings:
plmtool.train_config).

A loop built from them (plmtool.draft.train, plmtool.experts.lora):

    optimizer = torch.optim.AdamW(params, ...)
    scheduler = cosine_schedule(optimizer, warmup, steps, floor)
    checkpoint = Checkpoint(path, config, ...)       # config: what a resume must match
    state = checkpoint.load()                        # None, or the state of an earlier call
    if state: model.load(state["model"]); restore(state, optimizer, scheduler); start = state["step"]
    done = run_steps(start, steps, step, save=..., save_every=..., limit=TimeLimit(...))
    checkpoint.save(done, model_state, optimizer, scheduler, extra)

No hydra here: scripts on a bare GPU box train through it.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from plmtool.errors import PlmtoolError

CHECKPOINT_VERSION = 2


# ----------------------------------------------------------------------------- schedule, precision


def lr_factor(step: int, warmup: int, total: int, floor: float = 0.0) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay from 1 to `floor` at step `total`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def cosine_schedule(optimizer, warmup: int, total: int, floor: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, warmup=warmup, total=total, floor=floor))


def optimizer_step(params, optimizer, scheduler, grad_clip: float) -> None:
    """Clip the gradient norm (when `grad_clip` > 0), update, advance the schedule."""
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    scheduler.step()


def resolved_precision(precision: str, device: str | torch.device) -> str:
    """`auto` -> bf16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def autocast(device: str | torch.device, precision: str):
    """bf16 autocast on the device for precision `bf16`, none otherwise."""
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


# ----------------------------------------------------------------------------- random state


def torch_rng_state() -> dict[str, Any]:
    """The global torch generators (dropout and initialisation draw from them): the CPU's and,
    when CUDA is in use, the current device's (asking for every device would open a context on each)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_torch_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------- time limit


def now() -> float:
    """The clock time limits read (one place, so that tests can move time forward)."""
    return time.time()


class TimeLimit:
    """Where a training call stops early: `seconds` after it started or at `deadline` (a `now()`
    value), whichever comes first; never when neither is given. Under DDP every rank takes rank
    0's answer: all must stop at the same step."""

    def __init__(self, seconds: float = 0.0, deadline: float | None = None, device: str | torch.device = "cpu"):
        ends = ([now() + seconds] if seconds else []) + ([deadline] if deadline is not None else [])
        self.end = min(ends) if ends else None
        self.device = device

    def reached(self) -> bool:
        if self.end is None:
            return False
        over = float(now() >= self.end)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            t = torch.tensor([over], device=self.device)
            torch.distributed.broadcast(t, src=0)
            over = float(t.item())
        return over > 0


def run_steps(start: int, total: int, step: Callable[[int], None], *, description: str,
              save: Callable[[int], None] | None = None, save_every: int = 0, limit: TimeLimit | None = None) -> int:
    """Call `step(i)` for i in [start, total); `save(done)` after every `save_every`-th step but
    the last. Stops early when `limit` is reached, checked after each step but the last (so every
    call makes progress). Returns the number of steps done; the caller saves the final state."""
    from plmtool.progress import track

    for i in track(range(start, total), description, total=total - start):
        step(i)
        done = i + 1
        if done == total:
            break
        if limit is not None and limit.reached():
            return done
        if save is not None and save_every and done % save_every == 0:
            save(done)
    return max(start, total)


# ----------------------------------------------------------------------------- checkpoint


_ABSENT = object()


def _differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """`name: saved there, current now` for each differing field (nested dicts by dotted names)."""
    out = []
    for k in sorted(set(saved) | set(current), key=str):
        a, b = saved.get(k, _ABSENT), current.get(k, _ABSENT)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b or (a is _ABSENT) != (b is _ABSENT):
            out.append(f"{prefix}{k}: {None if a is _ABSENT else a!r} there, {None if b is _ABSENT else b!r} now")
    return out


class Checkpoint:
    """A resumable training state in one file: the trained weights, optimizer, scheduler, step,
    random state, what the caller adds (`extra`), and `config`, what must match for a later call
    to continue it (other settings or data: refused, naming the fields that differ)."""

    def __init__(self, path: str | Path, config: dict[str, Any], mismatch: str, remedy: str):
        self.path, self.config = Path(path), config
        self.mismatch, self.remedy = mismatch, remedy  # how a refusal reads: what differs, what to do

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none."""
        if not self.path.is_file():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state.get("version") != CHECKPOINT_VERSION:
            raise PlmtoolError(f"checkpoint {self.path} has format version {state.get('version')}, expected "
                               f"{CHECKPOINT_VERSION} (written by another plmtool version): {self.remedy}")
        diff = _differences(state["config"], self.config)
        if diff:
            raise PlmtoolError(f"checkpoint {self.path} was written with {self.mismatch} ({'; '.join(diff)}): {self.remedy}")
        return state

    def save(self, step: int, model_state: dict[str, torch.Tensor], optimizer, scheduler,
             extra: dict[str, Any] | None = None) -> float:
        """Write the state atomically; returns the seconds it took."""
        from plmtool.io import atomic_write

        t = time.perf_counter()
        state = {"version": CHECKPOINT_VERSION, "config": self.config, "step": step, "model": model_state,
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": torch_rng_state(),
                 "extra": extra or {}}
        atomic_write(self.path, lambda tmp: torch.save(state, tmp))
        return time.perf_counter() - t


def restore(state: dict[str, Any], optimizer, scheduler) -> None:
    """Continue from a loaded state: optimizer, schedule and the random numbers the uninterrupted
    run would draw next (the caller loads the weights, which it alone knows how to place)."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_torch_rng_state(state["rng"])
