"""A preallocated key/value cache for the target, advanced only by accepted tokens.

All layers live in one tensor per kind (`k`, `v`: [layers, batch, kv_heads, max_len, head_dim]),
so that compacting the cache to the accepted tree path is two gathers and two copies for the whole
model instead of a loop over layers. Keys/values are stored per *key/value* head (grouped-query
attention is never expanded), and every write uses tensor indices, so the same kernels can be
replayed inside a CUDA graph.

Slots `[0, length)` hold the committed sequence. A tree verification writes its `n` nodes into
slots `[length, length + n)`; `compact` then moves the accepted path to `[length, length + a)` and
everything beyond the new length is dead (masked out by every later forward, overwritten later).
"""

from __future__ import annotations

import torch


class StaticKVCache:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, max_len: int, batch_size: int = 1,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        shape = (layers, batch_size, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # committed tokens (host-side; the device-side copy lives in the runner)

    def compact(self, start: int | torch.Tensor, path: torch.Tensor) -> None:
        """Move slots `start + path[i]` to `start + i` for every i (all layers at once).

        `path` may be padded to a fixed length; the padded tail lands beyond the new committed
        length, where nothing reads it. The source is gathered first so overlapping moves are safe.
        """
        src = path + start
        dst = torch.arange(path.numel(), device=path.device) + start
        self.k.index_copy_(3, dst, self.k.index_select(3, src))
        self.v.index_copy_(3, dst, self.v.index_select(3, src))

    def compact_rows(self, start: torch.Tensor, paths: torch.Tensor) -> None:
        """`compact` for the first b rows at once, each with its own start [b] and (padded) path
        [b, P]: slots `start[r] + paths[r, i]` move to `start[r] + i` in row r."""
        b, p = paths.shape
        layers, _, heads, _, dim = self.k.shape
        src = (paths + start.view(b, 1)).view(1, b, 1, p, 1).expand(layers, b, heads, p, dim)
        dst = (torch.arange(p, device=paths.device).view(1, p) + start.view(b, 1)).view(1, b, 1, p, 1).expand(layers, b, heads, p, dim)
        for t in (self.k, self.v):
            rows = t[:, :b]
            rows.scatter_(3, dst, rows.gather(3, src))

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` slots of row `src` into row `dst` (a batch keeps its live
        sequences in its first rows)."""
        self.k[:, dst, :, :length].copy_(self.k[:, src, :, :length])
        self.v[:, dst, :, :length].copy_(self.v[:, src, :, :length])

    def reset(self) -> None:
        # Stale entries are never read (masked by length), so no need to zero the buffers.
        self.length = 0

    def committed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the committed part [layers, batch, kv_heads, length, head_dim]."""
        return self.k[..., : self.length, :], self.v[..., : self.length, :]
