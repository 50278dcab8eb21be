"""Training loop for drafting heads on a frozen target (Medusa-1 style).

    hidden = target(ids).last_hidden_state              frozen, no grad
    states = drafter.head_states(hidden, next)          next[t] = ids[t+1]
    loss   = sum_k w_k * CE(project_k(states[:, t, k]), ids[:, t+2+k])   assistant tokens only

The vocabulary projection (the expensive part) runs only on the supervised rows of each head.
Per-head held-out top-1/top-5 accuracy is measured every `eval_every` steps into metrics.jsonl.
A resumable checkpoint (plmtool.train_loop.Checkpoint: drafter, optimizer, scheduler, step,
random state, history, config) is written every `save_every` steps; rerunning into the same
directory continues from it. The schedule, autocast and time limit are plmtool.train_loop's, as
for the experts' adapters. With WORLD_SIZE > 1
(torchrun) the drafter is wrapped in DistributedDataParallel, each rank reads its share of every
batch through a DistributedSampler, and only rank 0 writes.

`train_drafter(...)` is the whole recipe as a plain function: it needs no Hydra, lm-eval or
datasets, so scripts on a bare GPU box can call it directly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from plmtool.data.chat import split_heldout
from plmtool.draft.config import DraftDataConfig, DrafterConfig, DraftTrainerConfig
from plmtool.draft.data import build_examples, collate
from plmtool.draft.drafter import Drafter, build_drafter, save_drafter, target_dims, target_hidden
from plmtool.errors import PlmtoolError
from plmtool.train_config import check_trainer
from plmtool.train_loop import (Checkpoint, TimeLimit, autocast, cosine_schedule, optimizer_step, resolved_precision, restore,
                                run_steps)

log = logging.getLogger("plmtool")

CHECKPOINT = "checkpoints/last.pt"


# ----------------------------------------------------------------------------- pure pieces


def head_weights(num_heads: int, decay: float) -> list[float]:
    return [decay**k for k in range(num_heads)]


LABEL_SOURCES = ("data", "target")


def head_targets(input_ids: torch.Tensor, mask: torch.Tensor, k: int,
                 predicted: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (b, t) where head k is supervised and their labels: head k at position t predicts
    token t+2+k, counted only when that token is an assistant token. The label is input_ids[t+2+k],
    or with `predicted` (the target's argmax per position, [B,T]) the target's own prediction of
    that token, predicted[t+1+k]."""
    shift = 2 + k
    valid = torch.zeros_like(mask)
    labels = torch.zeros_like(input_ids)
    if input_ids.shape[1] > shift:
        valid[:, :-shift] = mask[:, shift:]
        labels[:, :-shift] = input_ids[:, shift:] if predicted is None else predicted[:, shift - 1 : -1]
    return valid, labels


def next_tokens_of(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """next_tokens[t] = input_ids[t+1] (the last position gets pad; no head is supervised there)."""
    nxt = torch.full_like(input_ids, pad_id)
    nxt[:, :-1] = input_ids[:, 1:]
    return nxt


class DraftLoss(nn.Module):
    """Wraps a drafter so DDP sees one forward that returns the weighted loss and head stats."""

    def __init__(self, drafter: Drafter, weights: list[float], pad_id: int):
        super().__init__()
        self.drafter = drafter
        self.weights = weights
        self.pad_id = pad_id

    def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor,
                predicted: torch.Tensor | None = None):
        """`predicted`: the target's argmax per position; given, heads learn it (trainer.labels=target)."""
        features = self.drafter.features(hidden, next_tokens_of(input_ids, self.pad_id))
        targets = [head_targets(input_ids, mask, k, predicted) for k in range(len(self.weights))]
        # per-head blocks and the vocabulary projection run only where some head is supervised
        rows = torch.stack([v for v, _ in targets]).any(0)
        if not bool(rows.any()):
            rows[:, 0] = True  # keep the graph whole (DDP expects a gradient for every parameter)
        states = self.drafter.heads_from_features([f[rows] for f in features])  # [N, K, H]
        total = states.new_zeros((), dtype=torch.float32)
        stats = []
        for k, w in enumerate(self.weights):
            valid, labels = targets[k]
            pick = valid[rows]
            n = int(pick.sum())
            if n == 0:
                total = total + 0.0 * states[:, k].float().sum()
                stats.append((0, 0.0, 0, 0))
                continue
            logits = self.drafter.project(states[pick, k], head=k).float()
            y = labels[rows][pick]
            ce = F.cross_entropy(logits, y)
            total = total + w * ce
            with torch.no_grad():
                top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
                stats.append((n, float(ce), int((top5[:, 0] == y).sum()), int((top5 == y[:, None]).any(-1).sum())))
        return total, stats


