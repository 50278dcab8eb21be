"""Run 2:4 linear layers on sparse tensor cores (torch.sparse.to_sparse_semi_structured).

Needs CUDA (Ampere or newer) and fp16/bf16 weights. Checkpoints stay dense (the mask is the set of
zeros); this converts a loaded 2:4 model in place for inference only.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from plmtool.errors import PlmtoolError
from plmtool.prune.patterns import parse_pattern, verify
from plmtool.prune.sequential import block_linears, decoder_layers

log = logging.getLogger("plmtool")


def to_semi_structured(model: nn.Module, exclude: tuple[str, ...] = ()) -> int:
    """Swap every 2:4-sparse block linear's weight for a SparseSemiStructuredTensor.
    Returns the number of layers converted; layers that are not 2:4 stay dense."""
    from torch.sparse import to_sparse_semi_structured

    if not torch.cuda.is_available():
        raise PlmtoolError("2:4 sparse tensor cores need a CUDA GPU")
    two_four = parse_pattern("2:4")
    converted = 0
    for block in decoder_layers(model):
        for name, lin in block_linears(block, exclude).items():
            w = lin.weight.data
            if w.dtype not in (torch.float16, torch.bfloat16) or not w.is_cuda:
                raise PlmtoolError(f"2:4 kernels need fp16/bf16 weights on CUDA (got {w.dtype} on {w.device})")
            if verify(w, two_four) is not None:
                continue
            lin.weight = nn.Parameter(to_sparse_semi_structured(w), requires_grad=False)
            converted += 1
    log.info("converted %d linear layers to semi-structured 2:4", converted)
    return converted
