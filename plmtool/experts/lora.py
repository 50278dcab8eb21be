"""LoRA adapters (peft), one per expert or baseline, on one shared base model, and their training.

All adapters live in one PeftModel: training activates one adapter at a time (only its
parameters require grad); evaluation can mix adapters per sample (`adapter_names`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from plmtool.errors import PlmtoolError
from plmtool.io import follow_umask
from plmtool.experts.tokenize import IGNORE, collate
from plmtool.train_loop import Checkpoint, TimeLimit, autocast, cosine_schedule, optimizer_step, restore, run_steps

log = logging.getLogger("plmtool")
BASE = "__base__"  # peft's name for "no adapter" in mixed batches


def lora_config(r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules: Sequence[str] | str = "all-linear"):
    from peft import LoraConfig

    if r < 1:
        raise PlmtoolError(f"experts.lora.r must be >= 1, got {r}")
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM", bias="none")


def add_adapters(model, names: Sequence[str], config) -> Any:
    """Wrap `model` in a PeftModel (if needed) and add one fresh adapter per name."""
    from peft import PeftModel, get_peft_model

    names = list(names)
    if not isinstance(model, PeftModel):
        model = get_peft_model(model, config, adapter_name=names[0])
        names = names[1:]
    for n in names:
        if n not in model.peft_config:
            model.add_adapter(n, config)
    return model


def _only_trainable(model, name: str) -> list[torch.nn.Parameter]:
    params = []
    for pname, p in model.named_parameters():
        mine = "lora_" in pname and f".{name}." in pname
        p.requires_grad_(mine)
        if mine:
            params.append(p)
    if not params:
        raise PlmtoolError(f"adapter '{name}' has no parameters (check experts.lora.target_modules)")
    return params


def labelled_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat indices into the [batch * (seq - 1)] next-token positions that carry a label, their targets).

    Computed where `labels` lives: training batches do it on the host, so a GPU step never has to
    wait for the device to learn how many tokens are labelled (boolean indexing would).
    """
    target = labels[:, 1:].reshape(-1)
    pos = (target != IGNORE).nonzero().squeeze(1)
    return pos, target[pos]


