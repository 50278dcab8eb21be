"""Redistribution to a budget: dense regions thinned, the long tail kept, a floor per cluster.

Two levels, both deterministic for a seed:

1. Across clusters (`allocate`): every cluster first gets its floor (min(size, floor), floor >= 1,
   so no cluster - in particular no small tail cluster - is ever emptied). The rest of the budget
   is shared in proportion to size**alpha (alpha=1: proportional, alpha=0: equal shares,
   default 0.5 flattens big clusters), water-filled so that no cluster gets more than it has,
   and rounded by largest remainder so the total is exactly the budget.

2. Within a cluster (`weights` + `weighted_sample`): sampling without replacement with weight
     w = (radius / median radius)**beta        # sparse neighbourhoods weigh more
       * (1 / size of its DBSCAN mode)**mode_alpha   # big dense modes thinned (the noise = tail is one group)
       * tail_boost if the point is DBSCAN noise      # the long tail kept preferentially
       * (need / mean need in cluster)**gamma  # the model's own need (loss or IFD), optional
   using Efraimidis-Spirakis keys log(u)/w (exact weighted sampling without replacement).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from plmtool.errors import PlmtoolError


def check_budget(budget: float) -> None:
    if not (isinstance(budget, (int, float)) and 0.0 < float(budget) <= 1.0):
        raise PlmtoolError(f"experts.budget must be in (0, 1], got {budget}")


def budget_count(n: int, budget: float) -> int:
    check_budget(budget)
    return max(1, int(round(n * float(budget))))


def allocate(sizes: np.ndarray, total: int, floor: int = 1, alpha: float = 0.5) -> np.ndarray:
    """Integer quota per cluster; sum == total unless the floors alone exceed it."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if floor < 1:
        raise PlmtoolError(f"experts.floor must be >= 1 (a cluster is never emptied), got {floor}")
    if alpha < 0:
        raise PlmtoolError(f"experts.alpha must be >= 0, got {alpha}")
    total = min(int(total), int(sizes.sum()))
    base = np.minimum(sizes, floor)
    if base.sum() >= total:
        return base
    cap = (sizes - base).astype(np.float64)
    share = np.where(sizes > 0, sizes.astype(np.float64) ** alpha, 0.0)
    extra = np.zeros(len(sizes))
    remaining = float(total - base.sum())
    active = cap > 0
    while remaining > 1e-9 and active.any():
        alloc = remaining * share[active] / share[active].sum()
        take = np.minimum(alloc, cap[active] - extra[active])
        extra[active] += take
        remaining -= take.sum()
        active = active & (cap - extra > 1e-9)
    ints = np.floor(extra + 1e-9).astype(np.int64)
    left = int(total - base.sum() - ints.sum())
    order = np.argsort(-(extra - ints), kind="stable")
    while left > 0:
        moved = False
        for i in order:
            if left == 0:
                break
            if ints[i] < cap[i]:
                ints[i] += 1
                left -= 1
                moved = True
        if not moved:
            break
    return base + ints


