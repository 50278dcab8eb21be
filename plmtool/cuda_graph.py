"""Captured programs: CUDA graphs checked against the eager computation they stand for.

A captured CUDA graph replays fixed kernels on fixed addresses, which makes small, launch-bound
work (a decoding step, a SparseGPT column block) fast, and fails silently where the capture went
wrong (a miscompiled kernel, padding that leaks) or where a buffer it was bound to was re-created
(the replay then reads and writes freed memory). Every graph user therefore compares a replay with
the eager computation at capture, within one table of tolerances (`TOLERANCES`).
"""

from __future__ import annotations

import torch

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
