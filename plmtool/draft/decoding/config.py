"""Config schemas of `plmtool draft bench` and `plmtool draft serve` (decoding side)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

BENCH_METHODS = ("ar", "hf_generate", "hf_generate_static", "medusa", "amphista")
TREE_ACCURACIES = ("conditional", "marginal")


def check_tree_accuracy(value: str) -> None:
    if value not in TREE_ACCURACIES:
        from plmtool.errors import PlmtoolError

        raise PlmtoolError(f"draft.tree_accuracy must be one of {', '.join(TREE_ACCURACIES)}, got '{value}'")


def check_dynamic_pool(size: int) -> None:
    """The sign only: whether the pool holds the tree is known once the tree is resolved
    (`benchmark.dynamic_pool_paths`)."""
    if size < 0:
        from plmtool.errors import PlmtoolError

        raise PlmtoolError(f"draft.dynamic_pool must be >= 0 (0 = static trees), got {size}")


@dataclass
class DecodeDraftConfig:
    # drafter checkpoint directory (written by `plmtool draft train`); its kind names the method
    checkpoint: Optional[str] = None
    # a second checkpoint, the Medusa baseline in benchmarks
    medusa_checkpoint: Optional[str] = None
    # candidate tree: Medusa-format list of paths, a JSON file, "chain", or "auto:<nodes>"
    # (best-first on per-head rank accuracies measured on calibration prompts)
    tree: Any = "auto:48"
    medusa_tree: Any = None  # null = same spec as `tree` (auto trees are built per drafter)
    tree_calibration: int = 8  # prompts whose target responses measure rank accuracies
    # what auto trees multiply along a path: each head's plain accuracy (marginal: independent
    # heads, Medusa's assumption) or its accuracy given its accepted prefix (conditional); on
    # SmolLM2 / MT-Bench both gave the same accepted length (docs/benchmarks/draft.md, run 8)
    tree_accuracy: str = "marginal"
    # dynamic trees (EAGLE-2's idea): > 0 builds a pool of this many candidate paths (like an auto
    # tree, from the same accuracies) and every greedy step decodes with the tree's number of nodes
    # picked from it by the drafter's own probabilities at that step; 0 = the static tree
    dynamic_pool: int = 0
    cuda_graphs: str = "auto"  # auto (on CUDA) | true | false
    # torch.compile the target step before capturing it (CUDA graphs only; checked against
    # eager at capture, eager capture on mismatch); compilation takes tens of seconds per shape
    compile: bool = False


@dataclass
class BenchConfig:
    questions: str = "mtbench"  # mtbench (embedded) | path to a Spec-Bench / MT-Bench question.jsonl
    num_questions: Optional[int] = None  # first N questions (null = all)
    categories: Optional[list[str]] = None
    methods: list[str] = field(default_factory=lambda: list(BENCH_METHODS))
    max_new_tokens: int = 256
    runs: int = 3  # timed runs per question and method (median taken)
    warmup: int = 1  # untimed questions per method before timing
    warmup_tokens: Optional[int] = None  # new tokens per warm-up question (null = max_new_tokens)
    max_len: int = 2048  # engine context (KV cache slots)
    hf_generate_questions: Optional[int] = None  # cap for the slow dynamic-cache generate()
    system_prompt: Optional[str] = None


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    model_id: Optional[str] = None  # name served in /v1/models (default: the model path)
    max_len: int = 2048
    max_tokens_default: int = 256
    acceptance: str = "lossless"  # lossless | typical (Medusa's typical acceptance; lossy)
    typical_epsilon: float = 0.09
    dry_run: bool = False  # build the app and exit (checks config + model + drafter)


try:  # Hydra is absent on the GPU box; the schemas are only registered where it exists
    from plmtool.config import ModelConfig, register
except ImportError:  # pragma: no cover
    ModelConfig = None  # type: ignore[assignment,misc]

if ModelConfig is not None:

    @dataclass
    class DraftBenchApp:
        model: ModelConfig = field(default_factory=ModelConfig)
        draft: DecodeDraftConfig = field(default_factory=DecodeDraftConfig)
        bench: BenchConfig = field(default_factory=BenchConfig)
        seed: int = 0

    @dataclass
    class DraftServeApp:
        model: ModelConfig = field(default_factory=ModelConfig)
        draft: DecodeDraftConfig = field(default_factory=DecodeDraftConfig)
        serve: ServeConfig = field(default_factory=ServeConfig)
        seed: int = 0

    register("draft_bench_schema", DraftBenchApp)
    register("draft_serve_schema", DraftServeApp)
