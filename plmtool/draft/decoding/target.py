"""The target model run over a static KV cache: prefill, plain decoding and tree verification.

Hugging Face's forward pays a large per-call overhead (cache objects, mask construction, kwargs
plumbing) that dominates decoding for small targets. This runner calls the model's own modules
(embeddings, norms, projections, MLPs, rotary embedding, lm_head) but does the attention itself
over a preallocated cache with an explicit boolean mask, so

* a tree of `n` candidate nodes is verified in one forward: node i attends to the committed
  prefix and to its own ancestors in the tree, at position `length + depth(i)`;
* every step of a given tree shape has the same tensor shapes and no host-side decisions, so it is
  captured once as a CUDA graph and replayed (one launch per step instead of hundreds);
* grouped-query attention never expands the cache: the query heads of a group are folded into the
  query length, `[B, Hq, n, D] -> [B, Hkv, g*n, D]`, and attend to their shared key/value head.

Supported: decoder-only Llama-style blocks (Llama 1-3, Mistral without a sliding window reached,
Qwen2, Qwen3 with q/k norms, SmolLM2). Anything else raises a clear error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from plmtool.cuda_graph import CapturedGraph, capture_checked, compare, tolerance
from plmtool.draft.decoding.device import check_device, variable_shape_attention
from plmtool.draft.decoding.kv_cache import StaticKVCache
from plmtool.errors import PlmtoolError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def check_supported(model, max_len: int | None = None) -> None:
    cfg = model.config
    mtype = getattr(cfg, "model_type", None)
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise PlmtoolError(
            f"the decoding engine supports {', '.join(SUPPORTED_MODEL_TYPES)} targets; got model_type '{mtype}'"
        )
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True) and max_len and max_len > window:
        raise PlmtoolError(f"context of {max_len} tokens exceeds the model's sliding window {window}, which the engine does not implement")


def decoder_layer_step(runner: "TargetRunner", layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, fmask: torch.Tensor,
                       span: int) -> torch.Tensor:
    """One decoder layer over the static cache: x [b, n, H] -> [b, n, H]; writes the new keys and
    values at `slots` of this layer's cache rows (`k_cache`/`v_cache` [b, kv_heads, max_len, d]):
    `slots` [n] puts every row's nodes in the same slots (batch 1, prefills), [b, n] gives each row
    its own (a batch of sequences of different lengths)."""
    b, n = x.shape[0], x.shape[1]
    g, hkv, d = runner.groups, runner.kv_heads, runner.head_dim
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    q = attn.q_proj(h).view(b, n, runner.n_heads, d)
    k = attn.k_proj(h).view(b, n, hkv, d)
    v = attn.v_proj(h).view(b, n, hkv, d)
    if runner.qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    if slots.dim() == 1:
        k_cache.index_copy_(2, slots, k)
        v_cache.index_copy_(2, slots, v)
    else:
        where = slots.view(b, 1, n, 1).expand(b, hkv, n, d)
        k_cache.scatter_(2, where, k)
        v_cache.scatter_(2, where, v)
    o = F.scaled_dot_product_attention(q.reshape(b, hkv, g * n, d), k_cache[:, :, :span], v_cache[:, :, :span],
                                       attn_mask=fmask, scale=runner.scaling)
    o = o.reshape(b, runner.n_heads, n, d).transpose(1, 2).reshape(b, n, runner.n_heads * d)
    x = x + attn.o_proj(o)
    return x + layer.mlp(layer.post_attention_layernorm(x))


def tree_inputs(runner: "TargetRunner", start: torch.Tensor, depth: torch.Tensor, ancestors: torch.Tensor,
                span: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slots [b, n], positions [b, n] and the attention mask [b, 1, n, span] of a tree step whose
    nodes go after `start` [b] committed tokens in each row: node i sits at position
    start + depth(i) and sees the committed prefix and its own ancestors. Computed on the device
    from device tensors, so a step built on it can be captured as a CUDA graph."""
    n = int(depth.numel())
    start = start.view(-1, 1)
    slots = start + torch.arange(n, device=start.device)
    positions = start + depth.view(1, n)
    cols = runner.slot_ids[:span].view(1, -1)
    rel = cols - start  # [b, span]: a column's offset from the row's first tree slot
    in_tree = (rel >= 0) & (rel < n)
    tree_part = ancestors[:, rel.clamp(0, n - 1)].transpose(0, 1) & in_tree.unsqueeze(1)  # [b, n, span]
    mask = (cols < start).unsqueeze(1) | tree_part
    return slots, positions, mask.unsqueeze(1)


_COMPILED_LAYER_STEP = None


