"""The prompt's forward (prefill) replayed as CUDA graphs over a ladder of padded lengths.

An eager prefill of a small target is bound by kernel launches, not arithmetic: SmolLM2-135M's
30 layers are ~1,300 small kernels per prompt whatever its length, tens of milliseconds of host
time on a GPU that finishes the work in a few. Every request pays it once, and a speculative
request, which needs 2-3x fewer steps than a plain one, pays it over fewer steps: it is a larger
share of the speculative time.

A prompt of n tokens is padded to the next length B of a ladder (16, 24, 32, 48, 64, ...: at most
1.5x the tokens, a dozen graphs for a 2,048-token context) and runs as one graph replay.
Padding is harmless because a prefill starts at slot 0 and is causal: a real token at position
i < n attends only to slots <= i, so the padded rows change nothing before them; they write
keys and values into slots [n, B), past the committed length, which every later forward masks
out and overwrites. The vocabulary projection stays outside the graph and runs for the last
real token only (the one the first generated token comes from).

The drafter's prefill over the whole prompt (`DrafterPrefills`) is padded to the same ladder and
replayed the same way: its fixed-shape step (`step_static`, the one the drafter step program
captures) takes the B padded rows with the prompt length as its count, returns the heads of the
last real row and advances the drafter cache by the count on the device. Its padded rows write
slots [n, B) of the drafter cache, masked and overwritten like the target's. For Amphista that is
~100 small kernels (~3 ms per request on an H200) as one replay.

Each captured length is checked once against the eager prefill of an unpadded prompt (the target:
hidden states and the cache it writes; the drafter: the heads, the cache slots of the prompt and
the device-side length); a failed check drops the graphs and the prompt is prefilled eagerly.
"""

from __future__ import annotations

import bisect
from typing import Sequence

import torch

from plmtool.cuda_graph import CapturedGraph, capture_checked, compare, new_pool, tolerance
from plmtool.draft.decoding.device import variable_shape_attention
from plmtool.draft.decoding.drafter_step import DrafterProgram
from plmtool.errors import PlmtoolError

SMALLEST = 16


