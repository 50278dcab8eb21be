"""One-shot pruning of a whole model with magnitude, Wanda or SparseGPT (block by block)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from plmtool.errors import PlmtoolError
from plmtool.progress import track
from plmtool.prune.magnitude import prune_magnitude
from plmtool.prune.patterns import Pattern
from plmtool.prune.sequential import WalkOptions, block_linears, decoder_layers, walk
from plmtool.prune.sparsegpt import prune_sparsegpt
from plmtool.prune.stats import InputStats
from plmtool.prune.wanda import prune_wanda

log = logging.getLogger("plmtool")

METHODS = ("magnitude", "wanda", "sparsegpt")
STATS_NEEDED = {"magnitude": "none", "wanda": "norms", "sparsegpt": "gram"}


@dataclass
class SparseGptOptions:
    blocksize: int = 128
    percdamp: float = 0.01
    cuda_graphs: bool = True


@dataclass
class OneShotOptions:
    method: str = "wanda"
    walk: WalkOptions = field(default_factory=WalkOptions)
    sparsegpt: SparseGptOptions = field(default_factory=SparseGptOptions)


def check_method(method: str) -> None:
    if method not in METHODS:
        raise PlmtoolError(f"prune.method={method}: unknown method (choose from {', '.join(METHODS)})")


@torch.no_grad()
def prune_linear(
    method: str, weight: torch.Tensor, stats: Optional[InputStats], pattern: Pattern, sgpt: SparseGptOptions
) -> tuple[torch.Tensor, dict]:
    """Prune one weight matrix; returns (new weight in fp32, info)."""
    if method == "magnitude":
        w, _ = prune_magnitude(weight.float(), pattern)
        return w, {}
    if stats is None:
        raise RuntimeError(f"{method} needs calibration statistics")
    if method == "wanda":
        w, _ = prune_wanda(weight, stats.sq_norm, pattern)
        return w.float(), {}
    if method == "sparsegpt":
        res = prune_sparsegpt(weight, stats.gram, pattern, blocksize=sgpt.blocksize, percdamp=sgpt.percdamp, cuda_graphs=sgpt.cuda_graphs)
        return res.weight, {"sparsegpt_error": res.error, "damp": res.damp}
    raise PlmtoolError(f"prune.method={method}: unknown method (choose from {', '.join(METHODS)})")


def sparsity_of(weight: torch.Tensor) -> float:
    return float((weight == 0).float().mean())


@torch.no_grad()
def prune_model(model: nn.Module, calib_ids: Optional[torch.Tensor], pattern: Pattern, opts: OneShotOptions) -> dict:
    """Prune every linear layer of every decoder block in place; returns per-layer info
    {"layers.<i>.<name>": {"sparsity": ..., ...}}."""
    check_method(opts.method)
    info: dict[str, dict] = {}
    if opts.method == "magnitude":
        # no calibration: each weight on its own, where it lives
        for i, block in enumerate(track(list(decoder_layers(model)), description="magnitude pruning")):
            for name, lin in block_linears(block, opts.walk.exclude).items():
                w, extra = prune_linear("magnitude", lin.weight.data, None, pattern, opts.sparsegpt)
                lin.weight.data = w.to(lin.weight.dtype)
                info[f"layers.{i}.{name}"] = {"sparsity": sparsity_of(lin.weight.data), **extra}
        return info
    if calib_ids is None:
        raise PlmtoolError(f"prune.method={opts.method} needs calibration data")

    def process(i: int, block: nn.Module, linears: dict, stats: dict) -> None:
        for name, lin in linears.items():
            w, extra = prune_linear(opts.method, lin.weight.data, stats.get(name), pattern, opts.sparsegpt)
            lin.weight.data = w.to(lin.weight.dtype)
            info[f"layers.{i}.{name}"] = {"sparsity": sparsity_of(lin.weight.data), **extra}

    walk(model, calib_ids, process, stats=STATS_NEEDED[opts.method], opts=opts.walk, description=f"{opts.method} pruning")
    return info