# ----------------------------------------------------------------------------- distributed


def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


def _init_distributed(device: str) -> tuple[int, int]:
    world, rank, _ = _dist_info()
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return world, rank


def _all_sum(values: list[float], device) -> list[float]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()
    return values


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_heads(target, loss_module: DraftLoss, examples: list[dict], batch_size: int, pad_id: int, device: str,
                   precision: str, hidden_cache: dict | None = None, key_offset: int = 0,
                   predictions: bool = False) -> dict[str, Any]:
    """Per-head top-1/top-5 accuracy and loss on held-out examples (sharded over ranks), against
    the data's tokens or, with `predictions`, the target's own greedy predictions."""
    world, rank, _ = _dist_info()
    k = len(loss_module.weights)
    sums = [0.0] * (4 * k)  # per head: n, ce*n, top1, top5
    was_training = loss_module.training
    loss_module.eval()
    mine = list(range(rank, len(examples), world))
    for i in range(0, len(mine), batch_size):
        idx = mine[i : i + batch_size]
        ids, attn, mask = collate([examples[j] for j in idx], pad_id)
        ids, attn, mask = ids.to(device), attn.to(device), mask.to(device)
        with autocast(device, precision):
            hidden, pred = _target_outputs(target, ids, attn, [key_offset + j for j in idx], hidden_cache, predictions)
            _, stats = loss_module(hidden, ids, mask, pred)
        for h, (n, ce, t1, t5) in enumerate(stats):
            sums[4 * h] += n
            sums[4 * h + 1] += ce * n
            sums[4 * h + 2] += t1
            sums[4 * h + 3] += t5
    loss_module.train(was_training)
    sums = _all_sum(sums, device)
    n = [sums[4 * h] for h in range(k)]
    return {
        "top1": [round(sums[4 * h + 2] / max(n[h], 1), 4) for h in range(k)],
        "top5": [round(sums[4 * h + 3] / max(n[h], 1), 4) for h in range(k)],
        "loss": [round(sums[4 * h + 1] / max(n[h], 1), 4) for h in range(k)],
        "tokens": [int(x) for x in n],
    }


def target_predictions(target, hidden: torch.Tensor, rows_per_chunk: int = 4) -> torch.Tensor:
    """The target's greedy token per position ([B,T]) from its final hidden states, a few rows at
    a time (full-vocabulary logits of a whole batch would be the largest tensor of the step)."""
    head = target.get_output_embeddings()
    # in the target's own precision, not the training autocast: the labels must be the tokens the
    # target picks when it decodes in its dtype (bf16 logits of an fp32 target flip near-ties)
    device_type = hidden.device.type if hidden.device.type in ("cuda", "cpu") else "cpu"
    with torch.no_grad(), torch.autocast(device_type=device_type, enabled=False):
        return torch.cat([head(h.to(head.weight.dtype)).argmax(-1) for h in hidden.split(rows_per_chunk)])


