"""The drafter's per-step work with fixed shapes, replayed as a CUDA graph where possible.

After each verification the drafter reads the hidden states of the accepted path (1..N positions,
N = tree depth + 1) and the token after each. Padded to N rows, with the count as a device tensor,
every step has the same shapes and no host-side decisions (`Drafter.step_static`), so the whole
drafter step (Amphista: fusion, two adaptation layers with their cache, K residual heads, the
auto-embedding layer, the vocabulary projection: tens of kernels) is one graph launch.

With `compile=True` the graph captures a `torch.compile`d step instead: the compiler fuses the
norms, rotary tables, activations and residual adds (most of the step's ~170 small kernels for
Amphista) into a few, which is what bounds a small drafter's step time.

A captured graph is checked once against the eager computation on random inputs (outputs and the
cache it writes); if capture raises or the replay differs, the program warns and falls back: from
the compiled capture to the eager capture, from there to stepping eagerly.
"""

from __future__ import annotations

from typing import Any

import torch

from plmtool.cuda_graph import CapturedGraph, capture_checked, compare, tolerance
from plmtool.draft.decoding.device import check_device


class DrafterProgram:
    """Static buffers + the drafter's `step_static` (optionally captured) for one drafter cache.

    Usage per step: fill `hidden[0, :N]` / `next_tokens[0, :N]` (rows past `count` are ignored),
    then `heads = program(count)`; the program advances the cache's host-side length.
    """

    def __init__(self, drafter, cache: Any, n: int, hidden_size: int, device: torch.device, dtype: torch.dtype,
                 cuda_graph: bool = False, compile: bool = False, buffers: tuple | None = None, pool=None,
                 name: str = "drafter step", sync_check: bool = False):
        """`buffers`: (hidden [1,n,H], next_tokens [1,n], count) to use instead of new ones (the
        padded drafter prefills of prefill.py give views of one buffer to all their lengths);
        `pool`: the CUDA graph memory pool to capture into (None: a pool of its own); `name`: what
        errors and device-fault reports call this program; `sync_check`: synchronise after each step
        so a device fault names this program."""
        self.drafter, self.cache, self.n, self.name, self.pool = drafter, cache, n, name, pool
        self.sync_check = sync_check
        if buffers is not None:
            self.hidden, self.next_tokens, self.count = buffers
        else:
            self.hidden = torch.zeros(1, n, hidden_size, device=device, dtype=dtype)
            self.next_tokens = torch.zeros(1, n, dtype=torch.long, device=device)
            self.count = torch.ones((), dtype=torch.long, device=device)
        self.graph: CapturedGraph | None = None
        self.compiled = False  # the captured graph runs the torch.compile'd step
        self.check_error = 0.0  # worst relative error of the replay against eager at the self-check
        self._compiled_step = None
        if not cuda_graph:
            return
        for compiled in ([True] if compile else []) + [False]:
            what, fallback = (("compiled drafter step", "capturing the eager drafter step") if compiled
                              else ("drafter CUDA graph", "running the drafter step eagerly"))
            self.graph = capture_checked(what, fallback, lambda: self.capture(compiled),
                                         check=lambda graph: self._self_check(graph, compiled))
            self._reset_cache()  # the capture and the check leave it dirty
            if self.graph is not None:
                self.compiled = compiled
                break

    @property
    def out(self) -> torch.Tensor | None:
        """The captured step's heads, refilled by each replay."""
        return self.graph.out if self.graph is not None else None

    # ------------------------------------------------------------------ internals
    def _run(self, compiled: bool = False) -> torch.Tensor:
        step = self.drafter.step_static
        if compiled:
            if self._compiled_step is None:
                # static shapes: every step has the same padded shapes, so one specialisation
                self._compiled_step = torch.compile(step, dynamic=False)
            step = self._compiled_step
        return step(self.hidden, self.next_tokens, self.count, self.cache)

    def _reset_cache(self) -> None:
        self.drafter.crop_cache(self.cache, 0)

    def _set_start(self, start: int) -> None:
        if self.cache is not None:
            self.cache.length = start
            self.cache.start.fill_(start)

    @torch.no_grad()
    def capture(self, compiled: bool = False) -> CapturedGraph:
        """The step captured from an empty cache; no self-check: the constructor runs its own, the
        padded drafter prefills theirs."""
        self.count.fill_(self.n)
        return CapturedGraph(self.name, lambda: self._run(compiled), self._buffers, self.pool,
                             before=lambda: self._set_start(0))

    def _buffers(self) -> list[torch.Tensor]:
        """Every persistent tensor the graph reads or writes."""
        tensors = [self.hidden, self.next_tokens, self.count] + self._cache_tensors()
        if self.cache is not None:
            tensors += [self.cache.slot_ids, self.cache.cos, self.cache.sin]
        return tensors

    def _cache_tensors(self) -> list[torch.Tensor]:
        if self.cache is None:
            return []
        return [t for layer in self.cache.layers for t in (layer.k, layer.v)] + [self.cache.start]

    @torch.no_grad()
    def _self_check(self, graph: CapturedGraph, compiled: bool = False) -> str | None:
        """Replay vs eager on random inputs from a non-zero cache offset; None when they agree.
        Compared: the heads' logits, the cache slots the step writes (relative error), every
        other cache slot and the device-side length (exactly: nothing may touch them)."""
        g = torch.Generator(device=self.hidden.device).manual_seed(0)
        self.hidden.normal_(generator=g)
        vocab = int(getattr(self.drafter, "vocab_size", 2) or 2)
        self.next_tokens.random_(0, vocab, generator=g)
        tensors = self._cache_tensors()
        for t in tensors[:-1]:
            t.normal_(generator=g)
        tol = tolerance("compiled" if compiled else "eager", self.hidden.dtype)
        self.check_error = 0.0
        for count, start in ((self.n, 3), (1, 5)):
            self.count.fill_(count)
            self._set_start(start)
            before = [t.clone() for t in tensors]
            ref = self._run().clone()
            ref_cache = [t.clone() for t in tensors]
            for t, b in zip(tensors, before):
                t.copy_(b)
            out = graph.replay()
            written = slice(start, start + self.n)  # the step writes all N padded rows
            pairs = [("heads", out, ref)] + [(f"cache tensor {i}", t[..., written, :], r[..., written, :])
                                             for i, (t, r) in enumerate(zip(tensors[:-1], ref_cache[:-1]))]
            errors, problem = compare(pairs, tol)
            self.check_error = max(self.check_error, *errors.values())
            if problem:
                return f"replay: {problem}"
            for t, r in zip(tensors[:-1], ref_cache[:-1]):
                untouched = torch.ones(t.shape[-2], dtype=torch.bool, device=t.device)
                untouched[written] = False
                if not torch.equal(t[..., untouched, :], r[..., untouched, :]):
                    return "replay writes a different drafter cache than eager"
            if tensors and not torch.equal(tensors[-1], ref_cache[-1]):
                return "replay advances the drafter cache length differently from eager"
        return None

    # ------------------------------------------------------------------ use
    def check_room(self) -> None:
        """Raise unless the cache has room for a step's N rows (checked on the host: past the end
        the replay would not raise but write out of bounds on a GPU)."""
        cache = self.cache
        if cache is not None and cache.length + self.n > cache.max_len:
            raise ValueError(f"drafter cache full: {cache.length} + {self.n} > {cache.max_len}")

    def launch(self) -> torch.Tensor:
        """Step with `count` and the inputs already written on the device by an earlier program;
        the caller checks the room (`check_room`) and advances the cache's host-side length (it
        knows the count)."""
        if self.graph is None:
            return self._run()
        return self.graph.replay()

    def __call__(self, count: int) -> torch.Tensor:
        # Host-side checks of everything the step indexes with (cheap: host ints). On a GPU an
        # out-of-range count or cache slot would not raise here but fault inside the replay.
        count = int(count)
        if not 1 <= count <= self.n:
            raise ValueError(f"{self.name} count {count} outside 1..{self.n}")
        self.check_room()
        cache = self.cache
        self.count.fill_(count)
        if self.graph is not None:
            out = self.graph.replay()
        else:
            out = self._run()
        if self.sync_check:
            check_device(f"the {self.name} graph replay" if self.graph is not None else f"the eager {self.name}")
        if cache is not None:
            cache.length += count  # host bookkeeping; step_static advanced cache.start on the device
        return out
