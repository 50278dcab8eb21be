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

Each captured length is checked once against the eager prefill of an unpadded prompt (hidden
states and the cache it writes); a failed check drops the graphs and the runner prefills eagerly.
"""

from __future__ import annotations

import bisect
from typing import Sequence

import torch

from plmtool.draft.decoding.device import capture_graph, relative_error
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


class PrefillGraphs:
    """Padded prefills of one runner: `logits_last, hidden = graphs(prompt)` from an empty cache."""

    # the same bars as the step programs' self-check (target.StepProgram.CHECK_TOL*): a
    # replay of eager kernels at a padded shape rounds like eager, up to GEMM tiling
    CHECK_TOL = {torch.float32: 1e-3}
    CHECK_TOL_HALF = 0.1

    def __init__(self, runner, lengths: Sequence[int] | None = None, cuda_graphs: bool | None = None, check: bool = True):
        """`cuda_graphs=False` runs the same padded forward eagerly (what the CPU tests exercise)."""
        self.runner = runner
        self.lengths = sorted(lengths) if lengths is not None else bucket_lengths(runner.max_len)
        if not self.lengths or self.lengths[0] < 1 or self.lengths[-1] > runner.max_len:
            raise ValueError(f"prefill lengths {self.lengths} outside 1..{runner.max_len}")
        dev = runner.device
        self.ids = torch.zeros(1, self.lengths[-1], dtype=torch.long, device=dev)
        self.cuda_graphs = dev.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.out: dict[int, torch.Tensor] = {}
        self.check_errors: dict[int, float] = {}
        self._addresses = self._address_signature()
        if self.cuda_graphs:
            # one memory pool for all lengths: they never run at once and each replay's hidden
            # states are consumed before the next prefill
            pool = torch.cuda.graph_pool_handle()
            with torch.no_grad():
                for b in self.lengths:
                    self.graphs[b], self.out[b] = capture_graph(lambda b=b: self._run(b), pool)
        runner.reset()
        if check:
            problem = self._self_check()
            if problem:
                raise RuntimeError(problem)

    def _run(self, b: int) -> torch.Tensor:
        r = self.runner
        slots = r.slot_ids[:b]
        mask = (slots.view(1, -1) <= slots.view(-1, 1)).view(1, 1, b, b)
        return r.hidden_states(self.ids[:, :b], slots.view(1, b), slots, mask, b)

    def _address_signature(self) -> tuple[int, ...]:
        r = self.runner
        return tuple(t.data_ptr() for t in (r.cache.k, r.cache.v, r.slot_ids, self.ids))

    def length_for(self, n: int) -> int:
        i = bisect.bisect_left(self.lengths, n)
        if n < 1 or i == len(self.lengths):
            raise PlmtoolError(f"prompt of {n} tokens outside the prefill lengths 1..{self.lengths[-1]}")
        return self.lengths[i]

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
            if self._address_signature() != self._addresses:
                raise RuntimeError("a buffer of the captured prefill was re-created after capture; refusing to replay")
            self.graphs[b].replay()
            hidden = self.out[b]
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
        tol = self.CHECK_TOL.get(r.dtype, self.CHECK_TOL_HALF)
        g = torch.Generator(device="cpu").manual_seed(seed)
        previous = 0
        for b in self.lengths:
            n = previous + 1
            prompt = torch.randint(0, r.vocab_size, (n,), generator=g)
            r.reset()
            with torch.no_grad():
                _, ref = r.extend(prompt.to(r.device))
                ref = ref.clone()
                ref_k, ref_v = r.cache.k[..., :n, :].clone(), r.cache.v[..., :n, :].clone()
                r.reset()
                _, hidden = self(prompt)
            errs = [relative_error(hidden, ref), relative_error(r.cache.k[..., :n, :], ref_k),
                    relative_error(r.cache.v[..., :n, :], ref_v)]
            self.check_errors[b] = max(errs)
            previous = b
            r.reset()
            if not all(e <= tol for e in errs):  # NaN fails too
                return f"padded prefill of length {b} differs from the eager prefill (relative errors {errs}, > {tol})"
        return None