def _target_outputs(target, ids, attn, keys: list[int], cache: dict | None,
                    predictions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Target hidden states for a batch, and its greedy predictions when asked (labels=target);
    with a cache, each example's rows are computed once."""
    if cache is None or any(k not in cache for k in keys):
        with torch.no_grad():
            hidden = target_hidden(target, ids, attn)
            pred = target_predictions(target, hidden) if predictions else None
        if cache is not None:
            lengths = attn.sum(1).tolist()
            for row, (key, n) in enumerate(zip(keys, lengths)):
                cache[key] = (hidden[row, : int(n)].detach().clone(), None if pred is None else pred[row, : int(n)].clone())
        return hidden, pred
    t = ids.shape[1]

    def padded(x: torch.Tensor) -> torch.Tensor:  # rows to the batch's length (right padding)
        if x.shape[0] >= t:
            return x[:t]
        return F.pad(x, (0, 0, 0, t - x.shape[0])) if x.dim() == 2 else F.pad(x, (0, t - x.shape[0]))

    hidden = torch.stack([padded(cache[k][0]) for k in keys])
    pred = torch.stack([padded(cache[k][1]) for k in keys]) if predictions else None
    return hidden, pred


# ----------------------------------------------------------------------------- checkpoints


def _config_key(drafter_cfg: DrafterConfig, trainer_cfg: DraftTrainerConfig) -> dict:
    # what must match for a resume to be the same run (max_steps may grow, logging may change)
    t = dataclasses.asdict(trainer_cfg)
    for k in ("max_steps", "log_every", "eval_every", "save_every", "eval_batch_size", "cache_hidden", "cache_hidden_max_gb",
              "cpu_threads", "max_time_s"):
        t.pop(k, None)
    if t.get("labels") == "data":  # how checkpoints from before the option were trained: they still resume
        t.pop("labels")
    return {"drafter": dataclasses.asdict(drafter_cfg), "trainer": t}


# ----------------------------------------------------------------------------- the recipe


def _as_dataclass(obj: Any, cls):
    if obj is None:
        return cls()
    if isinstance(obj, cls):
        return obj
    if hasattr(obj, "items"):  # DictConfig or dict
        try:
            from omegaconf import OmegaConf

            obj = OmegaConf.to_container(obj, resolve=True) if not isinstance(obj, dict) else obj
        except ImportError:
            pass
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(obj).items() if k in known})
    raise TypeError(f"cannot read {type(obj).__name__} as {cls.__name__}")


def validate_trainer_config(t: DraftTrainerConfig) -> None:
    check_trainer(t)
    for name in ("eval_every", "eval_batch_size"):
        if getattr(t, name) < 1:
            raise PlmtoolError(f"trainer.{name} must be >= 1, got {getattr(t, name)}")
    if t.max_time_s < 0:
        raise PlmtoolError(f"trainer.max_time_s must be >= 0 (0 = no limit), got {t.max_time_s}")
    if t.cpu_threads < 0:
        raise PlmtoolError(f"trainer.cpu_threads must be >= 0 (0 = torch's default), got {t.cpu_threads}")
    if t.labels not in LABEL_SOURCES:
        raise PlmtoolError(f"trainer.labels must be one of {', '.join(LABEL_SOURCES)}, got '{t.labels}'")


