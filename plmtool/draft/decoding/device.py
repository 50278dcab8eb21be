"""Device-side helpers of the decoding engine: synchronise, name the program behind a device fault,
capture a step as a CUDA graph with its own cuBLAS workspace. All but the capture are no-ops
without CUDA."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


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


def own_cublas_workspace() -> None:
    """Call right before a capture: drop PyTorch's cached cuBLAS workspaces so the captured GEMMs
    get a workspace allocated inside the capture, i.e. owned by the graph's private memory pool.

    A captured GEMM bakes in the address of the workspace cuBLAS had for the capture stream. If
    that workspace was allocated outside the capture it lives in the ordinary pool, and anything
    that later clears the workspaces (torch.compile's CUDA-graph trees do, e.g. the static-cache
    `generate()` that the benchmark runs between our captures and our replays) frees it: the graph
    then writes into memory that another tensor owns or that `empty_cache()` unmapped (an illegal
    access or 'unspecified launch failure' at a later replay). Workspaces of graphs captured
    before stay in their own pools, which live as long as their graphs."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None and torch.cuda.is_available():
        clear()


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


def capture_graph(run: Callable[[], Any], pool=None, before: Callable[[], None] = lambda: None,
                  warmups: int = 2) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Capture `run()` as a CUDA graph; returns (graph, run's output, whose tensors the replays
    refill). `before()` resets whatever state `run` advances, before each warm-up and the capture.
    The warm-ups run on a side stream outside the graph (allocator, cuBLAS handles, compilation),
    and the capture gets its own cuBLAS workspace (see `own_cublas_workspace`)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            before()
            run()
    torch.cuda.current_stream().wait_stream(stream)
    before()
    graph = torch.cuda.CUDAGraph()
    own_cublas_workspace()
    with torch.cuda.graph(graph, pool=pool):
        out = run()
    return graph, out
