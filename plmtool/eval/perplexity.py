"""Token-level perplexity, the protocol pruning papers report (DESIGN.md §3).

The evaluation text is tokenized once into a 1-D stream and cut into non-overlapping windows of
`seqlen` tokens; the tail that does not fill a window is dropped. Each window is an independent
forward pass (no context carried over), and within a window token t predicts token t+1, so a window
contributes `seqlen - 1` predictions.

    ppl = exp( sum of NLL over every prediction / number of predictions )

This is the number the Wanda / SparseGPT reference `eval_ppl` gives: it takes the mean loss of
each window (over its seqlen-1 shifted labels), multiplies by seqlen and divides the sum by
nsamples * seqlen, i.e. the mean of equal-sized window means, which is the mean over all
predictions. We accumulate the summed NLL in float64 (per-window sums in fp32 from fp32 logits)
instead of averaging averages, which is the same quantity with less rounding.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F

from plmtool.errors import PlmtoolError
from plmtool.progress import track

log = logging.getLogger("plmtool")


def _input_device(model: torch.nn.Module) -> torch.device:
    # With accelerate's device_map the embeddings may live on a different device than later layers;
    # inputs go where the embedding is.
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


def window_count(n_tokens: int, seqlen: int, max_tokens: int | None = None) -> int:
    """Number of whole windows scored: tail dropped, and at most max_tokens // seqlen windows."""
    windows = n_tokens // seqlen
    if max_tokens is not None:
        windows = min(windows, max_tokens // seqlen)
    return windows


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    seqlen: int,
    batch_size: int = 1,
    max_tokens: int | None = None,
) -> dict[str, Any]:
    """Perplexity of `model` on a 1-D token stream, per the non-overlapping-window protocol.

    Returns {"ppl", "nll" (mean NLL per prediction, nats), "tokens" (tokens consumed: windows *
    seqlen), "predicted" (windows * (seqlen - 1)), "windows", "seqlen"}.
    `max_tokens` caps the tokens consumed, in whole windows (the first windows of the stream).
    """
    seqlen = int(seqlen)
    if seqlen < 2:
        raise PlmtoolError(f"perplexity seqlen must be at least 2 (got {seqlen})")
    if batch_size < 1:
        raise PlmtoolError(f"perplexity batch_size must be at least 1 (got {batch_size})")
    if max_tokens is not None and max_tokens < seqlen:
        raise PlmtoolError(f"eval.max_tokens={max_tokens} is smaller than one window of seqlen={seqlen} tokens")
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise PlmtoolError(f"perplexity expects a 1-D token stream, got shape {tuple(ids.shape)}")
    n_windows = window_count(ids.numel(), seqlen, max_tokens)
    if n_windows == 0:
        raise PlmtoolError(f"evaluation text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")

    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos is not None and seqlen > max_pos:
        log.warning("perplexity seqlen %d exceeds the model's max_position_embeddings %d", seqlen, max_pos)

    device = _input_device(model)
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen)
    was_training = model.training
    model.eval()
    total_nll = 0.0  # python float (double precision) across batches
    starts = range(0, n_windows, batch_size)
    try:
        for start in track(starts, f"perplexity (seqlen {seqlen})", total=len(starts)):
            batch = windows[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            # Upcast per window: the loss must not be computed in bf16/fp16, and one window at a time
            # keeps the fp32 copy of [seqlen, vocab] logits small.
            for row in range(batch.shape[0]):
                shift_logits = logits[row, :-1, :].float()
                shift_labels = batch[row, 1:].to(shift_logits.device)
                nll = F.cross_entropy(shift_logits, shift_labels, reduction="sum")
                total_nll += float(nll)
            del logits
    finally:
        if was_training:
            model.train()

    predicted = n_windows * (seqlen - 1)
    mean_nll = total_nll / predicted
    return {
        "ppl": math.exp(mean_nll),
        "nll": mean_nll,
        "tokens": n_windows * seqlen,
        "predicted": predicted,
        "windows": n_windows,
        "seqlen": seqlen,
    }