def train_drafter(target_model, tokenizer, drafter_cfg, trainer_cfg, conversations, out_dir, data_cfg=None,
                  base_model_info: dict | None = None, drafter: Drafter | None = None) -> dict[str, Any]:
    """Train a drafter on `conversations` for the frozen `target_model`; returns the metrics dict.

    `drafter` continues training a given drafter (e.g. a loaded checkpoint) instead of a fresh one
    built from `drafter_cfg`; it is trained in place.

    Writes `out_dir/drafter/` (the drafter checkpoint), `out_dir/checkpoints/last.pt` (resumable
    state) and `out_dir/metrics.jsonl`. Rerunning with the same `out_dir` resumes.
    """
    from plmtool.io import write_json

    drafter_cfg = _as_dataclass(drafter_cfg, DrafterConfig)
    trainer_cfg = _as_dataclass(trainer_cfg, DraftTrainerConfig)
    data_cfg = _as_dataclass(data_cfg, DraftDataConfig)
    validate_trainer_config(trainer_cfg)
    out_dir = Path(out_dir)
    device = str(next(target_model.parameters()).device)
    if device == "cpu" and trainer_cfg.cpu_threads > 0:
        torch.set_num_threads(trainer_cfg.cpu_threads)
    world, rank = _init_distributed(device)
    is_main = rank == 0
    precision = resolved_precision(trainer_cfg.precision, device)
    torch.manual_seed(trainer_cfg.seed)
    predictions = trainer_cfg.labels == "target"

    target_model.eval()
    target_model.requires_grad_(False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    dims = target_dims(target_model)
    base_info = {**dims, **(base_model_info or {})}

    examples = build_examples(tokenizer, conversations, data_cfg.max_seq_len, data_cfg.min_assistant_tokens)
    short = len(conversations) - len(examples)
    if short:
        log.info("drafter training: %d conversations left out (fewer than data.min_assistant_tokens=%d supervised tokens)",
                 short, data_cfg.min_assistant_tokens)
    train_idx, held_idx = split_heldout(len(examples), data_cfg.heldout, data_cfg.seed)
    train_set, heldout = [examples[i] for i in train_idx], [examples[i] for i in held_idx]
    log.info("drafter training: %d train / %d held-out conversations", len(train_set), len(heldout))

    if drafter is None:
        drafter = build_drafter(drafter_cfg, target_model)
    else:
        drafter_cfg = drafter.cfg
    drafter = drafter.to(device)
    drafter.train()
    weights = head_weights(drafter.num_heads, trainer_cfg.head_weight_decay)
    loss_module = DraftLoss(drafter, weights, pad_id)
    model_for_step: nn.Module = loss_module
    if world > 1:
        ids = None
        if device.startswith("cuda"):
            index = torch.device(device).index
            ids = [index if index is not None else torch.cuda.current_device()]
        model_for_step = nn.parallel.DistributedDataParallel(loss_module, device_ids=ids)

    params = drafter.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=trainer_cfg.lr, weight_decay=trainer_cfg.weight_decay, betas=(0.9, 0.95))
    # linear warm-up, then cosine to 10% of trainer.lr
    scheduler = cosine_schedule(optimizer, trainer_cfg.warmup_steps, trainer_cfg.max_steps, floor=0.1)

    step = 0
    history: dict[str, list] = {"loss": [], "eval": []}
    ckpt_path = out_dir / CHECKPOINT
    checkpoint = Checkpoint(ckpt_path, _config_key(drafter_cfg, trainer_cfg), "a different drafter/trainer config",
                            "use a new run dir")
    state = checkpoint.load()
    if state is not None:
        drafter.load_state_dict(state["model"])
        restore(state, optimizer, scheduler)
        step = int(state["step"])
        history = state["extra"]["history"]
        log.info("resuming drafter training from step %d (%s)", step, ckpt_path)

    hidden_cache: dict | None = {} if trainer_cfg.cache_hidden else None
    if hidden_cache is not None:
        tokens = sum(len(e["input_ids"]) for e in examples)
        # hidden states come out in the target's dtype (autocast does not change the final norm's
        # output), plus one int64 label per token with labels=target
        itemsize = next(target_model.parameters()).element_size()
        gb = tokens * (dims["hidden_size"] * itemsize + (8 if predictions else 0)) / 2**30
        if gb > trainer_cfg.cache_hidden_max_gb:
            log.info("not caching hidden states: %.1f GB > trainer.cache_hidden_max_gb=%.1f", gb, trainer_cfg.cache_hidden_max_gb)
            hidden_cache = None
    metrics_file = out_dir / "metrics.jsonl"

    def log_metrics(record: dict) -> None:
        if is_main:
            metrics_file.parent.mkdir(parents=True, exist_ok=True)
            with metrics_file.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    def run_eval(at_step: int) -> dict:
        if not heldout:
            return {}
        res = evaluate_heads(target_model, loss_module, heldout, trainer_cfg.eval_batch_size, pad_id, device, precision,
                             hidden_cache, key_offset=len(train_set), predictions=predictions)
        log.info("step %d held-out top-1 per head: %s", at_step, res["top1"])
        log_metrics({"step": at_step, "eval": res})
        history["eval"].append({"step": at_step, **res})
        return res

    def save(done: int) -> None:
        if is_main:
            checkpoint.save(done, drafter.state_dict(), optimizer, scheduler, {"history": history})

    sampler = torch.utils.data.DistributedSampler(range(len(train_set)), num_replicas=world, rank=rank, shuffle=True,
                                                  seed=trainer_cfg.seed, drop_last=False)
    per_rank = max(1, trainer_cfg.batch_size // world)
    batches_per_epoch = max(1, math.ceil(len(sampler) / per_rank))
    order = {"epoch": -1, "indices": []}
    start = time.perf_counter()
    window: list[float] = []
    head_window = [[0, 0.0, 0] for _ in weights]

    def train_step(step: int) -> None:
        nonlocal window, head_window
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for micro in range(trainer_cfg.grad_accum):
            b = step * trainer_cfg.grad_accum + micro
            epoch, within = divmod(b, batches_per_epoch)
            if epoch != order["epoch"]:  # deterministic in the step number, so a resume continues exactly
                sampler.set_epoch(epoch)
                order["epoch"], order["indices"] = epoch, list(iter(sampler))
            idx = order["indices"][within * per_rank : (within + 1) * per_rank] or order["indices"][:per_rank]
            ids, attn, mask = collate([train_set[i] for i in idx], pad_id)
            ids, attn, mask = ids.to(device), attn.to(device), mask.to(device)
            with autocast(device, precision):
                hidden, pred = _target_outputs(target_model, ids, attn, idx, hidden_cache, predictions)
                loss, stats = model_for_step(hidden, ids, mask, pred)
            (loss / trainer_cfg.grad_accum).backward()
            step_loss += float(loss.detach()) / trainer_cfg.grad_accum
            for h, (n, ce, t1, _) in enumerate(stats):
                head_window[h][0] += n
                head_window[h][1] += ce * n
                head_window[h][2] += t1
        optimizer_step(params, optimizer, scheduler, trainer_cfg.grad_clip)
        window.append(step_loss)
        done = step + 1
        if (trainer_cfg.log_every and done % trainer_cfg.log_every == 0) or done == trainer_cfg.max_steps:
            mean = sum(window) / len(window)
            record = {
                "step": done,
                "loss": round(mean, 5),
                "lr": scheduler.get_last_lr()[0],
                "train_top1": [round(hw[2] / max(hw[0], 1), 4) for hw in head_window],
                "train_head_loss": [round(hw[1] / max(hw[0], 1), 4) for hw in head_window],
                "elapsed_s": round(time.perf_counter() - start, 1),
            }
            history["loss"].append([done, record["loss"]])
            log_metrics(record)
            log.info("step %d loss %.4f head top-1 (train) %s", done, mean, record["train_top1"])
            window, head_window = [], [[0, 0.0, 0] for _ in weights]
        if done % trainer_cfg.eval_every == 0 and done != trainer_cfg.max_steps:
            run_eval(done)

    done = run_steps(step, trainer_cfg.max_steps, train_step, description="training drafter", save=save,
                     save_every=trainer_cfg.save_every, limit=TimeLimit(seconds=trainer_cfg.max_time_s, device=device))
    if done < trainer_cfg.max_steps:  # stopped by trainer.max_time_s
        save(done)
        log.warning("trainer.max_time_s=%g reached at step %d of %d: checkpoint %s; rerun the same command to resume",
                    trainer_cfg.max_time_s, done, trainer_cfg.max_steps, ckpt_path)
        return {"kind": drafter_cfg.kind, "finished": False, "steps_done": done, "steps": trainer_cfg.max_steps,
                "wall_time_s": round(time.perf_counter() - start, 2), "checkpoint": str(ckpt_path)}
    wall = time.perf_counter() - start

    final = run_eval(trainer_cfg.max_steps)
    save(trainer_cfg.max_steps)
    if is_main:
        save_drafter(drafter, out_dir / "drafter", base_info)
    losses = [v for _, v in history["loss"]]
    metrics = {
        "kind": drafter_cfg.kind,
        "num_heads": drafter.num_heads,
        "heads": {
            "top1": final.get("top1", []),
            "top5": final.get("top5", []),
            "loss": final.get("loss", []),
            "tokens": final.get("tokens", []),
            "weights": [round(w, 4) for w in weights],
        },
        "loss": {
            "first": losses[0] if losses else None,
            "last": losses[-1] if losses else None,
            "min": min(losses) if losses else None,
            "curve": history["loss"],
        },
        "eval_history": history["eval"],
        "labels": trainer_cfg.labels,
        "finished": True,
        "steps": trainer_cfg.max_steps,
        "wall_time_s": round(wall, 2),
        "precision": precision,
        "device": device,
        "world_size": world,
        "parameters": drafter.num_parameters(),
        "trainable_parameters": drafter.num_parameters(trainable_only=True),
        "train_conversations": len(train_set),
        "short_conversations": short,
        "heldout_conversations": len(heldout),
        "checkpoint": str(out_dir / "drafter"),
        "base_model": base_info.get("name_or_path"),
    }
    if is_main:
        write_json(out_dir / "train_metrics.json", metrics)
    return metrics