def assistant_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                   positions: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Mean next-token NLL over labelled tokens (`labels`, or `positions` from labelled_positions).

    The vocabulary projection is applied only at the labelled positions (the prompt is often half
    the tokens and the projection to 49k+ words dominates small models), and the full-size
    [batch, seq, vocab] logits are never built, nor their gradient.
    """
    pos, target = positions if positions is not None else labelled_positions(labels)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = getattr(base, "model", None), base.get_output_embeddings()
    if decoder is None or head is None or getattr(base.config, "final_logit_softcapping", None):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
        if pos.numel() == 0:
            return logits.sum() * 0.0
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).index_select(0, pos).float(), target)
    # use_cache=False: a training forward has no use for a key/value cache (it would copy every layer's K and V)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state[:, :-1]
    if pos.numel() == 0:  # nothing to learn in this batch (prompts filled the window)
        return hidden.sum() * 0.0
    picked = hidden.reshape(-1, hidden.size(-1)).index_select(0, pos)
    return torch.nn.functional.cross_entropy(head(picked).float(), target)


def _schedule(n: int, epochs: float, per_step: int, max_steps: int | None, warmup_ratio: float,
              warmup_steps: int) -> tuple[int, bool, int]:
    """(optimizer steps, whether max_steps cut them, warm-up steps)."""
    steps = max(1, math.ceil(n * epochs / per_step))
    capped = bool(max_steps and steps > max_steps)
    if capped:
        steps = int(max_steps)
    # warm-up scales with each adapter's own step count unless a fixed number is asked for
    warmup = min(int(warmup_steps), steps) if warmup_steps else int(round(steps * warmup_ratio))
    return steps, capped, warmup


class _DataOrder:
    """Reshuffled passes over the samples, `k` indices at a time.

    Its state (the generator and what is left of the current pass) goes into checkpoints, so a
    resumed run draws exactly the batches the uninterrupted run would have drawn.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.rng, self.rest = n, np.random.default_rng(seed), []

    def take(self, k: int) -> list[int]:
        if len(self.rest) < k:
            self.rest += self.rng.permutation(self.n).tolist()
        idx, self.rest = self.rest[:k], self.rest[k:]
        return idx

    def state(self) -> dict[str, Any]:
        # the generator state holds 128-bit integers: kept as JSON text
        return {"generator": json.dumps(self.rng.bit_generator.state), "rest": list(self.rest)}

    def load(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = json.loads(state["generator"])
        self.rest = list(state["rest"])


def _data_digest(encoded: Sequence[dict[str, Any]]) -> str:
    """Fingerprint of the training samples in their order (the data order indexes into it)."""
    h = hashlib.sha256()
    for e in encoded:
        for key in ("input_ids", "labels"):
            a = np.asarray(e[key], dtype=np.int64)
            h.update(len(a).to_bytes(8, "little"))
            h.update(a.tobytes())
    return h.hexdigest()


def _adapter_digest(model, name: str, named: Sequence[tuple[str, torch.nn.Parameter]]) -> dict[str, Any]:
    """The LoRA settings that shape the training (rank, scale, dropout, targets) and the parameter shapes."""
    cfg = model.peft_config[name]
    targets = cfg.target_modules if isinstance(cfg.target_modules, str) else sorted(cfg.target_modules)
    shapes = ";".join(f"{n}:{tuple(p.shape)}" for n, p in named)
    return {"r": cfg.r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout, "target_modules": targets,
            "parameters": hashlib.sha256(shapes.encode()).hexdigest()}


class _Clock:
    """Seconds of training: device work included (synchronised at each stop), checkpoint writing not."""

    def __init__(self, cuda: bool):
        self.cuda, self.seconds, self.t0 = cuda, 0.0, 0.0

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - self.t0


class _LossLog:
    """Logs the mean training loss every `every` steps without stalling the device.

    `.item()` at a log step would wait for all queued steps and leave the device idle while the
    host prepares the next batch; instead the window's mean is copied to pinned host memory
    without blocking and printed at the next log step (or at the end), when the copy is long done.
    """

    def __init__(self, name: str, steps: int, every: int, cuda: bool):
        self.name, self.steps, self.every, self.pending = name, steps, every, None
        # one pinned buffer, reused: flush() has waited for the previous copy before the next one
        self.host = torch.empty((), dtype=torch.float32, pin_memory=True) if cuda and every else None

    def step(self, done: int, losses: list[torch.Tensor]) -> None:
        if not self.every or done % self.every or not losses:
            return
        self.flush()
        mean = torch.stack(losses[-self.every:]).mean()
        ready = None
        if self.host is not None:
            self.host.copy_(mean, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            mean = self.host
        self.pending = (done, mean, ready)

    def flush(self) -> None:
        if self.pending is None:
            return
        done, mean, ready = self.pending
        if ready is not None:
            ready.synchronize()
        log.info("%s step %d/%d loss %.4f", self.name, done, self.steps, float(mean))
        self.pending = None


@dataclass
class _Progress:
    """Where a unit's training stands: what a checkpoint records besides the model and optimizer."""

    step: int = 0
    first: int = 0  # the step this call started from
    earlier_losses: list[float] = field(default_factory=list)  # per-step losses of earlier calls
    losses: list[torch.Tensor] = field(default_factory=list)  # this call's, on the device until read
    tokens: int = 0
    earlier_seconds: float = 0.0
    checkpoint_s: float = 0.0
    pieces: list[dict[str, Any]] = field(default_factory=list)  # earlier calls: steps [from, to], seconds, device

    def all_losses(self) -> list[float]:
        mine = torch.stack(self.losses).float().cpu().tolist() if self.losses else []
        return self.earlier_losses + mine

    def with_piece(self, seconds: float, device: str) -> list[dict[str, Any]]:
        if self.step == self.first:
            return list(self.pieces)
        return [*self.pieces, {"steps": [self.first, self.step], "seconds": round(seconds, 3), "device": device}]


def _restore(state: dict[str, Any], named, opt, sched, order: _DataOrder) -> _Progress:
    with torch.no_grad():
        for n, p in named:
            p.copy_(state["model"][n])
    # dropout continues with the random numbers the uninterrupted run would have drawn
    restore(state, opt, sched)
    extra = state["extra"]
    order.load(extra["data_order"])
    return _Progress(step=state["step"], first=state["step"], earlier_losses=extra["losses"].tolist(), tokens=extra["tokens"],
                     earlier_seconds=extra["seconds"], checkpoint_s=extra["checkpoint_s"], pieces=list(extra["pieces"]))


def _device_batch(encoded: Sequence[dict[str, Any]], idx: list[int], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    b = collate([encoded[i] for i in idx], pad_id)
    b["pos"], b["target"] = labelled_positions(b["labels"])
    del b["labels"]
    if device.type != "cuda":
        return {k: v.to(device) for k, v in b.items()}
    # pinned host memory + non_blocking: the copies queue behind the running step instead of
    # waiting for it, so the host prepares step t+1 while the device computes step t
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in b.items()}


def train_adapter(model, name: str, encoded: Sequence[dict[str, Any]], pad_id: int, lr: float = 2e-4, epochs: float = 1.0,
                  batch_size: int = 8, grad_accum: int = 1, max_steps: int | None = None, warmup_ratio: float = 0.03, warmup_steps: int = 0,
                  weight_decay: float = 0.0, grad_clip: float = 1.0, seed: int = 0, bf16: bool = False,
                  log_every: int = 10, checkpoint: str | Path | None = None, checkpoint_every: int = 0,
                  deadline: float | None = None, under: str | None = None) -> dict[str, Any]:
    """Train adapter `name` on `encoded` for `epochs` passes; returns timing and loss stats.

    `under` names a trained adapter that stays active, frozen, beneath `name` (their updates add
    up): `name` then learns what `under` misses.

    The schedule (linear warm-up, cosine decay to 0), autocast, checkpoint and deadline are
    plmtool.train_loop's. With `checkpoint` (a file path) the training can be resumed: the
    adapter's trainable weights, optimizer, scheduler, data order, torch generators, per-step
    losses and training seconds are written there atomically every `checkpoint_every` steps (0: not
    in between), when `deadline` (a `plmtool.train_loop.now()` value, checked after each step, so
    that every call makes progress) has passed, and at the end. A later call with the same path, adapter,
    data and hyper-parameters continues from it and ends where an uninterrupted run would; a
    finished checkpoint is loaded without training. A checkpoint of other hyper-parameters or data
    raises PlmtoolError. A call stopped by the deadline returns `finished` False and `steps_done`
    < `steps`. `seconds` sums the training time of all calls (checkpoint writing excluded).
    """
    if len(encoded) == 0:
        raise PlmtoolError(f"adapter '{name}': no training samples")
    if deadline is not None and checkpoint is None:
        raise PlmtoolError(f"adapter '{name}': a deadline needs a checkpoint to save the unfinished training to")
    model.set_adapter(name)
    if under is not None:
        model.base_model.set_adapter([under, name])  # both active; only `name` is made trainable below
    params = _only_trainable(model, name)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    steps, capped, warmup = _schedule(len(encoded), epochs, batch_size * grad_accum, max_steps, warmup_ratio, warmup_steps)
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    device_name = torch.cuda.get_device_name(device) if cuda else device.type
    # fused: one kernel for the whole adapter's update instead of a few per parameter tensor
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=cuda)
    sched = cosine_schedule(opt, warmup, steps)  # linear warm-up, cosine decay to 0
    order = _DataOrder(len(encoded), seed)
    prog, ckpt = _Progress(), None
    if checkpoint is not None:
        hparams = {"adapter": name, "samples": len(encoded), "data_sha256": _data_digest(encoded), "pad_id": pad_id,
                   "lr": lr, "epochs": epochs, "batch_size": batch_size, "grad_accum": grad_accum, "max_steps": max_steps,
                   "steps": steps, "warmup": warmup, "weight_decay": weight_decay, "grad_clip": grad_clip, "seed": seed,
                   "bf16": bf16, "lora": _adapter_digest(model, name, named), "under": under}
        ckpt = Checkpoint(checkpoint, hparams, "other hyper-parameters or data",
                          "delete it (or give another checkpoint path) to train from scratch")
        state = ckpt.load()
        if state is not None:
            prog = _restore(state, named, opt, sched, order)
            log.info("%s: resuming at step %d/%d from %s", name, prog.step, steps, checkpoint)
    loss_log = _LossLog(name, steps, log_every, cuda)
    clock = _Clock(cuda)
    precision = "bf16" if bf16 else "fp32"

    def save() -> None:
        extra = {"tokens": prog.tokens, "seconds": prog.earlier_seconds + clock.seconds, "checkpoint_s": prog.checkpoint_s,
                 "pieces": prog.with_piece(clock.seconds, device_name),
                 "losses": torch.tensor(prog.all_losses(), dtype=torch.float64), "data_order": order.state()}
        adapter = {n: p.detach().cpu().clone() for n, p in named}
        prog.checkpoint_s += ckpt.save(prog.step, adapter, opt, sched, extra)

    def periodic_save(done: int) -> None:
        clock.stop()  # checkpoint writing is not training time
        save()
        clock.start()

    def train_step(step: int) -> None:
        opt.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=device)
        for _ in range(grad_accum):
            idx = order.take(batch_size)
            b = _device_batch(encoded, idx, pad_id, device)
            prog.tokens += sum(len(encoded[i]["input_ids"]) for i in idx)
            with autocast(device, precision):
                loss = assistant_loss(model, b["input_ids"], b["attention_mask"], positions=(b["pos"], b["target"]))
            (loss / grad_accum).backward()
            step_loss += loss.detach() / grad_accum
        optimizer_step(params, opt, sched, grad_clip)
        prog.losses.append(step_loss)  # kept on the device: read back when logging, checkpointing and at the end
        prog.step = step + 1
        loss_log.step(prog.step, prog.losses)

    model.train()
    clock.start()
    run_steps(prog.step, steps, train_step, description=f"training {name}", save=periodic_save if ckpt else None,
              save_every=checkpoint_every, limit=TimeLimit(deadline=deadline) if deadline is not None else None)
    clock.stop()
    loss_log.flush()
    if ckpt is not None and (prog.step > prog.first or not ckpt.path.is_file()):
        save()
    model.eval()
    for p in params:
        p.requires_grad_(False)
    return _train_stats(name, len(encoded), epochs, steps, capped, prog, clock.seconds, device_name, ckpt is not None)


