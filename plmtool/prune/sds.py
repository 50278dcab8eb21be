"""Sparse-Dense-Sparse (SDS): re-dense, re-prune, adjust — per linear layer, in Gram form.

The per-layer objective of both optimisation steps is the output reconstruction error against the
dense layer, plus (re-dense only) L1 / L2 penalties:

    f(W) = ||(W_d - W) X||^2 / ||W_d X||^2  +  l1 * ||W||_1 / ||W_d||_1  +  l2 * ||W||^2 / ||W_d||^2

It is quadratic in W: ||(W_d - W) X||^2 = tr(D H D^T) with D = W - W_d and H = X X^T, so once the
d_in x d_in Gram matrix is accumulated an iteration costs one (d_out x d_in) @ (d_in x d_in)
matmul and never touches the calibration tokens (gradient 2 D H / ||W_d X||^2). Every term is
normalised by its value at the dense weights, so l1 = l2 = 0.1 means the same thing for every layer
size and weight scale (the SDS paper's lambda = 0.1 gives no scale, so we chose this one; the default
0.01 comes from the SmolLM2 benchmark in docs/benchmarks/prune.md, `experiment=paper` keeps 0.1).

Step sizes: Adam works on W / rms(W_d), so `lr` is a step relative to the layer's weight scale;
SGD takes steps of lr / L with L the Lipschitz constant of the smooth part (largest eigenvalue of
2H / ||W_d X||^2, plus the L2 term), so lr = 1 is the classic safe step; its L1 term is applied as a
proximal (soft-threshold) step. A NaN/inf or diverging loss restores the best weights seen, halves
the step, resets the optimiser and is logged (and counted in the layer's report).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

from plmtool.prune.config import OptimConfig, PruneConfig
from plmtool.prune.patterns import Pattern, magnitude_reselect
from plmtool.prune.precision import tf32_matmuls

log = logging.getLogger("plmtool")


@dataclass
class GuardLog:
    retries: int = 0
    events: list = field(default_factory=list)


class Reconstruction:
    """||(W - W_d) X||^2 / ||W_d X||^2 evaluated through H = X X^T (any positive scale of H)."""

    def __init__(self, dense: torch.Tensor, H: torch.Tensor):
        self.dense = dense.float()
        self.H = H.float()
        self.norm = float(torch.sum((self.dense @ self.H) * self.dense))
        if not self.norm > 0:
            self.norm = 1.0  # an all-zero layer or input: any loss scale works

    def residual(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        D = W - self.dense
        return D, D @ self.H

    def loss(self, W: torch.Tensor) -> float:
        D, DH = self.residual(W)
        return float(torch.sum(DH * D)) / self.norm

    def loss_and_grad(self, W: torch.Tensor) -> tuple[float, torch.Tensor]:
        D, DH = self.residual(W)
        return float(torch.sum(DH * D)) / self.norm, DH.mul_(2.0 / self.norm)

    def lipschitz(self, iters: int = 30) -> float:
        """2 * largest eigenvalue of H / norm, by power iteration (H is symmetric PSD)."""
        v = torch.randn(self.H.shape[0], 1, device=self.H.device, generator=torch.Generator(device=self.H.device).manual_seed(0))
        lam = 0.0
        for _ in range(iters):
            v = self.H @ v
            lam = float(v.norm())
            if lam == 0:
                return 1.0
            v /= lam
        return 2.0 * lam * 1.05 / self.norm  # small margin over the power-iteration estimate


def token_loss(dense: torch.Tensor, W: torch.Tensor, X: torch.Tensor) -> float:
    """The same objective evaluated on tokens (X: [tokens, d_in]); used to check the Gram form."""
    return float(((X @ (W - dense).t()) ** 2).sum() / ((X @ dense.t()) ** 2).sum())


def _lr_at(opts: OptimConfig, base: float, t: int) -> float:
    if opts.schedule == "constant":
        return base
    return base * 0.5 * (1 + math.cos(math.pi * t / max(1, opts.iterations)))


def _optimize(
    W0: torch.Tensor,
    rec: Reconstruction,
    opts: OptimConfig,
    l1: float = 0.0,
    l2: float = 0.0,
    project: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    what: str = "redense",
    check_every: int = 10,
) -> tuple[torch.Tensor, dict]:
    """Minimise rec + penalties from W0; `project` (hard re-masking) makes it iterative hard
    thresholding. Returns the best weights by the full objective and a history. `what`: the step
    (redense / adjust), named in logs and, as prune.sds.<what>, in errors about `opts`.

    Losses stay on the device and are read every `check_every` iterations (a host sync per
    iteration would dominate on a GPU): that is where divergence is detected and the best
    weights so far are kept.
    """
    opts.validate(f"prune.sds.{what}")  # built in code, not only from the checked config
    dense = rec.dense
    l1_norm = float(dense.abs().sum()) or 1.0
    l2_norm = float((dense**2).sum()) or 1.0
    scale = float(dense.pow(2).mean().sqrt()) or 1.0

    def objective(W: torch.Tensor, DH: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
        total = torch.sum(DH * D) / rec.norm
        if l1:
            total = total + W.abs().sum() * (l1 / l1_norm)
        if l2:
            total = total + (W * W).sum() * (l2 / l2_norm)
        return total

    if opts.optimizer == "sgd":
        base_lr = opts.lr / (rec.lipschitz() + 2 * l2 / l2_norm)
    else:
        base_lr = opts.lr * scale

    def make_optimizer(param: torch.nn.Parameter, lr: float) -> torch.optim.Optimizer:
        if opts.optimizer == "adam":
            return torch.optim.Adam([param], lr=lr, fused=param.is_cuda)
        return torch.optim.SGD([param], lr=lr)

    W = torch.nn.Parameter(W0.detach().float().clone())
    D0, DH0 = rec.residual(W.data)
    start = float(objective(W.data, DH0, D0))
    del D0, DH0
    best_W, best = W.data.clone(), start
    history = [start]
    guard = GuardLog()
    lr_mult = 1.0
    opt = make_optimizer(W, base_lr)
    pending: list[torch.Tensor] = []
    t = 0
    while t < opts.iterations:
        D, DH = rec.residual(W.data)
        pending.append(objective(W.data, DH, D).detach())
        grad = DH.mul_(2.0 / rec.norm)
        del D
        if l2:
            grad.add_(W.data, alpha=2 * l2 / l2_norm)
        if l1 and opts.optimizer == "adam":
            grad.add_(torch.sign(W.data), alpha=l1 / l1_norm)
        if len(pending) >= check_every or t == opts.iterations - 1:
            values = torch.stack(pending).tolist()
            pending = []
            bad = next((v for v in values if not math.isfinite(v) or v > opts.divergence * max(start, 1e-12)), None)
            if bad is not None:
                guard.retries += 1
                lr_mult /= 2
                guard.events.append({"iteration": t, "loss": bad if math.isfinite(bad) else str(bad), "lr_mult": lr_mult})
                log.warning("sds %s: loss %s diverged by iteration %d; restoring best weights, halving the step", what, bad, t)
                if guard.retries > opts.max_retries:
                    log.warning("sds %s: giving up after %d step reductions; keeping the best weights", what, opts.max_retries)
                    break
                W.data.copy_(best_W)
                opt = make_optimizer(W, base_lr * lr_mult)
                continue  # redo from the restored weights (t not advanced)
            history.extend(values)
            if values[-1] < best:
                best, best_W = values[-1], W.data.clone()
        W.grad = grad
        for group in opt.param_groups:
            group["lr"] = _lr_at(opts, base_lr, t) * lr_mult
        opt.step()
        W.grad = None
        with torch.no_grad():
            if l1 and opts.optimizer == "sgd":  # proximal step for the L1 term
                thr = opt.param_groups[0]["lr"] * l1 / l1_norm
                W.data.copy_(torch.sign(W.data) * torch.clamp(W.data.abs() - thr, min=0))
            if project is not None:
                W.data.copy_(project(W.data))
        t += 1
    D, DH = rec.residual(W.data)
    f = float(objective(W.data, DH, D))
    if math.isfinite(f):
        history.append(f)
        if f < best:
            best, best_W = f, W.data.clone()
    return best_W, {"start": start, "best": best, "reconstruction": rec.loss(best_W), "history": history, "retries": guard.retries, "guard_events": guard.events}


def redense(W_sparse: torch.Tensor, rec: Reconstruction, opts: OptimConfig, l1: float, l2: float) -> tuple[torch.Tensor, dict]:
    """Every entry trainable, starting from the pruned weights."""
    return _optimize(W_sparse, rec, opts, l1=l1, l2=l2, what="redense")


def adjust(W_sparse: torch.Tensor, rec: Reconstruction, pattern: Pattern, opts: OptimConfig) -> tuple[torch.Tensor, dict]:
    """Reconstruction only, the mask re-selected by magnitude inside `pattern` after every step."""

    def project(W: torch.Tensor) -> torch.Tensor:
        return W.masked_fill(magnitude_reselect(W, pattern), 0)

    return _optimize(W_sparse, rec, opts, project=project, what="adjust")


# ---------------------------------------------------------------------------------------------
# Whole-model stages (block walking in plmtool.prune.sequential)


def _key(i: int, name: str) -> str:
    return f"layers.{i}.{name}"


def redense_model(model, calib_ids, dense: dict, prune: PruneConfig, device: Optional[str] = None) -> dict:
    """Re-dense every linear of every block in place (the model holds the one-shot weights), with
    `prune.sds`; the walk (batch size, activations, exclusions, `device`) as in one-shot pruning."""
    from plmtool.prune.sequential import walk

    opts = prune.sds
    info: dict[str, dict] = {}

    def process(i, block, linears, stats) -> None:
        with tf32_matmuls(opts.redense.tf32):
            for name, lin in linears.items():
                dev = lin.weight.device
                rec = Reconstruction(dense[_key(i, name)].to(dev), stats[name].gram)
                W, hist = redense(lin.weight.data, rec, opts.redense, opts.l1, opts.l2)
                lin.weight.data = W.to(lin.weight.dtype)
                info[_key(i, name)] = {
                    "objective_start": hist["start"],
                    "objective_end": hist["best"],
                    "reconstruction": hist["reconstruction"],
                    "retries": hist["retries"],
                    "sparsity": float((lin.weight.data == 0).float().mean()),
                }
                del rec

    # The activations stay those of the pruned (or dense) model: the calibration pass runs the
    # block with its one-shot (or dense) weights and its outputs are propagated as they are.
    calib = (lambda i, n: dense[_key(i, n)]) if opts.inputs == "dense" else None
    # TF32 (when allowed) also speeds up accumulating the Gram matrices on the GPU: they only feed
    # the reconstruction objective here.
    with tf32_matmuls(opts.redense.tf32):
        walk(model, calib_ids, process, stats="gram", opts=replace(prune, propagate="dense"), device=device, calib_weights=calib,
             description="SDS re-dense")
    return info


@torch.no_grad()
def calibration_nll(model, calib_ids, batch_size: int = 8) -> float:
    """Mean next-token NLL of the model on the calibration windows (the model-level loss that
    decides the early exit)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for s in range(0, calib_ids.shape[0], batch_size):
        ids = calib_ids[s : s + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits
        for r in range(ids.shape[0]):
            total += float(torch.nn.functional.cross_entropy(logits[r, :-1].float(), ids[r, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return total / count


def adjust_model(model, calib_ids, dense: dict, oneshot: dict, prune: PruneConfig, device: Optional[str] = None) -> dict:
    """Weight adjustment of every layer (mask re-selected by magnitude inside `prune.pattern`
    each step), block by block on the current model's activations, pruned outputs propagated."""
    from plmtool.prune.sequential import walk

    opts, pattern = prune.sds, prune.parsed_pattern
    info: dict[str, dict] = {}

    def process(i, block, linears, stats) -> None:
        with tf32_matmuls(opts.adjust.tf32):
            for name, lin in linears.items():
                dev = lin.weight.device
                rec = Reconstruction(dense[_key(i, name)].to(dev), stats[name].gram)
                W_rp = lin.weight.data.float()
                W_os = oneshot[_key(i, name)].to(dev).float()
                loss_os, loss_rp = rec.loss(W_os), rec.loss(W_rp)
                W, hist = adjust(W_rp, rec, pattern, opts.adjust)
                entry = {"oneshot": loss_os, "reprune": loss_rp, "adjusted": hist["reconstruction"], "choice": "adjusted", "retries": hist["retries"]}
                final = hist["reconstruction"]
                if opts.keep_oneshot_if_better and loss_os < final:
                    W, final, entry["choice"] = W_os, loss_os, "oneshot"
                entry["final"] = final
                lin.weight.data = W.to(lin.weight.dtype)
                entry["sparsity"] = float((lin.weight.data == 0).float().mean())
                info[_key(i, name)] = entry
                del rec

    calib = (lambda i, n: dense[_key(i, n)]) if opts.inputs == "dense" else None
    propagate = "dense" if opts.inputs == "dense" else "pruned"
    with tf32_matmuls(opts.adjust.tf32):
        walk(model, calib_ids, process, stats="gram", opts=replace(prune, propagate=propagate), device=device, calib_weights=calib,
             description="SDS adjust")
    return info


def reprune_model(model, calib_ids, dense: dict, oneshot: dict, prune: PruneConfig, device: Optional[str] = None) -> dict:
    """SDS step 3 on a re-dense model: re-prune with the one-shot method and pattern of `prune`
    (a full one-shot pass), then - unless the early exit applies - adjust every layer.

    Early exit: when the re-pruned model's calibration loss (mean NLL on the calibration windows)
    is already below the one-shot model's, the adjustment is skipped.
    Returns {"early_exit", "nll": {...}, "layers": per-layer info}.
    """
    from plmtool.prune.oneshot import prune_model

    prune_model(model, calib_ids, prune, device)
    result: dict = {"early_exit": False, "nll": {}, "layers": {}}
    if prune.sds.early_exit:
        current = {k: v for k, v in _current(model, prune.exclude).items()}
        nll_rp = calibration_nll(model, calib_ids, prune.batch_size)
        _load(model, oneshot, prune.exclude)
        nll_os = calibration_nll(model, calib_ids, prune.batch_size)
        _load(model, current, prune.exclude)
        result["nll"] = {"oneshot": nll_os, "reprune": nll_rp}
        log.info("SDS early-exit check: calibration NLL one-shot %.4f, re-pruned %.4f", nll_os, nll_rp)
        if nll_rp < nll_os:
            result["early_exit"] = True
            return result
    if prune.sds.adjust.iterations > 0:
        result["layers"] = adjust_model(model, calib_ids, dense, oneshot, prune, device)
    return result


def _current(model, exclude) -> dict:
    return linear_weights(model, exclude, device="cpu")


def _load(model, weights: dict, exclude) -> None:
    from plmtool.prune.sequential import block_linears, decoder_layers

    for i, block in enumerate(decoder_layers(model)):
        for name, lin in block_linears(block, exclude).items():
            lin.weight.data.copy_(weights[_key(i, name)].to(lin.weight.device, lin.weight.dtype))


def linear_weights(model, exclude: tuple = (), device: str = "cpu") -> dict:
    """Copies of every block linear's weight, keyed like the reports ("layers.<i>.<name>")."""
    from plmtool.prune.sequential import block_linears, decoder_layers

    return {
        _key(i, name): lin.weight.data.detach().to(device, copy=True)
        for i, block in enumerate(decoder_layers(model))
        for name, lin in block_linears(block, exclude).items()
    }
