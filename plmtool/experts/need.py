"""The model's own need for a sample, used to tilt the redistribution towards what it lacks.

  * `loss`: mean NLL of the reply given the instruction (high = the model does not know it yet);
  * `ifd`:  instruction-following difficulty (Li et al., 2024): loss(reply | instruction) /
            loss(reply alone). Near or above 1 the instruction does not help the model predict
            the reply; the IFD paper keeps samples with high IFD (and drops IFD > 1 as noise,
            which is left to the weighting here: the signal is clipped to [0, 1.5]).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from plmtool.errors import PlmtoolError
from plmtool.experts.losses import encoded_losses
from plmtool.experts.tokenize import encode

KINDS = ("none", "loss", "ifd")


def need_signal(model, tokenizer, samples: list[dict[str, Any]], kind: str, max_len: int, max_prompt_len: int | None,
                batch_size: int = 8, autocast: bool = False) -> np.ndarray | None:
    """Need per sample (None for kind 'none'); `autocast`: bf16 autocast (a ranking signal, bf16 is plenty)."""
    if kind not in KINDS:
        raise PlmtoolError(f"unknown experts.need '{kind}' (choose from {', '.join(KINDS)})")
    if kind == "none":
        return None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    enc = [encode(tokenizer, s["messages"], max_len, max_prompt_len) for s in samples]
    s, n = encoded_losses(model, enc, pad, batch_size, description="need: reply loss", autocast=autocast)
    cond = s / np.maximum(n, 1)
    if kind == "loss":
        return cond
    replies = [[m for m in smp["messages"] if m["role"] == "assistant"] for smp in samples]
    enc_alone = [encode(tokenizer, r, max_len, None) for r in replies]
    s2, n2 = encoded_losses(model, enc_alone, pad, batch_size, description="need: reply alone", autocast=autocast)
    alone = s2 / np.maximum(n2, 1)
    return np.clip(cond / np.maximum(alone, 1e-6), 0.0, 1.5)
