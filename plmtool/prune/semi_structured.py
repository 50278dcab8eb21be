"""Run 2:4 linear layers on sparse tensor cores (torch.sparse.to_sparse_semi_structured).

Needs CUDA (Ampere or newer) and fp16/bf16 weights. Checkpoints stay dense (the mask is the set of
zeros); this converts a loaded 2:4 model in place for inference only.

The semi-structured tensor supports `linear` only on 2-D inputs (a 3-D [batch, tokens, hidden]
input makes aten decompose the matmul into an `expand` of the weight, which the sparse tensor
rejects), so each converted layer is swapped for `SemiStructuredLinear`, which flattens the
leading dimensions around the call.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from plmtool.errors import PlmtoolError
from plmtool.prune.patterns import parse_pattern, verify
from plmtool.prune.sequential import block_linears, decoder_layers

log = logging.getLogger("plmtool")


class SemiStructuredLinear(nn.Module):
    """A linear layer whose weight is a 2:4 semi-structured tensor; inputs of any rank."""

    def __init__(self, linear: nn.Linear, convert: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        super().__init__()
        if convert is None:
            from torch.sparse import to_sparse_semi_structured as convert
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(convert(linear.weight.data), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = F.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        return y.reshape(*lead, self.out_features)


def to_semi_structured(model: nn.Module, exclude: tuple[str, ...] = (), convert=None) -> int:
    """Swap every 2:4-sparse block linear for a `SemiStructuredLinear`. Returns the number of
    layers converted; layers that are not 2:4 stay dense. `convert` replaces the conversion
    (tests on CPU pass the identity)."""
    if convert is None and not torch.cuda.is_available():
        raise PlmtoolError("2:4 sparse tensor cores need a CUDA GPU")
    two_four = parse_pattern("2:4")
    converted = 0
    for block in decoder_layers(model):
        for name, lin in block_linears(block, exclude).items():
            w = lin.weight.data
            if convert is None and (w.dtype not in (torch.float16, torch.bfloat16) or not w.is_cuda):
                raise PlmtoolError(f"2:4 kernels need fp16/bf16 weights on CUDA (got {w.dtype} on {w.device})")
            if verify(w, two_four) is not None:
                continue
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, child, SemiStructuredLinear(lin, convert))
            converted += 1
    log.info("converted %d linear layers to semi-structured 2:4", converted)
    return converted