def weighted_sample(weights: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of m items drawn without replacement with probability proportional to weight."""
    n = len(weights)
    if m >= n:
        return np.arange(n)
    w = np.maximum(np.asarray(weights, dtype=np.float64), 1e-300)
    u = rng.random(n)
    keys = np.log(np.maximum(u, 1e-300)) / w  # Efraimidis-Spirakis, in log space
    return np.sort(np.argsort(-keys, kind="stable")[:m])


def sample_weights(
    radius: np.ndarray, mode: np.ndarray, need: np.ndarray | None, beta: float, mode_alpha: float, gamma: float,
    tail_boost: float = 2.0,
) -> np.ndarray:
    """Sampling weights of the points of ONE cluster, normalised to mean 1."""
    med = float(np.median(radius))
    w = (np.maximum(radius, 1e-12) / med) ** beta if med > 0 else np.ones(len(radius))
    if mode_alpha:
        # the DBSCAN noise of a cluster (its tail) counts as one group of its own size, like a
        # dense mode, so that a mode of m points gets a total weight ~ m**(1 - mode_alpha); the
        # tail then gets `tail_boost` times what a mode of its size would
        _, inverse, counts = np.unique(mode, return_inverse=True, return_counts=True)
        size = counts[inverse].astype(np.float64)
        w = w * size ** (-mode_alpha) * np.where(mode < 0, tail_boost, 1.0)
    if need is not None and gamma:
        nd = np.maximum(np.asarray(need, dtype=np.float64), 1e-6)
        w = w * (nd / nd.mean()) ** gamma
    return w / w.mean()


@dataclass
class Redistribution:
    selected: np.ndarray  # [n] bool
    weight: np.ndarray  # [n] within-cluster sampling weight (mean 1 per cluster)
    quotas: np.ndarray  # [K]
    sizes: np.ndarray  # [K]
    budget_n: int
    floors_exceed_budget: bool
    extra: dict = field(default_factory=dict)


def redistribute(
    labels: np.ndarray,
    k: int,
    radius: np.ndarray,
    mode: np.ndarray,
    need: np.ndarray | None = None,
    budget: float = 0.1,
    floor: int = 8,
    alpha: float = 0.5,
    beta: float = 1.0,
    mode_alpha: float = 0.5,
    gamma: float = 1.0,
    tail_boost: float = 2.0,
    seed: int = 0,
) -> Redistribution:
    """Pick budget * n samples: quotas per cluster, then weighted sampling inside each cluster."""
    labels = np.asarray(labels)
    n = len(labels)
    if n == 0:
        raise PlmtoolError("nothing to redistribute: no samples")
    total = budget_count(n, budget)
    sizes = np.bincount(labels, minlength=k)
    quotas = allocate(sizes, total, floor=floor, alpha=alpha)
    selected = np.zeros(n, dtype=bool)
    weight = np.zeros(n, dtype=np.float64)
    for c in range(k):
        members = np.flatnonzero(labels == c)
        if len(members) == 0:
            continue
        w = sample_weights(radius[members], mode[members], None if need is None else need[members], beta, mode_alpha, gamma,
                           tail_boost)
        weight[members] = w
        # one generator per (seed, cluster): a cluster's draw does not depend on the others
        pick = weighted_sample(w, int(quotas[c]), np.random.default_rng([seed, 1, c]))
        selected[members[pick]] = True
    return Redistribution(
        selected=selected, weight=weight, quotas=quotas, sizes=sizes, budget_n=total,
        floors_exceed_budget=bool(quotas.sum() > total),
    )


def random_subset(n: int, m: int, seed: int) -> np.ndarray:
    """The random baseline: m of n indices, uniformly, seeded (bool mask)."""
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng([seed, 2]).choice(n, size=min(m, n), replace=False)] = True
    return mask


def balanced_subset(tasks: np.ndarray, m: int, seed: int) -> np.ndarray:
    """The task-balanced random baseline: m indices, an equal share per task (capped by the task's
    size, the rest water-filled over the larger tasks), uniform within a task, seeded (bool mask)."""
    names, inverse = np.unique(np.asarray(tasks, dtype=str), return_inverse=True)
    quotas = allocate(np.bincount(inverse, minlength=len(names)), m, floor=1, alpha=0.0)
    mask = np.zeros(len(inverse), dtype=bool)
    for t in range(len(names)):
        members = np.flatnonzero(inverse == t)
        pick = np.random.default_rng([seed, 3, t]).choice(len(members), size=int(quotas[t]), replace=False)
        mask[members[pick]] = True
    return mask


def task_floor(selected: np.ndarray, tasks: np.ndarray, weight: np.ndarray, floor: int) -> tuple[np.ndarray, dict[str, int]]:
    """Top up every task to at least `floor` selected samples (its highest-weight unselected ones).

    The clusters' quotas know nothing of tasks, so a small task spread thinly over big clusters
    could lose every sample; this is the task-level twin of the cluster floor. Returns the new mask
    and the number added per task (only tasks that needed it).
    """
    selected = selected.copy()
    tasks = np.asarray(tasks, dtype=str)
    added: dict[str, int] = {}
    for t in np.unique(tasks):
        members = np.flatnonzero(tasks == t)
        if len(members) < floor:
            raise PlmtoolError(f"task '{t}' has {len(members)} samples in the pool, fewer than experts.task_floor={floor}")
        short = floor - int(selected[members].sum())
        if short > 0:
            free = members[~selected[members]]
            pick = free[np.argsort(-weight[free], kind="stable")[:short]]
            selected[pick] = True
            added[str(t)] = short
    return selected, added
