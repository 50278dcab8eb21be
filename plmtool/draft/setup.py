"""What `plmtool draft bench` and `plmtool draft serve` both set up: prompts in the chat template,
stop tokens, the drafter checkpoints and engine options checked before any model loads, a drafter
loaded for its target with its candidate tree (auto trees from rank accuracies measured on the
target's own answers), and the pool of a dynamic tree.

Pure Python over torch/transformers (no Hydra), so `scripts/bench_draft.py` uses it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TypeVar

from plmtool.draft.accuracy import RankAccuracy, measure_rank_accuracy
from plmtool.draft.config import EngineOptions, check_dynamic_pool, check_tree_accuracy
from plmtool.draft.decoding.engine import GenerationConfig
from plmtool.draft.decoding.target import TargetRunner
from plmtool.draft.decoding.tree import build_tree, resolve_tree, validate_tree
from plmtool.draft.drafter import check_checkpoint, load_drafter
from plmtool.errors import PlmtoolError

T = TypeVar("T")

# ----------------------------------------------------------------------------- prompts


def chat_prompt_ids(tokenizer, text: str, system_prompt: str | None = None) -> list[int]:
    """Token ids of one user turn in the model's chat template (plain text without a template)."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": text}]
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]


def stop_token_ids(model, tokenizer) -> list[int]:
    ids = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(src, "eos_token_id", None)
        if eos is None:
            continue
        ids.update([eos] if isinstance(eos, int) else list(eos))
    return sorted(int(i) for i in ids)


# ----------------------------------------------------------------------------- config checks


def check_decoding_config(draft, checkpoints: Sequence[str] = ("checkpoint",), trees: Sequence[str] = ("tree",)) -> None:
    """The `draft` node of bench and serve, before any model loads: the tree settings, each
    checkpoint named in `checkpoints` (a directory whose config and weights file are whole), each
    explicit tree (list of paths) named in `trees`. Raises PlmtoolError."""
    check_tree_accuracy(draft.tree_accuracy)
    check_dynamic_pool(draft.dynamic_pool)
    for key in checkpoints:
        path = getattr(draft, key, None)
        if not path:
            continue
        if not Path(path).is_dir():
            raise PlmtoolError(f"draft.{key}: {path} is not a directory (expected a drafter checkpoint)")
        check_checkpoint(path)
    for key in trees:
        spec = getattr(draft, key, None)
        if spec is not None and not isinstance(spec, str):
            validate_tree(plain_tree(spec))


def checked_options(node: Any, cls: type[T]) -> T:
    """A config node (Hydra node, dict, or already a `cls`) as the options dataclass the code
    takes, checked (`cls.check()` names the offending key)."""
    if not isinstance(node, cls):
        from omegaconf import OmegaConf

        node = cls(**(OmegaConf.to_container(node) if OmegaConf.is_config(node) else dict(node)))
    node.check()
    return node


def engine_options(node: Any) -> EngineOptions:
    """The `engine` node of bench and serve as the `EngineOptions` the engine takes, checked."""
    return checked_options(node, EngineOptions)


def plain_tree(spec: Any) -> Any:
    """A tree spec as plain Python (a Hydra list node becomes a list of lists; strings stay)."""
    if spec is None or isinstance(spec, str):
        return spec
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(spec):
            return OmegaConf.to_container(spec)
    except ImportError:  # pragma: no cover - no Hydra: specs are plain already
        pass
    return [list(p) for p in spec]


# ----------------------------------------------------------------------------- drafters and trees


@dataclass
class DrafterSetup:
    name: str  # method name = drafter kind
    drafter: Any
    tree: list[list[int]]
    rank_accuracy: list[list[float]] | None  # what the tree was built from (see accuracy.py)
    checkpoint: str
    measured: RankAccuracy | None = None
    pool: list[list[int]] | None = None  # candidate paths of a dynamic tree (None: static tree)


def setup_drafter(model, path: str, tree_spec: Any, calibration: Sequence[tuple[list[int], list[int]]], max_len: int,
                  tree_accuracy: str = "marginal", dynamic_pool: int = 0) -> DrafterSetup:
    """Load a drafter for `model` and resolve its tree (auto trees use measured rank accuracies,
    `tree_accuracy` says which: see accuracy.py); `dynamic_pool` > 0: also the candidate pool of a
    dynamic tree, that many paths built from the same accuracies (dynamic_tree.py)."""
    check_tree_accuracy(tree_accuracy)
    check_dynamic_pool(dynamic_pool)
    tree_spec = plain_tree(tree_spec)
    drafter = load_drafter(path, target=model)
    measured = None
    if isinstance(tree_spec, str) and tree_spec.startswith("auto") and calibration:
        measured = measure_rank_accuracy(TargetRunner(model, max_len), drafter, calibration)
    acc = getattr(measured, tree_accuracy) if measured is not None else None
    tree = resolve_tree(tree_spec, drafter.num_heads, acc)
    pool = dynamic_pool_paths(dynamic_pool, tree, drafter.num_heads, acc)
    return DrafterSetup(drafter.cfg.kind, drafter, tree, acc, str(path), measured, pool)


def bucket_trees(setup: "DrafterSetup", buckets: Sequence[int], step_tokens: int | None) -> dict[int, list[list[int]]]:
    """Smaller trees for batches of many rows: a step over b rows verifies at most `step_tokens`
    tree nodes in all (the root of each row included), so each row gets at most step_tokens // b
    nodes. An auto tree is rebuilt at that size from the same accuracies (the best tree of that
    size); another tree keeps its first nodes (sorted by depth, so a prefix is a tree). Buckets
    whose share holds the whole tree are left out (they decode with it)."""
    if not step_tokens:
        return {}
    out = {}
    for b in buckets:
        paths = max(step_tokens // b, 1) - 1  # nodes per row less the root
        if paths >= len(setup.tree):
            continue
        if setup.rank_accuracy is not None:
            out[b] = build_tree(setup.rank_accuracy[: setup.drafter.num_heads], paths) if paths else []
        else:
            out[b] = setup.tree[:paths]
    return out


def dynamic_pool_paths(size: int, tree: list[list[int]], num_heads: int,
                       acc: Sequence[Sequence[float]] | None) -> list[list[int]] | None:
    """The pool of a dynamic tree: the `size` best paths by `acc`, like an auto tree of that size
    (None for size 0). Never smaller than the tree itself."""
    if not size:
        return None
    if size < len(tree):
        raise PlmtoolError(f"a dynamic tree's pool of {size} paths is smaller than its tree of {len(tree)}")
    return resolve_tree(f"auto:{size}", num_heads, acc)


def calibration_sequences(engine: Any, prompts: Sequence[list[int]], max_new_tokens: int,
                          stops: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """(prompt, target greedy response) pairs on which drafter accuracies are measured; `engine`:
    any engine with `generate` (`SpeculativeEngine`, or a `BatchEngine` with nothing else live)."""
    seqs = []
    for p in prompts:
        out = engine.generate(p, GenerationConfig(max_new_tokens=max_new_tokens, stop_token_ids=stops))
        seqs.append((list(p), out.tokens))
    return seqs
