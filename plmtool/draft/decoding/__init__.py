"""Decoding engine: static KV cache, candidate trees, verification, plain and speculative loops."""

from plmtool.draft.decoding.engine import GenerationConfig, GenerationResult, SpeculativeEngine
from plmtool.draft.decoding.tree import build_tree, make_tree, resolve_tree, validate_tree

__all__ = ["GenerationConfig", "GenerationResult", "SpeculativeEngine", "build_tree", "make_tree", "resolve_tree", "validate_tree"]