def bucket_lengths(max_len: int, smallest: int = SMALLEST) -> list[int]:
    """16, 24, 32, 48, 64, 96, ... (powers of two and their midpoints) below `max_len`, then `max_len`."""
    out: list[int] = []
    b = smallest
    while b < max_len:
        out.append(b)
        if b + b // 2 < max_len:
            out.append(b + b // 2)
        b *= 2
    out.append(max_len)
    return sorted(set(out))


def lengths_up_to(max_len: int, longest: int) -> list[int]:
    """The ladder's lengths that a prompt of at most `longest` tokens can pad to (an engine's
    longest prompt leaves room for an answer and the candidate tree: the top lengths are unused)."""
    ladder = bucket_lengths(max_len)
    return ladder[: bisect.bisect_left(ladder, longest) + 1]


def _padded_length(lengths: list[int], n: int) -> int:
    i = bisect.bisect_left(lengths, n)
    if n < 1 or i == len(lengths):
        raise PlmtoolError(f"prompt of {n} tokens outside the prefill lengths 1..{lengths[-1]}")
    return lengths[i]


class PrefillGraphs:
    """Padded prefills of one runner: `logits_last, hidden = graphs(prompt)` from an empty cache."""

    def __init__(self, runner, lengths: Sequence[int] | None = None, cuda_graphs: bool | None = None, check: bool = True,
                 row: int = 0):
        """`cuda_graphs=False` runs the same padded forward eagerly (what the CPU tests exercise);
        `row`: the cache row prefilled (a batch prefills a spare row and moves it into place)."""
        self.runner = runner
        self.row = row
        self.lengths = sorted(lengths) if lengths is not None else bucket_lengths(runner.max_len)
        if not self.lengths or self.lengths[0] < 1 or self.lengths[-1] > runner.max_len:
            raise ValueError(f"prefill lengths {self.lengths} outside 1..{runner.max_len}")
        dev = runner.device
        self.ids = torch.zeros(1, self.lengths[-1], dtype=torch.long, device=dev)
        self.cuda_graphs = dev.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.graphs: dict[int, CapturedGraph] = {}
        self.check_errors: dict[int, float] = {}
        if self.cuda_graphs:
            # one memory pool for all lengths: they never run at once and each replay's hidden
            # states are consumed before the next prefill
            pool = new_pool()
            with torch.no_grad():
                for b in self.lengths:
                    self.graphs[b] = CapturedGraph(f"prefill of length {b}", lambda b=b: self._run(b), self._buffers, pool)
        runner.reset()
        if check:
            problem = self._self_check()
            if problem:
                raise RuntimeError(problem)

    def _run(self, b: int) -> torch.Tensor:
        r = self.runner
        slots = r.slot_ids[:b]
        mask = (slots.view(1, -1) <= slots.view(-1, 1)).view(1, 1, b, b)
        return r.hidden_states(self.ids[:, :b], slots.view(1, b), slots, mask, b, rows=slice(self.row, self.row + 1))[0]

    def _buffers(self) -> tuple[torch.Tensor, ...]:
        r = self.runner
        return r.cache.k, r.cache.v, r.slot_ids, self.ids

    def length_for(self, n: int) -> int:
        return _padded_length(self.lengths, n)

    @torch.no_grad()
    def __call__(self, prompt: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.runner
        ids = torch.as_tensor(prompt, dtype=torch.long).view(-1)
        n = ids.numel()
        b = self.length_for(n)
        if r.cache.length:
            raise RuntimeError("a padded prefill starts from an empty cache")
        self.ids[0, :n].copy_(ids, non_blocking=True)
        if self.cuda_graphs:
            hidden = self.graphs[b].replay()
        else:
            hidden = self._run(b)
        r.cache.length = n
        hidden = hidden[:n]
        return r.lm_head(hidden[-1:])[0], hidden

    def _self_check(self, seed: int = 0) -> str | None:
        """Every length against the eager prefill of an unpadded prompt that pads to it (the
        shortest such prompt: the most padding): hidden states and the keys and values of the
        prompt's slots. None when all agree."""
        r = self.runner
        # a replay of eager kernels at a padded shape against the unpadded eager forward
        tol = tolerance("forward", r.dtype)
        g = torch.Generator(device="cpu").manual_seed(seed)
        previous = 0
        for b in self.lengths:
            n = previous + 1
            prompt = torch.randint(0, r.vocab_size, (n,), generator=g)
            r.reset()
            with torch.no_grad():
                _, ref = r.extend(prompt.to(r.device), row=self.row)
                ref = ref.clone()
                ref_k, ref_v = r.cache.k[..., :n, :].clone(), r.cache.v[..., :n, :].clone()
                r.reset()
                _, hidden = self(prompt)
            errors, problem = compare([("hidden states", hidden, ref), ("keys", r.cache.k[..., :n, :], ref_k),
                                       ("values", r.cache.v[..., :n, :], ref_v)], tol)
            self.check_errors[b] = max(errors.values())
            previous = b
            r.reset()
            if problem:
                return f"padded prefill of length {b} differs from the eager prefill: {problem}"
        return None


class DrafterPrefills:
    """Padded drafter prefills over the cache of the engine's drafter step program:
    `heads = prefills(hidden [n, H], next_tokens [n])` from an empty cache, which it leaves as the
    eager `drafter.step` prefill does (host-side length n, device-side start n).

    One `DrafterProgram` per length B runs `step_static` with N = B rows; all of them read views of
    one pair of input buffers (the longest length's), so a prefill copies its inputs once whatever
    the length, and share one count. Stateless drafters (Medusa, Amphista without adaptation
    layers) have no cache; their `step_static` reads only the last real row.
    """

    def __init__(self, step: DrafterProgram, lengths: Sequence[int], cuda_graphs: bool | None = None, check: bool = True):
        """`step`: the engine's drafter step program (its drafter, cache, dtype, device);
        `cuda_graphs=False` runs the same padded step eagerly (what the CPU tests exercise)."""
        self.drafter, self.cache = step.drafter, step.cache
        self.lengths = sorted(lengths)
        room = self.cache.max_len if self.cache is not None else max(self.lengths, default=0)
        if not self.lengths or self.lengths[0] < 1 or self.lengths[-1] > room:
            raise ValueError(f"drafter prefill lengths {self.lengths} outside 1..{room}")
        top, hidden_size = self.lengths[-1], step.hidden.shape[-1]
        dev, dtype = step.hidden.device, step.hidden.dtype
        self.hidden = torch.zeros(1, top, hidden_size, device=dev, dtype=dtype)
        self.next_tokens = torch.zeros(1, top, dtype=torch.long, device=dev)
        count = torch.ones((), dtype=torch.long, device=dev)
        self.cuda_graphs = dev.type == "cuda" if cuda_graphs is None else cuda_graphs
        # one memory pool for all lengths, as for the target's prefills: they never run at once and
        # each replay's heads are consumed (top-k of the first tree) before the next prefill. The
        # eager capture only: compiling ~15 shapes would cost minutes at start-up for ~3 ms a request
        pool = new_pool() if self.cuda_graphs else None
        self.programs: dict[int, DrafterProgram] = {}
        self.check_errors: dict[int, float] = {}
        with torch.no_grad():
            for b in self.lengths:
                buffers = (self.hidden[:, :b], self.next_tokens[:, :b], count)
                program = DrafterProgram(self.drafter, self.cache, b, hidden_size, dev, dtype, buffers=buffers,
                                         pool=pool, name=f"drafter prefill of length {b}", sync_check=step.sync_check)
                if self.cuda_graphs:
                    program.graph = program.capture()
                self.programs[b] = program
        self._empty()
        if check:
            problem = self._self_check()
            if problem:
                raise RuntimeError(problem)

    def _empty(self) -> None:
        self.drafter.crop_cache(self.cache, 0)

    def length_for(self, n: int) -> int:
        return _padded_length(self.lengths, n)

    @torch.no_grad()
    def __call__(self, hidden: torch.Tensor, next_tokens: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Heads [1, K, V] of the prompt's last position; `hidden` [n, H] the target's hidden states
        of the prompt, `next_tokens` the token after each position (prompt[1:] + the first token)."""
        n = hidden.shape[0]
        program = self.programs[self.length_for(n)]
        if self.cache is not None and self.cache.length:
            raise RuntimeError("a padded drafter prefill starts from an empty drafter cache")
        self.hidden[0, :n].copy_(hidden)
        self.next_tokens[0, :n].copy_(torch.as_tensor(next_tokens, dtype=torch.long).view(-1), non_blocking=True)
        # the program checks the count and the room, replays (or runs eagerly) and advances the
        # host-side length by n; step_static advanced the device-side start by n
        return program(n)

    def _self_check(self, seed: int = 0) -> str | None:
        """Every length against the eager `drafter.step` prefill of unpadded inputs, for the
        shortest prompt that pads to it (the most padding) and one that fills it (none): the
        heads, the cache slots of the prompt, the device-side length. None when all agree."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        # padded against unpadded, as for the target's prefills
        tol = tolerance("forward", self.hidden.dtype)
        vocab = int(getattr(self.drafter, "vocab_size", 2) or 2)
        tensors = self.programs[self.lengths[0]]._cache_tensors()  # the k/v of every layer, then start
        previous = 0
        try:
            for b in self.lengths:
                for n in sorted({previous + 1, b}):
                    hidden = torch.randn(n, self.hidden.shape[-1], generator=g).to(self.hidden)
                    tokens = torch.randint(0, vocab, (n,), generator=g).to(self.hidden.device)
                    self._empty()
                    with torch.no_grad(), variable_shape_attention():
                        ref = self.drafter.step(hidden.unsqueeze(0), tokens.unsqueeze(0), self.cache).clone()
                    ref_cache = [t[..., :n, :].clone() for t in tensors[:-1]] + [t.clone() for t in tensors[-1:]]
                    self._empty()
                    heads = self(hidden, tokens)
                    pairs = [("heads", heads, ref)] + [(f"cache tensor {i}", t[..., :n, :], r)
                                                       for i, (t, r) in enumerate(zip(tensors[:-1], ref_cache))]
                    errors, problem = compare(pairs, tol)
                    self.check_errors[b] = max(self.check_errors.get(b, 0.0), *errors.values())
                    if problem:
                        return f"padded drafter prefill of length {b} differs from the eager prefill of {n} tokens: {problem}"
                    if tensors and not torch.equal(tensors[-1], ref_cache[-1]):
                        return f"padded drafter prefill of length {b} advances the drafter cache differently from eager"
                previous = b
        finally:
            self._empty()
        return None


def drafter_prefills(step: DrafterProgram, lengths: Sequence[int], cuda_graphs: bool | None = None) -> DrafterPrefills | None:
    """`DrafterPrefills` for the engine's drafter step program, or None after a warning where capture
    or the self-check fails (the engine then prefills the drafter eagerly, with `drafter.step`)."""
    return capture_checked("drafter prefill CUDA graphs", "prefilling the drafter eagerly",
                           lambda: DrafterPrefills(step, lengths, cuda_graphs),
                           cleanup=lambda: step.drafter.crop_cache(step.cache, 0))
