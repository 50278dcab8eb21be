"""Continuous batching: up to `max_batch` sequences decoded together, speculative or plain.

Each sequence owns one row of a batched target KV cache (and of the drafter's cache), its own
candidate tree (the same shape for all: the engine's tree), acceptance length, sampling generator
and stop conditions. One engine step verifies every live sequence's tree in one target forward
over the first b rows (b: the smallest bucket 1, 2, 4, ... `max_batch` holding them all), then
runs one drafter step over the same rows. Sequences join (`add`: the prompt is prefilled into a
free row) and leave (`remove`: the last live row moves into the freed one, so live rows stay the
first ones) between steps.

Per sequence the rules are those of the batch-1 engine (`engine.py`): greedy verification
accepts exactly what plain greedy decoding emits; sampling is lossless speculative sampling with
the request's own generator. A step program per bucket (target and drafter) is captured as a CUDA
graph where graphs are on, each checked against eager at capture like every captured program.

The rows' lengths and next roots live on the device, so a step's commit (cache compaction, new
lengths) and the drafter's step are launched right after verification, and the host reads the
verdicts (accepted node, bonus token, path tokens: one transfer) while the device drafts; the host
then emits the tokens. Sampled rows verify on the host from their logits, as in the batch-1
engine, and their verdicts are written back before the commit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch

from plmtool.draft.config import EngineOptions
from plmtool.draft.decoding.device import variable_shape_attention
from plmtool.draft.decoding.drafter_step import DrafterProgram
from plmtool.draft.decoding.engine import (
    GenerationConfig, GenerationResult, check_fits, choose, emit, sampled_verdict, sampler,
)
from plmtool.draft.decoding.prefill import drafter_prefills, lengths_up_to
from plmtool.draft.decoding.target import StepProgram, TargetRunner
from plmtool.draft.decoding.tree import make_tree
from plmtool.draft.decoding.verify import greedy_accepted_nodes, tree_depth
from plmtool.errors import PlmtoolError

log = logging.getLogger("plmtool")


def batch_buckets(max_batch: int) -> list[int]:
    """Row counts with a step program each: powers of two below `max_batch`, then `max_batch`."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


SHORTEST_SPAN = 512


def span_buckets(max_len: int) -> list[int]:
    """Attention spans with a captured step each: 512, 1024, ... below `max_len`, then `max_len`.
    A captured step attends to a fixed number of cache slots; most answers end far before the
    context does, and at 16 rows the attention over 2,048 slots is a large part of a step."""
    out, s = [], SHORTEST_SPAN
    while s < max_len:
        out.append(s)
        s *= 2
    return out + [max_len]


@dataclass
class BatchSequence:
    """One sequence being decoded: its request, what it produced, where it lives. Its next root
    lives on the device (`BatchEngine.roots`); `length` is the host copy of its row's length."""

    gen: GenerationConfig
    result: GenerationResult
    generator: torch.Generator | None
    stops: set[int]
    row: int
    length: int  # tokens in the target cache (the prompt and the accepted tokens)
    tag: object = None  # the caller's handle (the server's job)


@dataclass
class StepOutput:
    """What one engine step gave one sequence."""

    seq: BatchSequence
    tokens: list[int]
    done: bool


@dataclass
class BatchStats:
    steps: int = 0  # batched engine steps
    sequence_steps: int = 0  # sum over steps of the live sequences
    tokens: int = 0  # tokens emitted by steps (prefill tokens not counted)
    prefills: int = 0
    rows: dict[int, int] = field(default_factory=dict)  # steps per bucket

    @property
    def mean_accepted(self) -> float:
        return self.tokens / self.sequence_steps if self.sequence_steps else 0.0


