"""Device-side helpers of the decoding engine: name the program behind a device fault, keep cuDNN
attention out of variable-shape calls. Capturing programs as CUDA graphs is plmtool/cuda_graph.py's."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class DeviceStepError(RuntimeError):
    """A device fault surfaced right after one program ran (with `EngineOptions.sync_check`)."""


def check_device(what: str) -> None:
    """On CUDA: synchronise and name `what` if the device faulted. Called after every program
    when `EngineOptions.sync_check` is on: kernels run asynchronously, so without it a fault is
    reported by whatever synchronises next (often another method's timer) instead of the program
    that caused it."""
    if torch.cuda.is_available():
        try:
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - re-raised with the program's name
            raise DeviceStepError(f"device fault after {what}: {type(e).__name__}: {e}") from e


@contextlib.contextmanager
def variable_shape_attention() -> Iterator[None]:
    """Context for SDPA calls whose shapes change from request to request (the target's and the
    drafter's prefill, the eager drafter step): cuDNN attention off, the other backends as they were.

    cuDNN attention builds an execution plan for each new shape, and that is slow: on an H200
    (torch 2.11) prompts of lengths no call had seen before added 0.3 ms per decoding step to the
    plain loop and 1.3 ms to Amphista's speculative loop (256-token answers, i.e. ~75 and ~290 ms
    per request), and nothing with cuDNN attention off (`scripts/profile_draft_step.py
    --new-lengths 5 --cudnn-sdpa 0|1`). Captured steps have one shape each, keep every backend and
    build their plan once, at capture. The switch is process-wide, like every SDPA backend flag;
    engines decode one request at a time, so nothing else runs attention meanwhile."""
    was = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)
