"""Per-sample loss on assistant tokens, batched, optionally with a different adapter per sample."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from plmtool.experts.tokenize import IGNORE, collate
from plmtool.train_loop import autocast as precision_autocast


def token_logprobs(
    model, encoded: Sequence[dict[str, Any]], pad_id: int, batch_size: int = 8, adapter_names: Sequence[str] | None = None,
    description: str = "held-out loss", autocast: bool = False,
) -> list[np.ndarray]:
    """Log-probability of every labelled (assistant) token, one array per sample.

    `adapter_names[i]` picks the peft adapter for sample i (peft mixed-batch inference);
    "__base__" means no adapter.
    """
    from plmtool.progress import track

    order = np.argsort([len(e["input_ids"]) for e in encoded], kind="stable")
    out: list[np.ndarray] = [np.zeros(0)] * len(encoded)
    device = next(model.parameters()).device
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for idx in track(batches, description):
            b = collate([encoded[i] for i in idx], pad_id)
            kwargs = {}
            if adapter_names is not None:
                kwargs["adapter_names"] = [adapter_names[i] for i in idx]
            with precision_autocast(device, "bf16" if autocast else "fp32"):
                logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device), **kwargs).logits
            target = b["labels"][:, 1:].to(device)
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            valid = target != IGNORE
            picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            for j, i in enumerate(idx):
                out[i] = picked[j][valid[j]].double().cpu().numpy()
    model.train(was_training)
    return out


def encoded_losses(model, encoded, pad_id, batch_size=8, adapter_names=None, description="held-out loss", autocast=False):
    """(sum of NLL per sample, labelled tokens per sample)."""
    lps = token_logprobs(model, encoded, pad_id, batch_size, adapter_names, description, autocast)
    return np.array([-lp.sum() for lp in lps]), np.array([len(lp) for lp in lps], dtype=np.int64)


def mean_loss(nll_sum: np.ndarray, ntok: np.ndarray, mask: np.ndarray | None = None) -> float | None:
    """Token-weighted mean NLL over the selected samples (None when there are no tokens)."""
    if mask is not None:
        nll_sum, ntok = nll_sum[mask], ntok[mask]
    total = int(ntok.sum())
    return None if total == 0 else float(nll_sum.sum() / total)
