"""Log-likelihood of continuations given contexts, as lm-eval's `HFLM` computes it, batched.

lm-eval's zero-shot tasks (multiple choice and plain loglikelihood) reduce to requests
(context, continuation) -> (sum of the continuation's token log-probs, whether every continuation
token is the greedy choice). This module reproduces `HFLM.loglikelihood` for causal models:

  * encoding (`encode_pair`): trailing spaces of the context move to the continuation; the whole
    string and the context are encoded separately and the continuation is the whole's tail; an
    empty context becomes the prefix token (BOS, else EOS);
  * scoring: the input is (context + continuation)[-(max_length+1):][:-1], right-padded in a batch,
    no attention mask (padding sits after every real token, so causal attention never sees it),
    log-softmax in fp32, the continuation's positions gathered and summed.

Two savings on top, neither of which changes a number: requests whose model input is identical
(e.g. the one-token answers " yes" / " no" after one BoolQ passage) share one forward, and
batches are filled by a token budget in descending length order so padding stays small.

It needs only torch and a tokenizer, so pre-built requests can be scored on machines without
lm-eval or datasets.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from plmtool.errors import PlmtoolError
from plmtool.progress import track


def prefix_token_id(tokenizer) -> int:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def _encode(tokenizer, text: str, prefix: str | None) -> list[int]:
    # HFLM.tok_encode: the tokenizer's own default for special tokens, except that a string which
    # already starts with the prefix token's text gets none added.
    if prefix and text.startswith(prefix):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) exactly as lm-eval's HFLM encodes a request."""
    prefix_id = prefix_token_id(tokenizer)
    if context == "":
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        return ([prefix_id], cont) if prefix_id != cont[0] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    prefix = tokenizer.decode(prefix_id)
    whole = _encode(tokenizer, context + continuation, prefix)
    ctx = _encode(tokenizer, context, prefix)
    return ctx, whole[len(ctx):]


def max_length(model, tokenizer, override: int | None = None) -> int:
    """HFLM's rule: an explicit value, else the model's context size, else the tokenizer's, else 2048."""
    if override:
        return int(override)
    cfg = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, attr, None)
        if value:
            return int(value)
    tok_max = getattr(tokenizer, "model_max_length", None)
    if tok_max and tok_max < 10**9:
        return int(tok_max)
    return 2048


def _positions(model, ids: torch.Tensor, spans: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Logits of positions [start, end) of each row. The vocabulary projection is applied only to
    those positions (it is the largest matmul of a small model and its output the largest tensor);
    models whose head does more than a projection (logit soft-capping, scaling) take the full path."""
    cfg = getattr(model, "config", None)
    plain_head = not any(getattr(cfg, a, None) for a in ("final_logit_softcapping", "logit_scale", "output_mult"))
    head = model.get_output_embeddings() if plain_head else None
    decoder = model.get_decoder() if plain_head and hasattr(model, "get_decoder") else None
    if head is None or decoder is None:
        logits = model(input_ids=ids, use_cache=False).logits
        return [logits[r, a:b] for r, (a, b) in enumerate(spans)]
    hidden = decoder(input_ids=ids, use_cache=False)[0]
    picked = torch.cat([hidden[r, a:b] for r, (a, b) in enumerate(spans)])
    out = head(picked)
    return list(out.split([b - a for a, b in spans]))


def _batches(order: list[int], lengths: list[int], batch_size: int, max_batch_tokens: int | None) -> Iterator[list[int]]:
    batch: list[int] = []
    for i in order:  # descending length: the first of a batch sets its padded width
        width = lengths[batch[0]] if batch else lengths[i]
        if batch and (len(batch) >= batch_size or (max_batch_tokens and width * (len(batch) + 1) > max_batch_tokens)):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


@torch.inference_mode()
def score(
    model,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    *,
    batch_size: int = 32,
    max_batch_tokens: int | None = 16384,
    max_len: int | None = None,
    description: str = "loglikelihood",
) -> list[tuple[float, bool]]:
    """[(sum log-prob of the continuation, continuation is greedy)] for each (context, continuation)."""
    if batch_size < 1:
        raise PlmtoolError(f"eval.zeroshot_batch_size must be at least 1 (got {batch_size})")
    limit = max_length(model, tokenizer, max_len)
    encoded = [encode_pair(tokenizer, c, x) for c, x in requests]
    # One forward per distinct model input; each request then reads its continuation's positions.
    inputs: dict[tuple[int, ...], int] = {}
    readers: list[list[int]] = []  # per distinct input: the requests reading it
    for r, (ctx, cont) in enumerate(encoded):
        if not cont:
            raise PlmtoolError("a zero-shot request has an empty continuation after tokenization")
        if len(cont) > limit:
            raise PlmtoolError(f"a zero-shot continuation of {len(cont)} tokens exceeds the model's {limit}")
        idx = inputs.setdefault(tuple((ctx + cont)[-(limit + 1):][:-1]), len(inputs))
        if idx == len(readers):
            readers.append([])
        readers[idx].append(r)
    unique = list(inputs)
    lengths = [len(u) for u in unique]
    order = sorted(range(len(unique)), key=lambda i: -lengths[i])
    # per distinct input: the positions of its longest continuation get the vocabulary projection
    need = [max(len(encoded[r][1]) for r in rs) for rs in readers]

    device = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    out: list[tuple[float, bool] | None] = [None] * len(encoded)
    batches = list(_batches(order, lengths, batch_size, max_batch_tokens))
    try:
        for batch in track(batches, description, total=len(batches)):
            width = lengths[batch[0]]
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, : lengths[i]] = torch.tensor(unique[i])
            rows = _positions(model, ids.to(device), [(lengths[i] - need[i], lengths[i]) for i in batch])
            for i, logits in zip(batch, rows):
                logp = F.log_softmax(logits.float(), dim=-1)
                for r in readers[i]:
                    cont = encoded[r][1]
                    tail = logp[-len(cont):]
                    target = torch.tensor(cont, device=tail.device)
                    greedy = bool((tail.argmax(-1) == target).all())
                    out[r] = (float(tail.gather(1, target[:, None]).sum()), greedy)
            del rows
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]
