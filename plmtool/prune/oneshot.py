"""One-shot pruning of a whole model with magnitude, Wanda or SparseGPT (block by block)."""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from plmtool.errors import PlmtoolError
from plmtool.progress import track
from plmtool.prune.config import METHODS, Pattern, PruneConfig
from plmtool.prune.magnitude import prune_magnitude
from plmtool.prune.sequential import block_linears, decoder_layers, walk
from plmtool.prune.sparsegpt import prune_sparsegpt
from plmtool.prune.stats import InputStats
from plmtool.prune.wanda import prune_wanda

log = logging.getLogger("plmtool")

STATS_NEEDED = {"magnitude": "none", "wanda": "norms", "sparsegpt": "gram"}  # one entry per METHODS


@torch.no_grad()
def prune_linear(weight: torch.Tensor, stats: Optional[InputStats], pattern: Pattern, opts: PruneConfig) -> tuple[torch.Tensor, dict]:
    """Prune one weight matrix with `opts.method`; returns (new weight in fp32, info)."""
    if opts.method == "magnitude":
        w, _ = prune_magnitude(weight.float(), pattern)
        return w, {}
    if stats is None:
        raise RuntimeError(f"{opts.method} needs calibration statistics")
    if opts.method == "wanda":
        w, _ = prune_wanda(weight, stats.sq_norm, pattern)
        return w.float(), {}
    res = prune_sparsegpt(weight, stats.gram, pattern, blocksize=opts.blocksize, percdamp=opts.percdamp, cuda_graphs=opts.cuda_graphs)
    return res.weight, {"sparsegpt_error": res.error, "damp": res.damp}


def sparsity_of(weight: torch.Tensor) -> float:
    return float((weight == 0).float().mean())


@torch.no_grad()
def prune_model(model: nn.Module, calib_ids: Optional[torch.Tensor], opts: PruneConfig, device: Optional[str] = None) -> dict:
    """Prune every linear layer of every decoder block in place with `opts.method` to
    `opts.pattern` (blocks run on `device`, see `walk`); returns per-layer info
    {"layers.<i>.<name>": {"sparsity": ..., ...}}."""
    pattern = opts.parsed_pattern
    info: dict[str, dict] = {}

    def prune_one(i: int, name: str, lin: nn.Linear, stats: Optional[InputStats]) -> None:
        w, extra = prune_linear(lin.weight.data, stats, pattern, opts)
        lin.weight.data = w.to(lin.weight.dtype)
        info[f"layers.{i}.{name}"] = {"sparsity": sparsity_of(lin.weight.data), **extra}

    if opts.method == "magnitude":
        # no calibration: each weight on its own, where it lives
        for i, block in enumerate(track(list(decoder_layers(model)), description="magnitude pruning")):
            for name, lin in block_linears(block, opts.exclude).items():
                prune_one(i, name, lin, None)
        return info
    if calib_ids is None:
        raise PlmtoolError(f"prune.method={opts.method} needs calibration data")

    fuse = opts.method == "sparsegpt" and opts.fuse

    def process(i: int, block: nn.Module, linears: dict, stats: dict) -> None:
        for names in (shared_input_groups(linears, stats) if fuse else [[name] for name in linears]):
            if len(names) > 1:
                prune_sparsegpt_fused(i, [(n, linears[n]) for n in names], stats[names[0]], pattern, opts, info)
                continue
            prune_one(i, names[0], linears[names[0]], stats.get(names[0]))

    walk(model, calib_ids, process, stats=STATS_NEEDED[opts.method], opts=opts, device=device, description=f"{opts.method} pruning")
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
def prune_sparsegpt_fused(i: int, named: list, stats: InputStats, pattern: Pattern, opts: PruneConfig, info: dict) -> None:
    """SparseGPT on layers sharing one Hessian, stacked along rows (rows are independent given
    H, so this equals pruning each alone; see `prune_sparsegpt`'s row_groups)."""
    rows = tuple(lin.weight.shape[0] for _, lin in named)
    stacked = torch.cat([lin.weight.data for _, lin in named], dim=0)
    res = prune_sparsegpt(stacked, stats.gram, pattern, blocksize=opts.blocksize, percdamp=opts.percdamp,
                          cuda_graphs=opts.cuda_graphs, row_groups=rows)
    del stacked
    for (name, lin), w, err in zip(named, res.weight.split(rows), res.row_errors.split(rows)):
        lin.weight.data = w.to(lin.weight.dtype).contiguous()
        info[f"layers.{i}.{name}"] = {"sparsity": sparsity_of(lin.weight.data), "sparsegpt_error": float(err.sum()), "damp": res.damp}
