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
    fuse: bool = True  # prune layers fed the same input (q/k/v, gate/up) in one run; same result


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

    def prune_one(i: int, name: str, lin: nn.Linear, stats: Optional[InputStats]) -> None:
        w, extra = prune_linear(opts.method, lin.weight.data, stats, pattern, opts.sparsegpt)
        lin.weight.data = w.to(lin.weight.dtype)
        info[f"layers.{i}.{name}"] = {"sparsity": sparsity_of(lin.weight.data), **extra}

    if opts.method == "magnitude":
        # no calibration: each weight on its own, where it lives
        for i, block in enumerate(track(list(decoder_layers(model)), description="magnitude pruning")):
            for name, lin in block_linears(block, opts.walk.exclude).items():
                prune_one(i, name, lin, None)
        return info
    if calib_ids is None:
        raise PlmtoolError(f"prune.method={opts.method} needs calibration data")

    fuse = opts.method == "sparsegpt" and opts.sparsegpt.fuse

    def process(i: int, block: nn.Module, linears: dict, stats: dict) -> None:
        for names in (shared_input_groups(linears, stats) if fuse else [[name] for name in linears]):
            if len(names) > 1:
                prune_sparsegpt_fused(i, [(n, linears[n]) for n in names], stats[names[0]], pattern, opts.sparsegpt, info)
                continue
            prune_one(i, names[0], linears[names[0]], stats.get(names[0]))

    walk(model, calib_ids, process, stats=STATS_NEEDED[opts.method], opts=opts.walk, description=f"{opts.method} pruning")
    return info


def shared_input_groups(linears: dict, stats: dict) -> list[list[str]]:
    """Linear names grouped by the statistics object they share (the walker gives layers fed the
    same tensor one accumulator), in block order."""
    groups: dict = {}
    for name in linears:
        st = stats.get(name)
        groups.setdefault(id(st) if st is not None else ("alone", name), []).append(name)
    return list(groups.values())


@torch.no_grad()
def prune_sparsegpt_fused(i: int, named: list, stats: InputStats, pattern: Pattern, sgpt: SparseGptOptions, info: dict) -> None:
    """SparseGPT on layers sharing one Hessian, stacked along rows (rows are independent given
    H, so this equals pruning each alone; see `prune_sparsegpt`'s row_groups)."""
    rows = tuple(lin.weight.shape[0] for _, lin in named)
    stacked = torch.cat([lin.weight.data for _, lin in named], dim=0)
    res = prune_sparsegpt(stacked, stats.gram, pattern, blocksize=sgpt.blocksize, percdamp=sgpt.percdamp,
                          cuda_graphs=sgpt.cuda_graphs, row_groups=rows)
    del stacked
    for (name, lin), w, err in zip(named, res.weight.split(rows), res.row_errors.split(rows)):
        lin.weight.data = w.to(lin.weight.dtype).contiguous()
        info[f"layers.{i}.{name}"] = {"sparsity": sparsity_of(lin.weight.data), "sparsegpt_error": float(err.sum()), "damp": res.damp}
