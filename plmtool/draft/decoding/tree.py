"""Static candidate trees in Medusa's format, their validation, attention mask, and a builder.

A tree is a list of paths, e.g. `[[0], [1], [0, 0], [0, 1], [1, 0]]`: the path `[a, b]` is the
node reached by taking the rank-`a` candidate of head 0 and then the rank-`b` candidate of head 1.
The root (the token the target just produced, not yet in the cache) is implicit; node 0 below is
the root, nodes 1.. follow the paths sorted by (depth, ranks) as Medusa does.
"""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from plmtool.errors import PlmtoolError

# Per-head top-1 accuracies Medusa reports for Vicuna-7B: a neutral default for `auto` trees
# when a drafter carries no measured accuracies.
VICUNA_TOP1 = [0.56, 0.32, 0.20, 0.15, 0.12]


def validate_tree(choices: Any, num_heads: int | None = None, max_rank: int | None = None) -> list[list[int]]:
    """Check a Medusa-format tree and return it sorted; raise PlmtoolError naming the problem."""
    if not isinstance(choices, (list, tuple)):
        raise PlmtoolError(f"tree must be a list of paths (lists of non-negative ints), got {type(choices).__name__}")
    seen: set[tuple[int, ...]] = set()
    for i, path in enumerate(choices):
        if not isinstance(path, (list, tuple)) or len(path) == 0:
            raise PlmtoolError(f"tree path #{i} must be a non-empty list of ints, got {path!r}")
        for r in path:
            if isinstance(r, bool) or not isinstance(r, int) or r < 0:
                raise PlmtoolError(f"tree path #{i} {list(path)} holds {r!r}: ranks must be non-negative ints")
            if max_rank is not None and r >= max_rank:
                raise PlmtoolError(f"tree path #{i} {list(path)} asks for rank {r}, beyond the vocabulary ({max_rank})")
        key = tuple(path)
        if key in seen:
            raise PlmtoolError(f"tree path {list(path)} appears twice")
        seen.add(key)
    for key in seen:
        if len(key) > 1 and key[:-1] not in seen:
            raise PlmtoolError(f"tree path {list(key)} has no parent {list(key[:-1])} in the tree")
        if num_heads is not None and len(key) > num_heads:
            raise PlmtoolError(f"tree path {list(key)} is {len(key)} deep but the drafter has only {num_heads} heads")
    return [list(p) for p in sorted(seen, key=lambda p: (len(p), p))]


@dataclass
class Tree:
    """Index tensors derived from a validated tree (node 0 = root)."""

    choices: list[list[int]]
    depth: torch.Tensor  # [n] 0 for the root
    parent: torch.Tensor  # [n] parent node (root: 0)
    ancestors: torch.Tensor  # [n, n] bool: node i sees node j (j on the path root..i)
    paths: torch.Tensor  # [n, max_depth + 1] node ids root..i, padded with 0
    children: list[list[int]]  # per node, children in rank order
    candidate_index: torch.Tensor  # [n - 1] index into the flattened [heads, topk] candidate table
    topk: int  # candidates needed per head

    @property
    def n(self) -> int:
        return int(self.depth.numel())

    @property
    def max_depth(self) -> int:
        return int(self.depth.max().item()) if self.n > 1 else 0

    def to(self, device) -> "Tree":
        return Tree(self.choices, self.depth.to(device), self.parent.to(device), self.ancestors.to(device),
                    self.paths.to(device), self.children, self.candidate_index.to(device), self.topk)


def make_tree(choices: Sequence[Sequence[int]], num_heads: int | None = None) -> Tree:
    choices = validate_tree(list(choices), num_heads)
    n = len(choices) + 1
    index = {(): 0}
    for i, p in enumerate(choices, 1):
        index[tuple(p)] = i
    depth = torch.zeros(n, dtype=torch.long)
    parent = torch.zeros(n, dtype=torch.long)
    ancestors = torch.zeros(n, n, dtype=torch.bool)
    ancestors[0, 0] = True
    max_depth = max((len(p) for p in choices), default=0)
    paths = torch.zeros(n, max_depth + 1, dtype=torch.long)
    children: list[list[int]] = [[] for _ in range(n)]
    topk = max((r for p in choices for r in p), default=-1) + 1
    cand = torch.zeros(max(n - 1, 0), dtype=torch.long)
    for i, p in enumerate(choices, 1):
        depth[i] = len(p)
        parent[i] = index[tuple(p[:-1])]
        children[int(parent[i])].append(i)
        chain = [index[tuple(p[:j])] for j in range(len(p) + 1)]
        ancestors[i, chain] = True
        paths[i, : len(chain)] = torch.tensor(chain)
        # head (depth-1) proposes this node; its rank is the last entry of the path
        cand[i - 1] = (len(p) - 1) * topk + p[-1]
    for c in children:
        c.sort(key=lambda j: choices[j - 1][-1])
    return Tree(choices, depth, parent, ancestors, paths, children, cand, max(topk, 1))