def _train_stats(name: str, samples: int, epochs: float, steps: int, capped: bool, prog: _Progress, seconds: float,
                 device: str, checkpointed: bool) -> dict[str, Any]:
    losses = prog.all_losses()
    finished = prog.step == steps
    tail = losses[-max(1, len(losses) // 10):]
    stats = {"adapter": name, "samples": samples, "epochs": epochs, "steps": steps, "capped_by_max_steps": capped,
             "train_tokens": prog.tokens, "seconds": round(prog.earlier_seconds + seconds, 3),
             "first_loss": losses[0] if losses else None, "final_loss": float(np.mean(tail)) if finished else None,
             "finished": finished, "steps_done": prog.step}
    if checkpointed:
        stats.update(pieces=prog.with_piece(seconds, device), checkpoint_s=round(prog.checkpoint_s, 3))
    return stats


def concat_adapters(model, name: str, parts: Sequence[str], dropout: float = 0.0) -> None:
    """Add adapter `name` whose update is the sum of the updates of `parts`, exactly: a LoRA of
    rank sum(r) with the parts' A matrices stacked and their scaled B matrices side by side
    (scaling 1), so it is used, saved and routed like any single adapter."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    first = model.peft_config[parts[0]]
    rank = sum(model.peft_config[p].r for p in parts)
    model.add_adapter(name, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=dropout, target_modules=first.target_modules,
                                       task_type="CAUSAL_LM", bias="none"))
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, LoraLayer) or name not in module.lora_A:
                continue
            if any(p not in module.lora_A for p in parts):
                raise PlmtoolError(f"adapters {', '.join(parts)} do not target the same layers")
            module.lora_A[name].weight.copy_(torch.cat([module.lora_A[p].weight for p in parts], 0))
            module.lora_B[name].weight.copy_(torch.cat([module.lora_B[p].weight * module.scaling[p] for p in parts], 1))
            module.scaling[name] = 1.0


def save_adapter(model, name: str, target: str | Path, meta: dict[str, Any]) -> None:
    """Save one adapter to `target` (a directory) atomically, with `meta` in train.json."""
    target = Path(target)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), selected_adapters=[name])
    # peft puts non-"default" adapters in a sub-folder named after the adapter
    src = tmp / name if (tmp / name).is_dir() else tmp
    (src / "train.json").write_text(json.dumps(meta, indent=2))
    follow_umask(src)  # peft's safetensors files are written 0600
    final = target.with_name(target.name + ".new")
    shutil.rmtree(final, ignore_errors=True)
    shutil.move(str(src), str(final))
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    final.rename(target)


def adapter_meta(path: str | Path) -> dict[str, Any] | None:
    p = Path(path) / "train.json"
    return json.loads(p.read_text()) if p.is_file() else None


def load_adapter(model, name: str, path: str | Path, lora_cfg=None):
    """Load a saved adapter into `model` (wrapping it in a PeftModel on first use)."""
    from peft import PeftModel

    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise PlmtoolError(f"no adapter at {path} (train it first)")
    if not isinstance(model, PeftModel):
        return PeftModel.from_pretrained(model, str(path), adapter_name=name, is_trainable=False)
    model.load_adapter(str(path), adapter_name=name, is_trainable=False)
    return model
