"""Captured programs: CUDA graphs checked against the eager computation they stand for.

A captured CUDA graph replays fixed kernels on fixed addresses, which makes small, launch-bound
work (a decoding step, a SparseGPT column block) fast, and fails silently where the capture went
wrong (a miscompiled kernel, padding that leaks) or where a buffer it was bound to was re-created
(the replay then reads and writes freed memory). Every graph user (the decoding engine's programs
in plmtool/draft/decoding/, SparseGPT's column blocks) goes through this module:

    graph = capture_checked(what, fallback, capture=lambda: CapturedGraph(name, run, buffers),
                            check=compare the replay with eager)     # None: warned, runs eagerly
    out = graph.replay()                                             # refuses re-created buffers

* `capture_graph` is the one function that captures (tests replace it with a CPU stand-in);
* `CapturedGraph` keeps the graph, its outputs and the addresses of the persistent tensors it is
  bound to, and refuses to replay once one of them was re-created;
* `compare` measures a replay against the eager computation within `TOLERANCES`, one table for
  every program;
* `capture_checked` falls back when capture raises or the check fails: one warning
  `<what> disabled (<error>); <fallback>`, the caller's clean-up, a device synchronisation.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence, TypeVar

import torch

log = logging.getLogger("plmtool")
T = TypeVar("T")

# Relative error (`relative_error`) allowed between a replay and the eager computation it stands
# for, per kind of program, for fp32 and for half precision (bf16 / fp16: any other dtype).
TOLERANCES: dict[str, dict[str, float]] = {
    # the eager kernels replayed at the same shapes: equal up to nondeterministic reductions, and
    # in fp32 up to another solver's rounding (SparseGPT's block replays an unrolled substitution
    # in place of the batched triangular solve it is checked against)
    "eager": {"fp32": 1e-4, "half": 2e-2},
    # torch.compile'd kernels: fused, with fp32 intermediates, so half precision rounds differently
    "compiled": {"fp32": 1e-3, "half": 5e-2},
    # a whole target forward (through every layer), compiled or at padded shapes against the
    # unpadded eager forward (GEMM tiling and the attention span differ), and the drafter's padded
    # prefill likewise: rounding differences grow through the layers. Measured on SmolLM2-135M in
    # bf16 on the CPU (20 draws, 1- and 65-node steps): a correct compiled step stays within 0.03
    # of eager (worst of logits, hidden states, keys, values), while a step with one layer's
    # weights for all, rotary positions off by 3, a mask that sees the whole cache, k/v written
    # one slot off or into the next layer's cache was off by 0.45 or more on every draw.
    "forward": {"fp32": 1e-3, "half": 0.1},
}


def tolerance(kind: str, dtype: torch.dtype) -> float:
    """The relative error a replay of `kind` (a key of TOLERANCES) may differ by in `dtype`."""
    row = TOLERANCES[kind]
    return row["fp32"] if dtype == torch.float32 else row["half"]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in fp32: how a replay is compared with the eager computation
    (NaN when either holds one, which every `err <= tol` test rejects)."""
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12))


def compare(pairs: Sequence[tuple[str, torch.Tensor, torch.Tensor]], tol: float) -> tuple[dict[str, float], str | None]:
    """Relative errors of (name, replayed, eager) pairs, and what is wrong (the names over `tol`)
    or None. Every error is returned, not just the first over the bar (warnings and tests read them)."""
    errors = {name: relative_error(got, want) for name, got, want in pairs}
    bad = [f"{name} {err:.3g}" for name, err in errors.items() if not err <= tol]  # NaN fails too
    return errors, (f"{', '.join(bad)} differ from eager (relative error > {tol})" if bad else None)


# ----------------------------------------------------------------------------- capture


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


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


def capture_graph(run: Callable[[], Any], pool=None, before: Callable[[], None] = lambda: None,
                  warmups: int = 2) -> tuple[Any, Any]:
    """Capture `run()` as a CUDA graph; returns (graph, run's output, whose tensors the replays
    refill). `before()` resets whatever state `run` advances, before each warm-up and the capture.
    The warm-ups run on a side stream outside the graph (allocator, cuBLAS handles, compilation),
    and the capture gets its own cuBLAS workspace (see `own_cublas_workspace`). The one function
    that captures: CPU tests replace it with a stand-in whose replay reruns `run`."""
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


def new_pool():
    """A graph memory pool for captures that never run at once and share memory (None without
    CUDA, where only stand-in captures exist)."""
    return torch.cuda.graph_pool_handle() if torch.cuda.is_available() else None


class CapturedGraph:
    """`run` captured as a CUDA graph, its outputs (`out`, refilled by each replay) and the
    addresses of the persistent tensors it reads or writes (`buffers()`: caches, static inputs,
    index tables). A replay after one of them was re-created would touch freed memory, so
    `replay` refuses it."""

    def __init__(self, name: str, run: Callable[[], Any], buffers: Callable[[], Sequence[torch.Tensor]], pool=None,
                 before: Callable[[], None] = lambda: None):
        self.name = name
        self._buffers = buffers
        self.cuda_graph, self.out = capture_graph(run, pool, before)
        self.addresses = self._signature()

    def _signature(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for t in self._buffers())

    def check_addresses(self) -> None:
        if self._signature() != self.addresses:
            raise RuntimeError(f"a buffer of the captured {self.name} was re-created after capture; refusing to replay")

    def replay(self, checked: bool = True) -> Any:
        """Replay and return the outputs; `checked=False` where the caller has just checked the
        same buffers (programs launched back to back)."""
        if checked:
            self.check_addresses()
        self.cuda_graph.replay()
        return self.out


def capture_checked(what: str, fallback: str, capture: Callable[[], T], check: Callable[[T], str | None] | None = None,
                    cleanup: Callable[[], None] = lambda: None) -> T | None:
    """`capture()`, then `check(captured)` (what is wrong with its replay, or None). When either
    fails: warn `<what> disabled (<error>); <fallback>`, run `cleanup()` (state the capture or
    the check left behind), synchronise, and return None: the caller runs eagerly."""
    try:
        captured = capture()
        problem = check(captured) if check is not None else None
        if problem:
            raise RuntimeError(problem)
        return captured
    except Exception as e:  # capture unsupported here or replay wrong: fall back, say so
        log.warning("%s disabled (%s: %s); %s", what, type(e).__name__, e, fallback)
        cleanup()
        synchronize()
        return None
