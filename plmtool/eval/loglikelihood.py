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

Savings on top, none of which changes the computation: requests with the same context share one
input row (the context once, then each continuation as a branch that attends to the context and
to itself, at the positions it would have alone: a 4D attention mask and explicit position ids);
the vocabulary projection runs only on the positions that are read; batches are filled by a token
budget in descending length order so padding stays small.

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


def _positions(model, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, reads: list[list[int]]) -> list[torch.Tensor]:
    """Logits at the listed positions of each row. The vocabulary projection is applied only to
    those positions (it is the largest matmul of a small model and its output the largest tensor);
    models whose head does more than a projection (logit soft-capping, scaling) take the full path."""
    cfg = getattr(model, "config", None)
    plain_head = not any(getattr(cfg, a, None) for a in ("final_logit_softcapping", "logit_scale", "output_mult"))
    head = model.get_output_embeddings() if plain_head else None
    decoder = model.get_decoder() if plain_head and hasattr(model, "get_decoder") else None
    kwargs = dict(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False)
    if head is None or decoder is None:
        logits = model(**kwargs).logits
        return [logits[r, idx] for r, idx in enumerate(reads)]
    hidden = decoder(**kwargs)[0]
    picked = torch.cat([hidden[r, idx] for r, idx in enumerate(reads)])
    return list(head(picked).split([len(idx) for idx in reads]))


class _Row:
    """One model input: a context and the branches of the continuations that share it."""

    def __init__(self, ctx_len: int, ids: list[int], positions: list[int], branches: list[tuple[int, int]],
                 reads: list[tuple[int, slice]], read_positions: list[int]):
        self.ctx_len, self.ids, self.positions, self.branches = ctx_len, ids, positions, branches
        self.reads = reads  # (request, slice of read_positions)
        self.read_positions = read_positions  # positions whose logits are read, in read order

    @classmethod
    def pack(cls, ctx: list[int], members: list[tuple[int, list[int]]], limit: int) -> "list[_Row]":
        branch_tokens = sum(len(c) - 1 for _, c in members)
        if len(ctx) + branch_tokens > limit or not ctx:
            # too long to pack (or nothing to share): lm-eval's own input per request, left-truncated
            out = []
            for r, cont in members:
                inp = (ctx + cont)[-(limit + 1):][:-1]
                n = len(inp)
                out.append(cls(n, inp, list(range(n)), [], [(r, slice(0, len(cont)))], list(range(n - len(cont), n))))
            return out
        n = len(ctx)
        ids, positions, branches, reads, read_positions = list(ctx), list(range(n)), [], [], []
        for r, cont in members:
            start = len(ids)
            ids += cont[:-1]
            positions += range(n, n + len(cont) - 1)
            branches.append((start, len(ids)))
            first = len(read_positions)
            read_positions += [n - 1, *range(start, len(ids))]  # the last context token predicts cont[0]
            reads.append((r, slice(first, len(read_positions))))
        return [cls(n, ids, positions, branches, reads, read_positions)]

    def mask(self) -> torch.Tensor:
        """[len, len] bool, True = may attend: causal on the context, each branch on the context and
        on its own earlier tokens."""
        n = len(self.ids)
        m = torch.ones(n, n, dtype=torch.bool).tril_()
        for a, b in self.branches:
            m[a:b, self.ctx_len : a] = False
        return m


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
    # Requests whose context encodes the same share one packed row: the context once, then every
    # continuation (minus its last token) as its own branch that sees the context and itself.
    groups: dict[tuple[int, ...], list[int]] = {}
    for r, (ctx, cont) in enumerate(encoded):
        if not cont:
            raise PlmtoolError("a zero-shot request has an empty continuation after tokenization")
        if len(cont) > limit:
            raise PlmtoolError(f"a zero-shot continuation of {len(cont)} tokens exceeds the model's {limit}")
        groups.setdefault(tuple(ctx), []).append(r)
    rows: list[_Row] = []
    for ctx, members in groups.items():
        rows.extend(_Row.pack(list(ctx), [(r, encoded[r][1]) for r in members], limit))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].ids))
    lengths = [len(row.ids) for row in rows]

    device = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    out: list[tuple[float, bool] | None] = [None] * len(encoded)
    batches = list(_batches(order, lengths, batch_size, max_batch_tokens))
    try:
        for batch in track(batches, description, total=len(batches)):
            width = lengths[batch[0]]
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            pos = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.eye(width, dtype=torch.bool).repeat(len(batch), 1, 1)  # padding sees itself
            for b, i in enumerate(batch):
                n = lengths[i]
                ids[b, :n] = torch.tensor(rows[i].ids)
                pos[b, :n] = torch.tensor(rows[i].positions)
                mask[b, :n, :n] = rows[i].mask()
            reads = [rows[i].read_positions for i in batch]
            logits = _positions(model, ids.to(device), pos.to(device), mask[:, None].to(device), reads)
            for i, row_logits in zip(batch, logits):
                logp = F.log_softmax(row_logits.float(), dim=-1)
                for r, sl in rows[i].reads:
                    cont = encoded[r][1]
                    tail = logp[sl]
                    target = torch.tensor(cont, device=tail.device)
                    greedy = bool((tail.argmax(-1) == target).all())
                    out[r] = (float(tail.gather(1, target[:, None]).sum()), greedy)
            del logits
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]
