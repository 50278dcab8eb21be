"""Verification of a candidate tree against the target's own predictions.

Three rules:

* `greedy_verify` (temperature 0, lossless): a node is correct when its token equals the target's
  argmax at its parent; the deepest node whose whole path is correct is accepted, and the target's
  argmax there is the bonus token. The emitted tokens are exactly what plain greedy decoding would
  emit, because every emitted token is the target's argmax given the tokens before it.
* `sample_verify` (temperature > 0, lossless, the default): speculative sampling on the tree. The
  candidates of a node are deterministic (top-k of a head), i.e. each is a draft distribution
  q = one-hot(x), so the rule "accept with min(1, p(x)/q(x)), else resample from norm(max(p - q, 0))"
  becomes: accept x with probability p(x); otherwise remove x from p, renormalise, and try the next
  sibling with the renormalised p; when every child is rejected, sample from what is left. Each
  emitted token is then distributed exactly as p (sampling without replacement, decomposed), so the
  output distribution equals that of plain sampling from the target.
* `typical_verify` (opt-in, LOSSY): Medusa's typical acceptance; a candidate is accepted when
  p(x) > min(epsilon, delta * exp(-H(p))). Faster acceptance, but the output no longer follows the
  target's distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from plmtool.draft.decoding.tree import Tree


@dataclass
class Verdict:
    node: int  # deepest accepted node
    length: int  # accepted nodes including the root (= depth(node) + 1)
    bonus: int  # the target's token after the accepted path
    path_tokens: list[int] | None = None  # tokens of the accepted nodes, root first (None: not read back)


def greedy_accepted_node(tree: Tree, tokens: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """The accepted node ([1], on the device) given the target's argmax per node: the deepest node
    whose every token equals the argmax at its parent."""
    return greedy_accepted_nodes(tree, tokens.view(1, -1), pred.view(1, -1))


def greedy_accepted_nodes(tree: Tree, tokens: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """`greedy_accepted_node` for a batch of trees of one shape: tokens / pred [b, n] -> [b]."""
    match = tokens == pred.index_select(1, tree.parent)
    match[:, :1].fill_(True)
    return _deepest(tree, match)


def _deepest(tree: Tree, ok_node: torch.Tensor) -> torch.Tensor:
    """Deepest node whose every node on its path is ok (root always ok); first such node on ties.
    ok_node [n] -> 0-dim, or [b, n] -> [b]."""
    ok_path = ok_node[..., tree.paths] | (torch.arange(tree.paths.shape[1], device=ok_node.device) > tree.depth.view(-1, 1))
    full = ok_path.all(dim=-1)
    score = torch.where(full, tree.depth, torch.full_like(tree.depth, -1))
    return torch.argmax(score, dim=-1)  # argmax returns the first maximal index


def greedy_verify(tree: Tree, tokens: torch.Tensor, logits: torch.Tensor) -> Verdict:
    """tokens [n] (node tokens, root first), logits [n, V] from the tree forward."""
    pred = logits.argmax(dim=-1)
    best = greedy_accepted_node(tree, tokens, pred)
    # one device->host transfer per step: the node, the bonus token and the path's tokens (indexing
    # with a 0-dim tensor would read it on the host: index_select keeps it on the device)
    path_nodes = tree.paths.index_select(0, best)[0]
    node, bonus, *path = torch.cat([best, pred.index_select(0, best), tokens.index_select(0, path_nodes)]).tolist()
    length = tree_depth(tree, node) + 1
    return Verdict(node, length, bonus, path[:length])


def tree_depth(tree: Tree, node: int) -> int:
    return len(tree.choices[node - 1]) if node > 0 else 0


def filter_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """Target distribution p used by both plain sampling and speculative sampling."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_k and top_k < probs.shape[-1]:
        kth = torch.topk(probs, top_k, dim=-1).values[..., -1:]
        probs = torch.where(probs < kth, torch.zeros_like(probs), probs)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        cum = sorted_p.cumsum(-1)
        drop_sorted = (cum - sorted_p) >= top_p  # keep the smallest prefix reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    return probs / probs.sum(-1, keepdim=True)


def _sample(p: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(p, 1, generator=generator).item())


def sample_verify(tree: Tree, tokens: torch.Tensor, logits: torch.Tensor, temperature: float, top_p: float = 1.0,
                  top_k: int = 0, generator: torch.Generator | None = None) -> Verdict:
    """Lossless speculative sampling over the tree (see module doc). `generator` lives on CPU."""
    toks = tokens.tolist()
    node = 0
    chain = [0]
    while True:
        p = filter_probs(logits[node], temperature, top_p, top_k).double().cpu()
        accepted = None
        for child in tree.children[node]:
            x = toks[child]
            mass = float(p.sum())
            if mass <= 0:
                break
            px = float(p[x]) / mass
            u = float(torch.rand((), generator=generator, dtype=torch.float64))
            if u < px:
                accepted = child
                break
            p[x] = 0.0  # residual: p without the rejected candidate
        if accepted is None:
            return Verdict(node, tree_depth(tree, node) + 1, _sample(p / p.sum(), generator), [toks[i] for i in chain])
        node = accepted
        chain.append(node)


def typical_verify(tree: Tree, tokens: torch.Tensor, logits: torch.Tensor, temperature: float,
                   epsilon: float = 0.09, delta: float | None = None, generator: torch.Generator | None = None) -> Verdict:
    """Medusa's typical acceptance (LOSSY; opt-in). delta defaults to sqrt(epsilon) as in Medusa."""
    delta = epsilon**0.5 if delta is None else delta
    probs = torch.softmax(logits.float() / max(temperature, 1e-5), dim=-1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-10))).sum(-1)
    threshold = torch.minimum(torch.full_like(entropy, epsilon), delta * torch.exp(-entropy))
    parent_p = probs[tree.parent].gather(1, tokens.view(-1, 1)).squeeze(1)
    ok = parent_p > threshold[tree.parent]
    ok[0] = True
    best = int(_deepest(tree, ok).item())
    bonus = _sample(probs[best].double().cpu(), generator)
    return Verdict(best, tree_depth(tree, best) + 1, bonus)
