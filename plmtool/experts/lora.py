"""LoRA adapters (peft), one per expert or baseline, on one shared base model, and their training.

All adapters live in one PeftModel: training activates one adapter at a time (only its
parameters require grad); evaluation can mix adapters per sample (`adapter_names`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from plmtool.errors import PlmtoolError
from plmtool.experts.tokenize import IGNORE, collate

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
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        if pos.numel() == 0:
            return logits.sum() * 0.0
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).index_select(0, pos).float(), target)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]
    if pos.numel() == 0:  # nothing to learn in this batch (prompts filled the window)
        return hidden.sum() * 0.0
    picked = hidden.reshape(-1, hidden.size(-1)).index_select(0, pos)
    return torch.nn.functional.cross_entropy(head(picked).float(), target)


def train_adapter(model, name: str, encoded: Sequence[dict[str, Any]], pad_id: int, lr: float = 2e-4, epochs: float = 1.0,
                  batch_size: int = 8, grad_accum: int = 1, max_steps: int | None = None, warmup_ratio: float = 0.03, warmup_steps: int = 0,
                  weight_decay: float = 0.0, grad_clip: float = 1.0, seed: int = 0, bf16: bool = False,
                  log_every: int = 10) -> dict[str, Any]:
    """Train adapter `name` on `encoded` for `epochs` passes; returns timing and loss stats."""
    from plmtool.progress import track

    if len(encoded) == 0:
        raise PlmtoolError(f"adapter '{name}': no training samples")
    model.set_adapter(name)
    params = _only_trainable(model, name)
    per_step = batch_size * grad_accum
    steps = max(1, math.ceil(len(encoded) * epochs / per_step))
    capped = bool(max_steps and steps > max_steps)
    if capped:
        steps = int(max_steps)
    # warm-up scales with each adapter's own step count unless a fixed number is asked for
    warmup = min(int(warmup_steps), steps) if warmup_steps else int(round(steps * warmup_ratio))

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 0
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    rng = np.random.default_rng(seed)
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    # fused: one kernel for the whole adapter's update instead of a few per parameter tensor
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=cuda)
    order: list[int] = []
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses, tokens = [], 0
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for step in track(range(steps), f"training {name}", total=steps):
        opt.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=device)
        for _ in range(grad_accum):
            if len(order) < batch_size:
                order += rng.permutation(len(encoded)).tolist()
            idx, order = order[:batch_size], order[batch_size:]
            b = collate([encoded[i] for i in idx], pad_id)
            b["pos"], b["target"] = labelled_positions(b["labels"])
            tokens += sum(len(encoded[i]["input_ids"]) for i in idx)
            # pinned host memory + non_blocking: the copies queue behind the running step instead of
            # waiting for it, so the host prepares step t+1 while the device computes step t
            b = {k: (v.pin_memory() if cuda else v).to(device, non_blocking=cuda) for k, v in b.items() if k != "labels"}
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = assistant_loss(model, b["input_ids"], b["attention_mask"], positions=(b["pos"], b["target"]))
            (loss / grad_accum).backward()
            step_loss += loss.detach() / grad_accum
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        sched.step()
        losses.append(step_loss)  # kept on the device: read back only when logging and at the end
        if log_every and (step + 1) % log_every == 0:
            log.info("%s step %d/%d loss %.4f", name, step + 1, steps, torch.stack(losses[-log_every:]).mean().item())
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    model.eval()
    for p in params:
        p.requires_grad_(False)
    losses = torch.stack(losses).float().cpu().tolist()
    tail = losses[-max(1, len(losses) // 10):]
    return {"adapter": name, "samples": len(encoded), "epochs": epochs, "steps": steps, "capped_by_max_steps": capped,
            "train_tokens": tokens, "seconds": round(seconds, 3), "first_loss": losses[0], "final_loss": float(np.mean(tail))}


def save_adapter(model, name: str, target: str | Path, meta: dict[str, Any]) -> None:
    """Save one adapter to `target` (a directory) atomically, with `meta` in train.json."""
    target = Path(target)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), selected_adapters=[name])
    # peft puts non-"default" adapters in a sub-folder named after the adapter
    src = tmp / name if (tmp / name).is_dir() else tmp
    (src / "train.json").write_text(json.dumps(meta, indent=2))
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
