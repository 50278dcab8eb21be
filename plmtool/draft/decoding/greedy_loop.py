"""The greedy speculative step without host decisions: verify, commit and draft on the device.

The general loop (`engine.py`) reads the verdict after each tree step, then launches the cache
compaction, the drafter's inputs, the drafter step, the top-k and the next tree's tokens one by
one. On a small target each of those ~20 launches costs more host time than device time, and the
device idles while the host prepares them: 0.85 ms per speculative step on an H200, against
0.28 ms around a plain step (run 9 in docs/benchmarks/draft.md). Greedy verification needs
nothing from the host: the accepted node is an argmax, its length a table lookup, and every later
index follows from it on the device. So a step is four programs, each a CUDA graph on CUDA:

  tree     the target's forward over the candidate tree (the engine's `StepProgram`);
  commit   the target's argmax per node, the deepest node whose whole path matches, its path and
           the bonus token into a small verdict buffer; the target cache compacted to the path and
           its device-side length advanced; the drafter's inputs (hidden states of the path, the
           token after each, their count) written in place;
  drafter  the drafter program (`DrafterProgram.launch`: the count is already on the device);
  draft    top-k of the new heads into the tree program's token buffer, the bonus at the root;
           with a dynamic tree (`dynamic_tree.py`) it first picks this step's nodes from the
           heads' probabilities and rewrites the tree's mask, depths and paths in place.

The host copies the verdict back right after `commit` and emits its tokens while the device runs
`drafter` and `draft`; between steps nothing waits on the host but the next four launches. The
emitted tokens are exactly those of the general loop (same verification rule, same kernels).
Without CUDA graphs the same four functions run eagerly, which is what the CPU tests exercise.
"""

from __future__ import annotations

import torch

from plmtool.cuda_graph import CapturedGraph
from plmtool.draft.decoding.device import check_device
from plmtool.draft.decoding.drafter_step import DrafterProgram
from plmtool.draft.decoding.dynamic_tree import DynamicTree
from plmtool.draft.decoding.target import StepProgram, TargetRunner
from plmtool.draft.decoding.tree import Tree
from plmtool.draft.decoding.verify import greedy_accepted_node