def _compiled_layer_step():
    """`decoder_layer_step` compiled once per process ("regional" compilation): every layer of
    every runner calls the same compiled code (the layer's weights are inputs, not constants), so
    the compiler works on one layer per step shape instead of the whole unrolled model (on the
    CPU, SmolLM2's 30 layers: 6 s instead of 85 s)."""
    global _COMPILED_LAYER_STEP
    if _COMPILED_LAYER_STEP is None:
        _COMPILED_LAYER_STEP = torch.compile(decoder_layer_step, dynamic=False)
    return _COMPILED_LAYER_STEP


class TargetRunner:
    """Static-cache forward of a causal LM over `batch_size` cache rows (one sequence per row;
    the prefill and batch-1 API work on one row).

    `compile=True` also provides a forward whose decoder layers run `torch.compile`d (static
    shapes) for step programs to capture in their CUDA graph: the compiler fuses the ~25 small
    kernels of each layer (norms, rotary, residual adds, activation) into a few, which is what
    bounds a small target's step. The compiled step is checked against the eager one when
    captured (see StepProgram)."""

    def __init__(self, model, max_len: int, compile: bool = False, batch_size: int = 1):
        check_supported(model, max_len)
        cfg = model.config
        limit = getattr(cfg, "max_position_embeddings", None)
        if limit and max_len > limit:
            max_len = int(limit)
        base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.model = model
        self.embed = base.embed_tokens
        self.layers = list(base.layers)
        self.norm = base.norm
        self.rotary = base.rotary_emb
        self.lm_head = model.lm_head
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.n_heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.groups = self.n_heads // self.kv_heads
        self.scaling = attn.scaling
        self.qk_norm = hasattr(attn, "q_norm")
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.hidden_size = cfg.hidden_size
        self.vocab_size = self.lm_head.weight.shape[0]
        self.max_len = max_len
        self.batch_size = batch_size
        self.cache = StaticKVCache(len(self.layers), self.kv_heads, self.head_dim, max_len, batch_size, self.device, self.dtype)
        self.slot_ids = torch.arange(max_len, device=self.device)
        # the compiled layer step specialises per step shape (1 node, the tree's n nodes)
        self.compiled_forward = self._compiled if compile else None
        self.prefill_graphs = None  # PrefillGraphs, from enable_prefill_graphs()
        self.prefill_graphs_failed = False

    @property
    def length(self) -> int:
        return self.cache.length

    def reset(self) -> None:
        self.cache.reset()

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor, span: int):
        """ids/positions [1, n]; slots [n] where the new k/v go; mask [1, 1, n, span] over slots [0, span).

        Returns (logits [n, V], hidden [n, H]); `hidden` is the final-norm output fed to lm_head,
        which is what drafters read.
        """
        logits, hidden = self._forward(ids, positions, slots, mask, span)
        return logits[0], hidden[0]

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor, span: int,
                 layer_step=None, rows: slice = slice(0, 1)):
        """Batched: ids/positions [b, n] -> (logits [b, n, V], hidden [b, n, H]) over cache `rows` (b of them)."""
        hidden = self.hidden_states(ids, positions, slots, mask, span, layer_step, rows)
        return self.lm_head(hidden), hidden

    def hidden_states(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor,
                      span: int, layer_step=None, rows: slice = slice(0, 1)) -> torch.Tensor:
        """The forward without the vocabulary projection: the final-norm output [b, n, H], for
        sequences in cache `rows`."""
        layer_step = layer_step or decoder_layer_step
        x = self.embed(ids)
        cos, sin = self.rotary(x, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        # rows of the folded query are (group member, node): repeat the node mask per member
        g = self.groups
        fmask = mask if g == 1 else mask.repeat(1, 1, g, 1)
        for i, layer in enumerate(self.layers):
            x = layer_step(self, layer, x, cos, sin, self.cache.k[i][rows], self.cache.v[i][rows], slots, fmask, span)
        return self.norm(x)

    def _compiled(self, ids, positions, slots, mask, span, rows: slice = slice(0, 1)):
        return self._forward(ids, positions, slots, mask, span, layer_step=_compiled_layer_step(), rows=rows)

    @torch.no_grad()
    def prefill(self, prompt: list[int], graphs: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Reset the cache and run the prompt: (logits of its last token [V], hidden states [n, H]).
        With `graphs`, replays a padded prefill (`enable_prefill_graphs`) where one was captured."""
        self.reset()
        if graphs and self.prefill_graphs is not None:
            return self.prefill_graphs(prompt)
        with variable_shape_attention():
            logits, hidden = self.extend(prompt)
        return logits[-1], hidden

    def enable_prefill_graphs(self, row: int = 0, lengths: list[int] | None = None, cuda_graphs: bool | None = None) -> None:
        """Capture the prefill into cache `row` for a ladder of padded prompt lengths (once per
        runner; engines that share the runner share them). Logs and keeps the eager prefill where
        capture fails."""
        if self.prefill_graphs is None and not self.prefill_graphs_failed:
            from plmtool.draft.decoding.prefill import PrefillGraphs

            # the graphs check themselves against eager prefills when built (raising on a mismatch)
            self.prefill_graphs = capture_checked("prefill CUDA graphs", "prefilling eagerly",
                                                  lambda: PrefillGraphs(self, lengths, cuda_graphs, row=row), cleanup=self.reset)
            self.prefill_graphs_failed = self.prefill_graphs is None  # engines sharing this runner do not try again

    @torch.no_grad()
    def extend(self, ids: list[int] | torch.Tensor, row: int = 0):
        """Append tokens causally after the committed prefix (prefill) in cache `row`; returns
        (logits, hidden) for them. A batch of sequences keeps its lengths itself: it sets
        `cache.length` to the row's length first."""
        ids = torch.as_tensor(ids, device=self.device, dtype=torch.long).view(1, -1)
        n, start = ids.shape[1], self.cache.length
        if start + n > self.max_len:
            raise PlmtoolError(f"sequence of {start + n} tokens exceeds the engine's context of {self.max_len}")
        slots = self.slot_ids[start : start + n]
        span = start + n
        mask = self.slot_ids[:span].view(1, -1) <= slots.view(-1, 1)
        logits, hidden = self._forward(ids, slots.view(1, -1), slots, mask.view(1, 1, n, span), span, rows=slice(row, row + 1))
        self.cache.length = span
        return logits[0], hidden[0]


class StepProgram:
    """One verification step for a fixed tree shape (`n = 1` is plain decoding), over the first
    `rows` sequences of the runner's cache (one tree per row).

    Inputs go into static buffers (`tokens` [rows, n], `start` [rows]); the forward derives slots,
    positions and the tree mask from them on the device, so the whole step can be captured as a
    CUDA graph. Outputs: logits [n, V] and hidden states [n, H] for one row, [rows, n, ...] for more.
    """

    def __init__(self, runner: TargetRunner, depth: torch.Tensor, ancestors: torch.Tensor, cuda_graph: bool = False,
                 pool=None, sync_check: bool = False, rows: int = 1, span: int | None = None):
        """`sync_check`: synchronise after each step so a device fault names this program; `span`:
        the cache slots a captured step attends to (default all): a shorter span serves sequences
        whose every row ends before it, at less attention work."""
        if not 1 <= rows <= runner.batch_size:
            raise ValueError(f"a step over {rows} rows of a cache of {runner.batch_size}")
        self.span = runner.max_len if span is None else min(int(span), runner.max_len)
        self.runner = runner
        self.sync_check = sync_check
        self.rows = rows
        dev = runner.device
        self.n = int(depth.numel())
        self.depth = depth.to(dev)
        self.ancestors = ancestors.to(dev)
        self.node_ids = torch.arange(self.n, device=dev)
        self.tokens = torch.zeros(rows, self.n, dtype=torch.long, device=dev)
        self.start = torch.zeros(rows, dtype=torch.long, device=dev)
        self.graph: CapturedGraph | None = None
        self.compiled = False  # the captured graph runs the compiled forward
        self.check_errors: dict[str, float] = {}  # relative errors the self-check measured
        if cuda_graph and runner.compiled_forward is not None:
            self.graph = capture_checked(f"compiled {self.n}-node step", "capturing the eager step",
                                         lambda: self.capture(pool, compiled=True), check=self._self_check)
            self.compiled = self.graph is not None
        if cuda_graph and self.graph is None:  # a model whose modules cannot be captured still decodes eagerly
            self.graph = capture_checked(f"{self.n}-node step CUDA graph{'' if rows == 1 else f' ({rows} rows)'}",
                                         "decoding eagerly", lambda: self.capture(pool))

    @property
    def out(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The captured step's outputs (logits, hidden), refilled by each replay."""
        return self.graph.out if self.graph is not None else None

    def _run(self, span: int, compiled: bool = False):
        r = self.runner
        slots, positions, mask = tree_inputs(r, self.start, self.depth, self.ancestors, span)
        forward = r.compiled_forward if compiled else r._forward
        # one row writes its keys with index_copy (the same slots for the batch of one)
        logits, hidden = forward(self.tokens, positions, slots[0] if self.rows == 1 else slots, mask, span,
                                 rows=slice(0, self.rows))
        return (logits[0], hidden[0]) if self.rows == 1 else (logits, hidden)

    @torch.no_grad()
    def capture(self, pool=None, compiled: bool = False) -> CapturedGraph:
        """The step captured over the whole cache (no self-check: the constructor runs it where
        the compiled step is captured)."""
        r = self.runner
        saved = r.cache.length
        graph = CapturedGraph(f"{self.n}-node target step", lambda: self._run(self.span, compiled), self._buffers, pool)
        r.cache.length = saved
        return graph

    def _buffers(self) -> tuple[torch.Tensor, ...]:
        """The persistent tensors the graph reads or writes: the shared cache, the static inputs,
        the index tables."""
        r = self.runner
        return (r.cache.k, r.cache.v, r.slot_ids, self.tokens, self.start, self.depth, self.ancestors, self.node_ids)

    # The self-check's state: a cache prefilled (eagerly) with this many random tokens.
    CHECK_PREFIX = 16

    @torch.no_grad()
    def _self_check(self, graph: CapturedGraph, seed: int = 0) -> str | None:
        """Replay of the captured (compiled) step vs the eager forward, on random tokens after a
        cache prefilled eagerly with random tokens: logits, hidden states and the cache writes must
        agree to within rounding (fused kernels round differently, so not bit for bit in low
        precision). None when they agree; the cache is left as garbage past length 0 (callers reset).

        The state must be one the model meets when decoding. A cache of N(0,1) noise (what this
        check used first) drives a trained model far outside its activation range, where rounding
        alone is amplified through the layers: on SmolLM2-135M in bf16 (CPU), eager against eager
        with only the attention span changed differed by up to 0.65 in relative logit error, and a
        correct compiled step by up to 0.64 (over 0.05 in 9 of 12 draws), so the check rejected
        it, as it did on the GPU (0.39 / 0.37)."""
        r = self.runner
        g = torch.Generator(device=r.device).manual_seed(seed)
        start = max(0, min(self.CHECK_PREFIX, self.span - self.n))
        r.reset()
        if start:
            r.extend(torch.randint(0, r.vocab_size, (start,), generator=g, device=r.device))
        self.tokens.random_(0, r.vocab_size, generator=g)
        before = r.cache.k.clone(), r.cache.v.clone()
        self.start.fill_(start)
        ref = [t.clone() for t in self._run(start + self.n)]
        ref_kv = r.cache.k.clone(), r.cache.v.clone()
        r.cache.k.copy_(before[0])
        r.cache.v.copy_(before[1])
        out = graph.replay()
        new = slice(start, start + self.n)  # the slots this step writes
        pairs = [("logits", out[0], ref[0]), ("hidden", out[1], ref[1]),
                 ("keys", r.cache.k[..., new, :], ref_kv[0][..., new, :]),
                 ("values", r.cache.v[..., new, :], ref_kv[1][..., new, :])]
        self.check_errors, problem = compare(pairs, tolerance("forward", r.dtype))
        r.cache.length = 0
        if problem:
            return problem
        for name, got, want in (("keys", r.cache.k, ref_kv[0]), ("values", r.cache.v, ref_kv[1])):
            if not (torch.equal(got[..., :start, :], want[..., :start, :])
                    and torch.equal(got[..., start + self.n :, :], want[..., start + self.n :, :])):
                return f"the step wrote {name} outside its slots"
        return None

    def launch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the captured step on what its buffers hold (`tokens`, `start` written on the
        device by the previous program); for loops that keep the step's inputs on the device."""
        return self.graph.replay()

    def run(self, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The step on what its buffers hold: the replay, or eagerly attending to slots [0, span)
        (the caller's bound on every row's `start + n`, checked by the caller on the host)."""
        out = self.graph.replay() if self.graph is not None else self._run(span)
        if self.sync_check:
            check_device(f"the {self.n}-node target step over {self.rows} rows")
        return out

    def eager(self, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The step run eagerly on its buffers, attending to slots [0, span)."""
        return self._run(span)

    def check_room(self, start: int) -> None:
        """Raise unless a step from slot `start` fits the cache (checked on the host: the replay
        would write out of bounds instead of raising)."""
        if start + self.n > self.runner.max_len:
            raise PlmtoolError(f"sequence would exceed the engine's context of {self.runner.max_len} tokens")

    def __call__(self, tokens: torch.Tensor, start: int):
        r = self.runner
        self.check_room(start)
        if start < 0 or tokens.numel() != self.n:
            raise ValueError(f"step of {self.n} nodes called with {tokens.numel()} tokens at slot {start}")
        self.tokens.copy_(tokens.view(1, -1))
        self.start.fill_(start)
        if self.graph is not None:
            out = self.graph.replay()
        else:  # eager: attend only to the live part of the cache
            out = self._run(start + self.n)
        if self.sync_check:
            check_device(f"the {self.n}-node target step{' graph replay' if self.graph is not None else ''}")
        return out
