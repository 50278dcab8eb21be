"""Dynamic candidate trees: each step's nodes picked by the drafter's own confidence (EAGLE-2's idea).

A static tree spends its node budget where the heads are right *on average*: the same 10 rank-0..9
children of the root, the same few grandchildren, whatever the drafter says at this step. But a
head's confidence varies a lot from step to step: after "The capital of" head 0 may be sure of one
token, while after a line break it spreads over dozens. Ranking every candidate path by the product
of the heads' probabilities along it, at every step, puts the budget where this step's acceptance
is likely (deep chains when the heads are sure, wide fans when they are not).

To keep the step a fixed-shape device program (a CUDA graph, no host decision), the candidates come
from a fixed *pool*: a large static tree of `m` paths (built from measured rank accuracies like any
auto tree). Per step:

  1. top-k of each head's log-probabilities (the pool's deepest rank + 1 per head);
  2. a path's score is the sum of its nodes' log-probabilities (the root scores 0, the padding of
     `pool.paths` points at the root, so a gather and a sum give every path's score);
  3. the `n - 1` best pool nodes (plus the root) form the tree. A child never scores above its
     parent (log-probabilities are <= 0, and a small depth penalty breaks exact ties), so the pick
     is closed under ancestors: every chosen node's path is chosen too;
  4. sorted by pool index, parents precede children (the pool is sorted by depth); the tree's depth,
     parent, ancestor mask and paths are gathered from the pool's and renumbered in place.

Verification is unchanged (greedy: the deepest node whose path matches the target's argmax), so the
output stays exactly that of plain greedy decoding; only which candidates are tried changes.
"""

from __future__ import annotations

from typing import Sequence

import torch

from plmtool.draft.decoding.tree import make_tree
from plmtool.errors import PlmtoolError

# Scores must stay finite and bounded for the depth penalty to beat fp32 rounding: log-probabilities are
# floored at -40 (NaN too), so a score lies in [-40 * depth, 0], where fp32 rounds by far less than the
# penalty of 1e-3 per depth; a child then scores strictly below its parent.
LOGP_FLOOR = -40.0
DEPTH_PENALTY = 1e-3


class DynamicTree:
    """Buffers of one `n`-node tree (root included), rewritten on the device by `select` each step.

    Exposes what verification and the tree step read from a static `Tree`: `depth`, `parent`,
    `paths` (width: the pool's depth + 1), `ancestors`, `n`, `max_depth`.
    """

    def __init__(self, pool: Sequence[Sequence[int]], nodes: int, device, num_heads: int | None = None):
        self.pool = make_tree(pool, num_heads).to(device)
        if not 2 <= nodes <= self.pool.n:
            raise PlmtoolError(f"a dynamic tree of {nodes} nodes (root included) needs a pool of at least as many; "
                               f"the pool has {self.pool.n}")
        self.n = nodes
        self.max_depth = self.pool.max_depth  # host int, read once
        self.topk = self.pool.topk
        dev = self.pool.depth.device
        self.node_ids = torch.arange(nodes, device=dev)
        self.selected = torch.zeros(nodes, dtype=torch.long, device=dev)  # pool node of each tree node
        self.position = torch.zeros(self.pool.n, dtype=torch.long, device=dev)  # tree node of each chosen pool node
        self.depth = torch.zeros(nodes, dtype=torch.long, device=dev)
        self.parent = torch.zeros(nodes, dtype=torch.long, device=dev)
        self.paths = torch.zeros(nodes, self.max_depth + 1, dtype=torch.long, device=dev)
        self.ancestors = torch.zeros(nodes, nodes, dtype=torch.bool, device=dev)
        self._penalty = self.pool.depth.float() * DEPTH_PENALTY
        # until the first step: the pool's first nodes (shallowest first, hence closed under ancestors)
        self._take(torch.arange(nodes, device=dev))

    def _take(self, chosen: torch.Tensor) -> None:
        """Make the tree of pool nodes `chosen` ([n], sorted, root first) in place."""
        pool = self.pool
        self.selected.copy_(chosen)
        self.position.index_copy_(0, chosen, self.node_ids)  # stale entries belong to unchosen nodes, never read
        torch.index_select(pool.depth, 0, chosen, out=self.depth)
        torch.index_select(self.position, 0, pool.parent.index_select(0, chosen), out=self.parent)
        self.paths.copy_(self.position[pool.paths.index_select(0, chosen)])  # path padding (root) maps to node 0
        self.ancestors.copy_(pool.ancestors.index_select(0, chosen).index_select(1, chosen))

    def select(self, heads: torch.Tensor, tokens: torch.Tensor) -> None:
        """heads [D, V] (the drafter's logits for the next D positions, D >= the pool's depth);
        writes this step's tree into the buffers and its candidate tokens into `tokens[1:]` (the
        root, `tokens[0]`, is the caller's). Device ops only, fixed shapes."""
        pool = self.pool
        logp, cands = torch.topk(torch.log_softmax(heads[: self.max_depth].float(), dim=-1), self.topk, dim=-1)
        # NaN logits (a diverged drafter) would rank first and break the closure; -inf would tie
        logp = torch.nan_to_num(logp, nan=LOGP_FLOOR, neginf=LOGP_FLOOR).clamp_min(LOGP_FLOOR)
        node_logp = logp.reshape(-1).index_select(0, pool.candidate_index)
        node_logp = torch.cat([node_logp.new_zeros(1), node_logp])  # the root
        score = node_logp[pool.paths].sum(dim=1) - self._penalty
        score[:1].fill_(float("inf"))  # the root is always in (fill_: no host tensor, capturable)
        chosen = torch.topk(score, self.n, sorted=False).indices.sort().values
        self._take(chosen)
        torch.index_select(cands.reshape(-1), 0, pool.candidate_index.index_select(0, chosen[1:] - 1), out=tokens[1:])

    def choices(self) -> list[list[int]]:
        """The current tree as Medusa-format paths (host read; for tests and reports)."""
        return [self.pool.choices[int(i) - 1] for i in self.selected[1:].tolist()]