class BatchEngine:
    """Decodes several sequences per step; not thread-safe (the server drives it from one thread)."""

    def __init__(self, model, drafter=None, tree: Sequence[Sequence[int]] | None = None, max_len: int = 2048,
                 max_batch: int = 16, options: EngineOptions | None = None,
                 bucket_trees: dict[int, Sequence[Sequence[int]]] | None = None):
        """`tree`: the candidate tree (Medusa format); `bucket_trees`: smaller trees for steps over
        more rows ({rows: tree}, for buckets of `batch_buckets`), where the target's work per step
        grows with rows x nodes; every other bucket decodes with `tree`."""
        if max_batch < 1:
            raise PlmtoolError(f"max_batch must be at least 1, got {max_batch}")
        opts = options if options is not None else EngineOptions()
        opts.check()
        self.options = opts
        self.model, self.drafter, self.max_batch = model, drafter, max_batch
        device = next(model.parameters()).device
        use_graphs = opts.graphs_on(device)
        # prompts are prefilled by padded graphs (prefill.py) into a spare row, then moved into place
        self.use_prefill_graphs = opts.prefill_graphs_on(device)
        self.stage = max_batch  # the spare row
        self.runner = TargetRunner(model, max_len, compile=opts.compile, batch_size=max_batch + self.use_prefill_graphs)
        self.device, self.max_len = self.runner.device, self.runner.max_len
        if drafter is not None and tree is None:
            raise PlmtoolError("a drafter needs a candidate tree")
        if drafter is not None and not hasattr(drafter, "step_static"):
            raise PlmtoolError(f"{type(drafter).__name__} has no fixed-shape step (step_static) to batch")
        heads = getattr(drafter, "num_heads", None)
        self.tree = make_tree(tree if drafter is not None else [], num_heads=heads).to(self.device)
        if self.tree.n + 1 > self.max_len:
            raise PlmtoolError(f"tree of {self.tree.n} nodes does not fit the context of {self.max_len}")
        self.buckets = batch_buckets(max_batch)
        unknown = set(bucket_trees or {}) - set(self.buckets)
        if unknown or (bucket_trees and drafter is None):
            raise PlmtoolError(f"bucket trees for {sorted(unknown) or 'plain decoding'}: the buckets are {self.buckets}, with a drafter")
        self.trees = {b: make_tree(bucket_trees[b], num_heads=heads).to(self.device) if b in (bucket_trees or {}) else self.tree
                      for b in self.buckets}
        if any(t.n > self.tree.n for t in self.trees.values()):
            raise PlmtoolError("a bucket tree is larger than the engine's tree (which sets every request's room)")
        self.max_depths = {b: t.max_depth for b, t in self.trees.items()}  # host ints, read once
        # eager steps attend to exactly the live slots: one program per row count is enough
        self.spans = span_buckets(self.max_len) if use_graphs else [self.max_len]
        self.steps = {(b, span): StepProgram(self.runner, self.trees[b].depth, self.trees[b].ancestors, use_graphs, None,
                                             bool(opts.sync_check), rows=b, span=span)
                      for b in self.buckets for span in self.spans}
        self.drafter_steps: dict[int, DrafterProgram] = {}
        if drafter is not None:
            dtype, hidden = self.runner.dtype, self.runner.hidden_size
            rows = int(self.tree.paths.shape[1])  # deepest path + 1: the accepted positions a step reads
            with torch.no_grad():
                self.dcache = drafter.new_cache(max_batch, self.max_len, self.device, dtype)
            self.heads = torch.zeros(max_batch, drafter.num_heads, self.runner.vocab_size, device=self.device, dtype=dtype)
            for b in self.buckets:
                p = int(self.trees[b].paths.shape[1])
                buffers = (torch.zeros(b, p, hidden, device=self.device, dtype=dtype),
                           torch.zeros(b, p, dtype=torch.long, device=self.device),
                           torch.ones(b, dtype=torch.long, device=self.device))
                self.drafter_steps[b] = DrafterProgram(
                    drafter, drafter.cache_rows(self.dcache, slice(0, b)), p, hidden, self.device, dtype,
                    use_graphs and bool(opts.drafter_graph), compile=bool(opts.compile), buffers=buffers,
                    name=f"drafter step ({b} rows)", sync_check=bool(opts.sync_check))
        self.cuda_graphs = all(p.graph is not None for p in self.steps.values())
        self.prefill_graphs = self.drafter_prefills = None
        if self.use_prefill_graphs:
            longest = self.max_len - 1 - self.tree.n  # the longest prompt check_request lets through
            self.runner.enable_prefill_graphs(row=self.stage, lengths=lengths_up_to(self.max_len, longest), cuda_graphs=use_graphs)
            self.prefill_graphs = self.runner.prefill_graphs
            if drafter is not None and self.prefill_graphs is not None:
                with torch.no_grad():  # the drafter's prefill goes to a one-row cache, then into place
                    self.dstage = drafter.new_cache(1, self.max_len, self.device, self.runner.dtype)
                staging = DrafterProgram(drafter, self.dstage, rows, self.runner.hidden_size, self.device, self.runner.dtype)
                self.drafter_prefills = drafter_prefills(staging, lengths_up_to(self.max_len, longest), cuda_graphs=use_graphs)
        # per row: committed length and the next tree's root, on the device (host copies in the sequences)
        self.lengths = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.roots = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        # host side of the one read per step: node, bonus token, path tokens per row
        pinned = self.device.type == "cuda"
        self.verdicts = {b: torch.zeros(b, 2 + int(t.paths.shape[1]), dtype=torch.long, pin_memory=pinned)
                         for b, t in self.trees.items()}
        self.seqs: list[BatchSequence] = []  # row i holds seqs[i]
        self.stats = BatchStats()

    @property
    def speculative(self) -> bool:
        return self.drafter is not None

    @property
    def free(self) -> int:
        return self.max_batch - len(self.seqs)

    def check_request(self, prompt_len: int, max_new_tokens: int) -> None:
        check_fits(prompt_len, max_new_tokens, self.max_len, self.tree.n)

    def generate(self, prompt: Sequence[int], gen: GenerationConfig | None = None, **kw) -> GenerationResult:
        """One sequence decoded to its end while no other is live (calibration, scripts)."""
        if self.seqs:
            raise RuntimeError("generate() needs an idle engine")
        out = self.add(prompt, gen or GenerationConfig(**kw))
        while not out.done:
            (out,) = self.step()
        return out.seq.result

    # ------------------------------------------------------------------ joining and leaving
    def add(self, prompt: Sequence[int], gen: GenerationConfig, tag: object = None) -> StepOutput:
        """Prefill `prompt` into a free row; returns its first token (the sequence may already be
        done: a one-token answer or a stop token). Raises PlmtoolError when no row is free."""
        gen.validate()
        prompt = [int(t) for t in prompt]
        self.check_request(len(prompt), gen.max_new_tokens)
        if not self.free:
            raise PlmtoolError(f"all {self.max_batch} rows are decoding")
        row = len(self.seqs)
        generator = sampler(gen)
        with torch.inference_mode():
            token, hidden = self._prefill(prompt, row, gen, generator)
            if self.drafter is not None:
                self._prefill_drafter(hidden, prompt[1:] + [token], row)
            self.lengths[row] = len(prompt)
            self.roots[row] = token
        seq = BatchSequence(gen, GenerationResult(prompt_tokens=len(prompt)), generator,
                            {int(t) for t in gen.stop_token_ids}, row, len(prompt), tag)
        self.stats.prefills += 1
        kept, done = emit([token], gen, seq.result, seq.stops)
        if not done:
            self.seqs.append(seq)
        return StepOutput(seq, kept, done)

    def _prefill(self, prompt: list[int], row: int, gen: GenerationConfig, generator) -> tuple[int, torch.Tensor]:
        """The prompt into `row` of the cache: its first token and its hidden states [n, H]."""
        runner = self.runner
        runner.cache.length = 0  # a row's prefill starts at slot 0
        if self.prefill_graphs is not None:
            logits, hidden = runner.prefill(prompt)  # one padded replay into the spare row
            runner.cache.move_row(self.stage, row, len(prompt))
        else:
            with variable_shape_attention():
                logits, hidden = runner.extend(prompt, row=row)
            logits = logits[-1]
        return choose(logits, gen, generator), hidden

    def _prefill_drafter(self, hidden: torch.Tensor, next_tokens: list[int], row: int) -> None:
        drafter = self.drafter
        if self.drafter_prefills is not None:
            drafter.crop_cache(self.dstage, 0)
            heads = self.drafter_prefills(hidden, next_tokens)  # [1, K, V]
            drafter.copy_cache_row(self.dstage, 0, self.dcache, row)
        else:
            cache = drafter.cache_rows(self.dcache, slice(row, row + 1))
            drafter.crop_cache(cache, 0)
            with variable_shape_attention():
                heads = drafter.step(hidden.unsqueeze(0), torch.tensor([next_tokens], device=self.device), cache)
        self.heads[row].copy_(heads[0])

    def clear(self) -> None:
        """Drop every live sequence (after a failed step): all rows free, padding from slot 0."""
        self.seqs.clear()
        with torch.inference_mode():
            self.lengths.zero_()

    def remove(self, seq: BatchSequence) -> None:
        """Free a sequence's row (finished or cancelled): the last live row moves into it."""
        if seq not in self.seqs:
            return
        row, last = seq.row, len(self.seqs) - 1
        if row != last:
            moved = self.seqs[last]
            with torch.inference_mode():
                self.runner.cache.move_row(last, row, moved.length)
                self.lengths[row] = self.lengths[last]
                self.roots[row] = self.roots[last]
                if self.drafter is not None:
                    self.drafter.copy_cache_row(self.dcache, last, self.dcache, row)
                    self.heads[row].copy_(self.heads[last])
            moved.row = row
            self.seqs[row] = moved
        with torch.inference_mode():
            self.lengths[last] = 0  # a padding row from now on: it writes from slot 0 of its free row
        self.seqs.pop()

    # ------------------------------------------------------------------ one step for every live sequence
    def step(self) -> list[StepOutput]:
        """One verification (and drafting) step of every live sequence; finished ones leave."""
        live = list(self.seqs)
        if not live:
            return []
        n_live = len(live)
        b = next(x for x in self.buckets if x >= n_live)
        tree = self.trees[b]
        span = max(s.length for s in live) + tree.n  # every row's tree ends before it
        program = self.steps[b, next(x for x in self.spans if x >= span)]
        with torch.inference_mode():
            program.start.copy_(self.lengths[:b])
            program.tokens[:, 0].copy_(self.roots[:b])
            if self.drafter is not None:
                cands = torch.topk(self.heads[:b, : self.max_depths[b]], tree.topk, dim=-1).indices.reshape(b, -1)
                program.tokens[:, 1:] = cands[:, tree.candidate_index]
            logits, hidden = program.run(span)
            if b == 1:
                logits, hidden = logits.unsqueeze(0), hidden.unsqueeze(0)
            tokens = program.tokens
            pred = logits.argmax(dim=-1)  # [b, n]
            best = greedy_accepted_nodes(tree, tokens, pred)  # [b]: every row's greedy verdict
            bonus = pred.gather(1, best.view(-1, 1)).view(-1)
            sampled = self._sampled_verdicts(tree, live, tokens, logits)
            if sampled:  # the host's verdicts for rows at temperature > 0 replace the greedy ones
                rows = torch.tensor(list(sampled), device=self.device)
                best[rows] = torch.tensor([v.node for v in sampled.values()], device=self.device)
                bonus[rows] = torch.tensor([v.bonus for v in sampled.values()], device=self.device)
            paths = tree.paths.index_select(0, best)  # [b, P]
            count = tree.depth.index_select(0, best) + 1  # accepted positions, the root included
            table = torch.cat([best.view(-1, 1), bonus.view(-1, 1), tokens.gather(1, paths)], dim=1)
            host = self.verdicts[b]
            host.copy_(table, non_blocking=True)
            read = torch.cuda.Event() if self.device.type == "cuda" else None
            if read is not None:
                read.record(torch.cuda.current_stream(self.device))
            # commit and draft on the device while the host waits for the verdicts
            if tree.n > 1:
                self.runner.cache.compact_rows(program.start, paths)
            self.lengths[:n_live] += count[:n_live]  # padding rows keep their length: they stay in bounds
            self.roots[:b].copy_(bonus)
            if self.drafter is not None:
                self._draft(b, hidden, tokens, paths, count, bonus)
            if read is not None:
                read.synchronize()
            verdicts = host.tolist()
        outputs = []
        for i, seq in enumerate(live):
            node, token, *path = verdicts[i]
            length = tree_depth(tree, node) + 1
            seq.length += length
            kept, done = emit(path[1:length] + [token], seq.gen, seq.result, seq.stops)
            seq.result.accept_lengths.append(len(kept))
            outputs.append(StepOutput(seq, kept, done))
        for o in outputs:
            if o.done:
                self.remove(o.seq)
        self.stats.steps += 1
        self.stats.sequence_steps += n_live
        self.stats.tokens += sum(len(o.tokens) for o in outputs)
        self.stats.rows[b] = self.stats.rows.get(b, 0) + 1
        return outputs

    def _sampled_verdicts(self, tree, live: list[BatchSequence], tokens: torch.Tensor, logits: torch.Tensor) -> dict:
        """Row -> Verdict for the rows at temperature > 0 (verified on the host with their own
        generators: lossless speculative sampling or typical acceptance)."""
        return {i: sampled_verdict(tree, tokens[i], logits[i], s.gen, s.generator)
                for i, s in enumerate(live) if s.gen.temperature > 0}

    def _draft(self, b: int, hidden: torch.Tensor, tokens: torch.Tensor, paths: torch.Tensor, count: torch.Tensor,
               bonus: torch.Tensor) -> None:
        """The drafter reads each row's accepted positions and the token after each one (the
        drafted tokens, then the bonus token); its heads for every row go to `self.heads`. All
        inputs stay on the device."""
        program, p = self.drafter_steps[b], paths.shape[1]
        program.hidden.copy_(hidden.gather(1, paths.unsqueeze(-1).expand(b, p, hidden.shape[-1])))
        program.next_tokens[:, : p - 1].copy_(tokens.gather(1, paths[:, 1:]))
        program.next_tokens.scatter_(1, (count - 1).view(b, 1), bonus.view(b, 1))
        program.count.copy_(count)
        self.heads[:b].copy_(program.launch())