class GreedyTreeLoop:
    """Greedy speculative steps for one engine (its runner, tree program and drafter program).

    `tree` is a static `Tree` or a `DynamicTree` whose buffers `tree_step` reads (its depth and
    ancestor mask are the tree step's)."""

    def __init__(self, runner: TargetRunner, tree: Tree | DynamicTree, tree_step: StepProgram, program: DrafterProgram,
                 cuda_graphs: bool, sync_check: bool = False):
        self.runner, self.tree, self.tree_step, self.program = runner, tree, tree_step, program
        self.sync_check = sync_check  # synchronise after each step: a device fault names this loop
        self.dynamic = isinstance(tree, DynamicTree)
        if self.dynamic and not (tree_step.depth is tree.depth and tree_step.ancestors is tree.ancestors):
            raise ValueError("the tree step of a dynamic tree must read the tree's own depth and mask buffers")
        self.max_depth = int(tree.paths.shape[1]) - 1
        dev = runner.device
        # node, accepted length (root included), bonus token, then the tokens of the node's path
        # (root first, padded)
        self.verdict = torch.zeros(self.max_depth + 4, dtype=torch.long, device=dev)
        self.cuda = dev.type == "cuda"
        self.host = torch.zeros(self.verdict.shape, dtype=torch.long, pin_memory=self.cuda)
        self.commit_graph: CapturedGraph | None = None
        self.draft_graph: CapturedGraph | None = None
        self.ready = torch.cuda.Event() if self.cuda else None
        if cuda_graphs and tree_step.graph is not None and program.graph is not None:
            start = tree_step.start
            self.commit_graph = CapturedGraph("greedy commit", lambda: self._commit(*tree_step.out), self._buffers,
                                              before=lambda: start.fill_(0))
            self.draft_graph = CapturedGraph("greedy drafting", lambda: self._draft(program.out), self._buffers)
            start.fill_(0)

    def _buffers(self) -> list[torch.Tensor]:
        """What `commit` and `draft` read or write besides the other programs' own buffers (those
        check themselves): one set for both programs."""
        t, p = self.tree, self.program
        tables = ([t.selected, t.position, t.ancestors, t.pool.depth, t.pool.parent, t.pool.paths, t.pool.ancestors,
                   t.pool.candidate_index] if self.dynamic else [t.candidate_index])
        return [t.parent, t.paths, t.depth, *tables, self.verdict, *self.tree_step.out, p.out,
                p.hidden, p.next_tokens, p.count, self.runner.cache.k, self.runner.cache.v]

    @property
    def graphs(self) -> bool:
        return self.commit_graph is not None

    # ------------------------------------------------------------------ device programs
    def _commit(self, logits: torch.Tensor, hidden: torch.Tensor) -> None:
        tree, tokens, p, d = self.tree, self.tree_step.tokens[0], self.program, self.max_depth
        pred = logits.argmax(dim=-1)
        best = greedy_accepted_node(tree, tokens, pred)  # the general loop's rule, on the device
        path = tree.paths.index_select(0, best)[0]  # [d + 1], padded past the node's depth
        length = tree.depth.index_select(0, best) + 1  # [1]
        bonus = pred.index_select(0, best)
        torch.cat([best, length, bonus, tokens.index_select(0, path)], out=self.verdict)
        start = self.tree_step.start
        self.runner.cache.compact(start, path)
        # the drafter reads every accepted position and the token after it: the drafted tokens,
        # then the bonus token (rows past the count are padding the drafter step ignores)
        torch.index_select(hidden, 0, path, out=p.hidden[0, : d + 1])
        torch.index_select(tokens, 0, path[1:], out=p.next_tokens[0, :d])
        p.next_tokens[0].index_copy_(0, length - 1, bonus)
        p.count.copy_(length[0])
        start.add_(length[0])

    def _draft(self, heads: torch.Tensor) -> None:
        tree, tokens = self.tree, self.tree_step.tokens[0]
        if self.dynamic:
            tree.select(heads[0], tokens)
        else:
            cands = torch.topk(heads[0, : self.max_depth], tree.topk, dim=-1).indices.reshape(-1)
            torch.index_select(cands, 0, tree.candidate_index, out=tokens[1:])
        tokens[:1].copy_(self.verdict[2:3])

    # ------------------------------------------------------------------ host side
    def begin(self, heads: torch.Tensor, token: int) -> None:
        """After the prefills: the committed length and the first tree's tokens from the drafter's
        prefill heads (`heads` [1, K, V]) and the target's first token."""
        self.tree_step.start.fill_(self.runner.length)
        self.verdict[2:3].fill_(token)
        self._draft(heads)

    def step(self) -> tuple[int, int, list[int]]:
        """One speculative step; returns (accepted length incl. the root, bonus token, the accepted
        nodes' tokens root first). Advances the host-side lengths of both caches."""
        runner, program, n = self.runner, self.program, self.tree_step.n
        length = runner.length
        # both caches' room, before anything is launched
        self.tree_step.check_room(length)
        program.check_room()
        if self.graphs:
            self.commit_graph.check_addresses()  # the buffers of both programs, checked once per step
            self.tree_step.launch()
            self.commit_graph.replay(checked=False)
            self.host.copy_(self.verdict, non_blocking=self.cuda)
            if self.ready is not None:  # on the engine's device, whichever device is current
                self.ready.record(torch.cuda.current_stream(self.verdict.device))
            program.launch()
            self.draft_graph.replay(checked=False)
            if self.sync_check:
                check_device("the greedy speculative step")
            if self.ready is not None:
                self.ready.synchronize()  # the verdict only: the drafter and the drafting run on meanwhile
        else:
            tree = self.tree_step
            self._commit(*(tree.launch() if tree.graph is not None else tree.eager(length + n)))
            self.host.copy_(self.verdict)
            self._draft(program.launch())
        node, accepted, bonus, *path = self.host.tolist()
        if not 1 <= accepted <= self.max_depth + 1:  # would index the caches out of range next step
            raise RuntimeError(f"verification returned node {node} with {accepted} accepted tokens")
        runner.cache.length = length + accepted
        if program.cache is not None:
            program.cache.length += accepted
        return accepted, bonus, path[:accepted]