def chain_tree(depth: int) -> list[list[int]]:
    """The top-1 chain: one candidate per head."""
    return [[0] * d for d in range(1, depth + 1)]


def rank_accuracy_from_top1(top1: Sequence[float], ranks: int = 10, decay: float = 0.5) -> list[list[float]]:
    """Approximate P(correct token has rank r) per head when only top-1 is known.

    Assumes the remaining mass of each head decays geometrically over ranks (a rough shape that
    matches published top-k curves); measured rank accuracies (`measure_rank_accuracy`) are better.
    """
    table = []
    for a in top1:
        a = min(max(float(a), 0.0), 1.0)
        rest = [(1 - a) * 0.5 * decay**r for r in range(ranks - 1)]  # about half the rest in the top ranks
        table.append([a, *rest])
    return table


def build_tree(rank_acc: Sequence[Sequence[float]], budget: int, max_depth: int | None = None) -> list[list[int]]:
    """Pick the `budget` nodes with the highest estimated acceptance probability.

    `rank_acc[k][r]` = P(head k's rank-r candidate is the target's token): marginal (independent
    heads, Medusa's tree search) or given the path's accepted prefix (`RankAccuracy.conditional`).
    A node's acceptance probability is the product along its path, and a child is never more
    likely than its parent, so a best-first search from the root yields the optimal tree of that
    size for the expected accepted length.
    """
    if budget < 1:
        raise PlmtoolError(f"tree budget must be at least 1 node, got {budget}")
    depth_limit = len(rank_acc) if max_depth is None else min(max_depth, len(rank_acc))
    if depth_limit < 1:
        raise PlmtoolError("cannot build a tree without head accuracies")
    # a floor keeps the budget filled (in rank order) for heads measured at zero accuracy
    rank_acc = [[max(float(a), 1e-9) for a in row] for row in rank_acc]
    heap: list[tuple[float, tuple[int, ...]]] = []

    def push(path: tuple[int, ...], prob: float) -> None:
        k, r = len(path) - 1, path[-1]
        if k < depth_limit and r < len(rank_acc[k]):
            heapq.heappush(heap, (-prob, path))

    # every child of a chosen node becomes a candidate (not just rank 0 and the next sibling):
    # measured tables, conditional ones especially, need not decrease with the rank
    for r in range(len(rank_acc[0])):
        push((r,), rank_acc[0][r])
    chosen: list[list[int]] = []
    while heap and len(chosen) < budget:
        neg, path = heapq.heappop(heap)
        prob = -neg
        chosen.append(list(path))
        if len(path) < depth_limit:
            for r in range(len(rank_acc[len(path)])):
                push(path + (r,), prob * rank_acc[len(path)][r])
    return validate_tree(chosen)


def expected_accept_length(choices: Sequence[Sequence[int]], rank_acc: Sequence[Sequence[float]]) -> float:
    """1 (the bonus token) + sum of node acceptance probabilities (products of `rank_acc` along each
    path: exact when `rank_acc` holds each head's accuracy given its accepted prefix)."""
    total = 1.0
    for p in choices:
        prob = 1.0
        for k, r in enumerate(p):
            prob *= float(rank_acc[k][r]) if k < len(rank_acc) and r < len(rank_acc[k]) else 0.0
        total += prob
    return total


def resolve_tree(spec: Any, num_heads: int, rank_acc: Sequence[Sequence[float]] | None = None) -> list[list[int]]:
    """Turn a config value into a tree.

    `spec` may be a list of paths, a JSON file holding one, `chain`, or `auto:<nodes>` (built from
    `rank_acc`, falling back to Vicuna-like accuracies).
    """
    if spec is None or spec == "":
        spec = "auto:32"
    if isinstance(spec, str):
        if spec == "chain":
            return chain_tree(num_heads)
        if spec.startswith("auto"):
            try:
                budget = int(spec.split(":", 1)[1]) if ":" in spec else 32
            except ValueError:
                raise PlmtoolError(f"tree '{spec}': expected auto:<number of nodes>") from None
            acc = rank_acc or rank_accuracy_from_top1((VICUNA_TOP1 + [0.1] * num_heads)[:num_heads])
            return build_tree(acc[:num_heads], budget)
        path = Path(spec)
        if path.is_file():
            try:
                return validate_tree(json.loads(path.read_text()), num_heads)
            except json.JSONDecodeError as e:
                raise PlmtoolError(f"tree file {path}: not valid JSON ({e})") from None
        try:
            return validate_tree(json.loads(spec), num_heads)
        except json.JSONDecodeError:
            raise PlmtoolError(f"tree '{spec}': expected a list of paths, a JSON file, 'chain' or 'auto:<nodes>'") from None
    return validate_tree([list(p) for p in spec], num_heads)


def tree_summary(choices: Sequence[Sequence[int]]) -> dict[str, Any]:
    depths = [len(p) for p in choices]
    return {"nodes": len(choices) + 1, "max_depth": max(depths, default=0),
            "per_depth": [depths.count(d) for d in range(1, max(depths, default=0) + 1)]}
