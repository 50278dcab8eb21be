"""Amphista (Li et al., NAACL 2025): bi-directional multi-head drafting.

    x_t   = h_t + fuse(h_t, E[next_token_t])            sampled-token fusion (concat+Linear | add)
    s^1   = Stage1(x)   s^2 = Stage2(s^1)                staged adaptation: causal decoder layers with
                                                         their own KV cache (accepted tokens only)
    u_t,k = ResBlocks_k(s^{stage(k)}_t) + P_k            K head states, learned head positions
    z_t   = AutoEmbedding([u_t,0 .. u_t,K-1])            bidirectional encoder over the K heads
    logits_t,k = LMHead(z_t,k)                           shared or per-head vocabulary projection

All K drafts come out of one parallel pass (no autoregressive drafting); the auto-embedding block
lets every head see every other head's state, which Medusa's independent heads cannot. Parts the
public descriptions leave open (layers per stage, which heads read which stage, fusion, shared lm
head, K) are knobs in DrafterConfig; every component has a switch for ablations. New residual
branches start at zero, so an untrained drafter predicts what the target's lm_head says for h_t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from plmtool.draft.config import DrafterConfig
from plmtool.draft.interface import Drafter, VocabProjection, last_rows
from plmtool.draft.medusa import ResBlock


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x).to(dtype)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, head_dim] (float32, half-split layout) of the rotary embedding at `positions` [T]."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    ang = positions.to(torch.float32)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], -1)
    return ang.cos(), ang.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, T, d] by tables [T, d] from `rope_tables`."""
    d = x.shape[-1]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class TransformerLayer(nn.Module):
    """Pre-norm self-attention + SwiGLU MLP. Causal with RoPE (adaptation layers) or
    bidirectional without positions (auto-embedding block, which adds learned ones).
    Output projections start at zero so a new layer is the identity."""

    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float, causal: bool, rope_theta: float):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not divisible by {heads} attention heads")
        self.heads, self.head_dim, self.causal, self.rope_theta = heads, hidden // heads, causal, rope_theta
        self.attn_norm = RMSNorm(hidden, eps)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        self.mlp_norm = RMSNorm(hidden, eps)
        self.gate_up = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down = nn.Linear(intermediate, hidden, bias=False)
        for lin in (self.qkv, self.gate_up):
            nn.init.normal_(lin.weight, std=hidden**-0.5)
        nn.init.zeros_(self.o_proj.weight)
        nn.init.zeros_(self.down.weight)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v  # each [B, heads, T, d]

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                kv: "LayerCache | None" = None, slots: int | torch.Tensor = 0, span: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Full sequence (kv None): causal over x itself. Incremental (kv given): the new keys/values
        go to `slots` (a host int = first slot of a contiguous run, a device tensor [T] of slots, or
        [B, T]: each row its own), the queries attend to cache slots [0, span) under `mask`
        [1 or B, 1, T, span]. Nothing here reads a device value on the host, so an incremental call
        can be replayed in a CUDA graph."""
        b, t, h = x.shape
        q, k, v = self._split(self.attn_norm(x))
        if self.causal:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if kv is None:
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            if isinstance(slots, int):
                kv.k[:, :, slots : slots + t].copy_(k)
                kv.v[:, :, slots : slots + t].copy_(v)
            elif slots.dim() == 1:
                kv.k.index_copy_(2, slots, k.to(kv.k.dtype))
                kv.v.index_copy_(2, slots, v.to(kv.v.dtype))
            else:
                where = slots.view(b, 1, t, 1).expand(b, self.heads, t, self.head_dim)
                kv.k.scatter_(2, where, k.to(kv.k.dtype))
                kv.v.scatter_(2, where, v.to(kv.v.dtype))
            keys, values = kv.k[:, :, :span].to(q.dtype), kv.v[:, :, :span].to(q.dtype)
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        x = x + self.o_proj(attn.transpose(1, 2).reshape(b, t, h))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


@dataclass
class LayerCache:
    k: torch.Tensor  # [B, heads, max_len, d]
    v: torch.Tensor


@dataclass
class AmphistaCache:
    """KV cache of the adaptation layers plus the step's constant tables, all preallocated.

    `length` (positions filled, shared by the batch) lives on the host: the caller knows how many
    tokens it accepted, so no step ever reads it back from the device. `start` is its device-side
    copy, read only by `step_static` (a CUDA-graph-ready step cannot take a host int)."""

    layers: list[LayerCache]  # one per adaptation layer, stage by stage
    length: int
    max_len: int
    slot_ids: torch.Tensor  # [max_len] 0..max_len-1
    cos: torch.Tensor  # [max_len, head_dim] rotary tables (float32), sliced per step
    sin: torch.Tensor
    start: torch.Tensor  # [B] long, each row's length: == length after every step / crop of one row


class AmphistaDrafter(Drafter):
    def __init__(self, cfg: DrafterConfig, dims: dict):
        super().__init__()
        self.cfg = cfg
        self.dims = dict(dims)
        self.num_heads = K = cfg.num_heads
        self.hidden_size = H = int(dims["hidden_size"])
        self.vocab_size = V = int(dims["vocab_size"])
        heads = cfg.num_attention_heads or int(dims.get("num_attention_heads") or max(1, H // 64))
        inter = cfg.intermediate_size or int(dims.get("intermediate_size") or 4 * H)

        # sampled-token fusion; the embedding table is a frozen copy of the target's. Both inputs
        # are RMS-normalised first: the target's embeddings are ~15x smaller than its final hidden
        # states (SmolLM2: RMS 0.13 vs 2), so raw inputs would leave the token nearly unheard.
        self.embed = None
        self.fuse = None
        self.fuse_gain = None
        if cfg.use_token_embedding:
            self.embed = nn.Embedding(V, H)
            self.embed.weight.requires_grad_(False)
            self.embed_norm = RMSNorm(H, cfg.norm_eps)
            if cfg.fusion == "concat":
                # x = h + W [norm(h); norm(e)], W zero: a residual branch that starts at h_t
                self.hidden_norm = RMSNorm(H, cfg.norm_eps)
                self.fuse = nn.Linear(2 * H, H, bias=False)
                nn.init.zeros_(self.fuse.weight)
            else:
                # x = h + g * norm(e), gain g zero: starts at h_t
                self.fuse_gain = nn.Parameter(torch.zeros(H))

        # staged adaptation layers
        n_stages = len(cfg.stage_layers) if cfg.use_staged_adaptation else 0
        self.stages = nn.ModuleList(
            nn.ModuleList(TransformerLayer(H, heads, inter, cfg.norm_eps, True, cfg.rope_theta) for _ in range(n))
            for n in (cfg.stage_layers if n_stages else [])
        )
        if n_stages:
            split = list(cfg.stage_heads) if cfg.stage_heads is not None else _even_split(K, n_stages)
            # head k reads the output of stage head_stage[k] (1-based; 0 = the fused input)
            self.head_stage = [s + 1 for s, n in enumerate(split) for _ in range(n)]
        else:
            self.head_stage = [0] * K

        self.head_blocks = nn.ModuleList(nn.Sequential(*[ResBlock(H) for _ in range(cfg.head_resblocks)]) for _ in range(K))
        self.position = None
        if cfg.use_position_embedding:
            # zero start keeps the untrained drafter == lm_head(h_t); the heads' different labels
            # give each position its own gradient, so the symmetry breaks on the first step
            self.position = nn.Parameter(torch.zeros(K, H))
        self.auto_embedding = nn.ModuleList(
            TransformerLayer(H, heads, inter, cfg.norm_eps, False, cfg.rope_theta)
            for _ in range(cfg.auto_embedding_layers if cfg.use_auto_embedding else 0)
        )
        self.norm = RMSNorm(H, cfg.norm_eps) if cfg.final_norm else None
        self.lm_head = VocabProjection(K, H, V, cfg.share_lm_head, cfg.freeze_lm_head)

    # ------------------------------------------------------------------ init
    def init_from_target(self, target) -> None:
        with torch.no_grad():
            if self.embed is not None:
                self.embed.weight.copy_(target.get_input_embeddings().weight[: self.vocab_size].to(self.embed.weight.dtype))
            if self.cfg.init_lm_head_from_target:
                self.lm_head.copy_from(target.get_output_embeddings().weight)

    # ------------------------------------------------------------------ pieces
    def _fused(self, hidden: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        if self.embed is None:
            return hidden
        e = self.embed_norm(self.embed(next_tokens).to(hidden.dtype))
        if self.fuse is not None:
            return hidden + self.fuse(torch.cat([self.hidden_norm(hidden), e], dim=-1))
        return hidden + self.fuse_gain.to(e.dtype) * e

    def heads_from_features(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Stage outputs [.., H] (index 0 = fused input) -> head states [.., K, H]."""
        u = torch.stack([self.head_blocks[k](features[self.head_stage[k]]) for k in range(self.num_heads)], dim=-2)
        if self.position is not None:
            u = u + self.position.to(u.dtype)
        if len(self.auto_embedding):
            lead = u.shape[:-2]
            z = u.reshape(-1, self.num_heads, self.hidden_size)
            for layer in self.auto_embedding:
                z = layer(z)
            u = z.reshape(*lead, self.num_heads, self.hidden_size)
        if self.norm is not None:
            u = self.norm(u)
        return u

    def features(self, hidden: torch.Tensor, next_tokens: torch.Tensor) -> list[torch.Tensor]:
        """[fused input, stage-1 output, stage-2 output, ...], each [B,T,H]."""
        x = self._fused(hidden, next_tokens)
        rope = None
        if len(self.stages):
            positions = torch.arange(x.shape[1], device=x.device)
            rope = rope_tables(positions, self.stages[0][0].head_dim, self.cfg.rope_theta)
        features = [x]
        for stage in self.stages:
            for layer in stage:
                x = layer(x, rope)
            features.append(x)
        return features

    def project(self, states: torch.Tensor, head: int | None = None) -> torch.Tensor:
        return self.lm_head(states, head)

    # ------------------------------------------------------------------ incremental decoding
    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> AmphistaCache | None:
        ref = next(self.parameters())
        device = device or ref.device
        dtype = dtype or ref.dtype
        layers = []
        for stage in self.stages:
            for layer in stage:
                shape = (batch_size, layer.heads, max_len, layer.head_dim)
                layers.append(LayerCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)))
        slot_ids = torch.arange(max_len, device=device)
        head_dim = self.stages[0][0].head_dim if len(self.stages) else 2
        cos, sin = rope_tables(slot_ids, head_dim, self.cfg.rope_theta)
        start = torch.zeros(batch_size, dtype=torch.long, device=device)
        return AmphistaCache(layers, 0, max_len, slot_ids, cos, sin, start)

    def cache_rows(self, cache: AmphistaCache | None, rows: slice) -> AmphistaCache | None:
        if cache is None:
            return None
        layers = [LayerCache(layer.k[rows], layer.v[rows]) for layer in cache.layers]
        return AmphistaCache(layers, cache.length, cache.max_len, cache.slot_ids, cache.cos, cache.sin, cache.start[rows])

    def copy_cache_row(self, src: AmphistaCache | None, src_row: int, dst: AmphistaCache | None, dst_row: int) -> None:
        if src is None or dst is None:
            return
        for a, b in zip(src.layers, dst.layers):
            b.k[dst_row].copy_(a.k[src_row])
            b.v[dst_row].copy_(a.v[src_row])
        dst.start[dst_row].copy_(src.start[src_row])

    def _heads_of_last(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.project(self.heads_from_features(features))[:, -1]

    def step(self, hidden: torch.Tensor, next_tokens: torch.Tensor, cache: AmphistaCache | None) -> torch.Tensor:
        n = hidden.shape[1]
        if not len(self.stages):  # no causal layers: stateless like Medusa
            x = self._fused(hidden[:, -1:], next_tokens[:, -1:])
            return self._heads_of_last([x])
        if cache is None:
            raise ValueError("Amphista.step needs a cache from new_cache()")
        start = cache.length  # host int: no device read
        if start + n > cache.max_len:
            raise ValueError(f"drafter cache full: {start} + {n} > {cache.max_len}")
        x = self._fused(hidden, next_tokens)
        span = start + n
        rope = cache.cos[start:span], cache.sin[start:span]
        # query i (position start+i) sees slots <= start+i; built once per step for all layers
        mask = (cache.slot_ids[:span].view(1, -1) <= cache.slot_ids[start:span].view(-1, 1)).view(1, 1, n, span)
        features = [x[:, -1:]]
        i = 0
        for stage in self.stages:
            for layer in stage:
                x = layer(x, rope, cache.layers[i], start, span, mask)
                i += 1
            features.append(x[:, -1:])
        cache.length = span
        cache.start.fill_(span)
        return self._heads_of_last(features)

    def step_static(self, hidden: torch.Tensor, next_tokens: torch.Tensor, count: torch.Tensor,
                    cache: AmphistaCache) -> torch.Tensor:
        """`step` with fixed shapes and no host-side values: for capture in a CUDA graph.

        Row b of hidden [B,N,H] / next_tokens [B,N] holds `count[b]` (a device long, 0-dim for
        one row or [B]; 1..N) accepted positions followed by padding of any value. Positions come
        from each row's `cache.start` on the device; the padding rows are written to the cache past
        the new length, where the causal mask hides them from every valid query and the next step
        overwrites them. Attention spans all `max_len` slots, so the caller must keep each row's
        length + N <= max_len. Advances `cache.start` on the device; the host-side
        `cache.length += count` is the caller's bookkeeping (it knows what it accepted). Returns
        the heads of each row's last valid position."""
        if not len(self.stages):
            x = self._fused(last_rows(hidden, count), last_rows(next_tokens, count))
            return self._heads_of_last([x])
        b, n = hidden.shape[0], hidden.shape[1]
        slots = (cache.start.view(-1, 1) + cache.slot_ids[:n]).clamp_(max=cache.max_len - 1)  # [B, N]
        d = cache.cos.shape[-1]
        rope = (cache.cos.index_select(0, slots.view(-1)).view(b, 1, n, d),
                cache.sin.index_select(0, slots.view(-1)).view(b, 1, n, d))
        # [B, 1, N, max_len]: the 4-D layout the target runner's attention uses (a 2-D mask takes
        # a different broadcast path through the fused attention kernels on the GPU)
        mask = (cache.slot_ids.view(1, 1, -1) <= slots.unsqueeze(-1)).unsqueeze(1)
        # one row writes with index_copy (its slots as one run), more rows scatter per row
        write = slots[0] if b == 1 else slots
        x = self._fused(hidden, next_tokens)
        features = [last_rows(x, count)]
        i = 0
        for stage in self.stages:
            for layer in stage:
                x = layer(x, rope, cache.layers[i], write, cache.max_len, mask)
                i += 1
            features.append(last_rows(x, count))
        cache.start.add_(count)
        return self._heads_of_last(features)

    def crop_cache(self, cache: AmphistaCache | None, length: int) -> None:
        # entries beyond `length` are simply overwritten by the next step
        if cache is not None:
            cache.length = min(cache.length, max(0, int(length)))
            cache.start.fill_(cache.length)


def _even_split(k: int, parts: int) -> list[int]:
    """K heads over `parts` stages, earlier stages taking the remainder: 5 over 2 -> [3, 2]."""
    base, extra = divmod(k, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]
