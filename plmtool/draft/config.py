"""Config schemas of every draft command: `plmtool draft train`, `draft bench`, `draft serve`.

`DrafterConfig` describes a drafter (Medusa or Amphista; the `draft` node of training);
`DraftDataConfig` and `DraftTrainerConfig` hold what only training needs. Every detail the
Amphista paper leaves open is a knob here, with the default we chose (docs/draft.md says why), and
every Amphista component has an on/off switch so the paper's ablations can be rerun.
`DecodeDraftConfig` (the `draft` node of bench and serve) says which drafter checkpoints and trees
decode, `EngineOptions` (their `engine` node) how the decoding engine runs, `BenchConfig` and
`ServeConfig` the rest of those two commands.

Plain dataclasses: the Python API (and the GPU scripts, where Hydra may be missing) take them as
they are; the Hydra apps are registered only where Hydra is installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from plmtool.errors import PlmtoolError
from plmtool.train_config import TrainerConfig

DRAFTER_KINDS = ("medusa", "amphista")
FUSIONS = ("concat", "add")


@dataclass
class DrafterConfig:
    kind: str = "amphista"  # medusa | amphista
    # K: head k (0-based) at position t predicts the token at t+2+k
    num_heads: int = 4

    # --- vocabulary projection (both kinds) ---
    # one [H, V] projection shared by all heads, or one per head (Medusa's original layout)
    share_lm_head: bool = True
    # start the projection(s) from a copy of the target's lm_head (else random init)
    init_lm_head_from_target: bool = True
    # keep the vocabulary projection frozen (cheaper training; the copy stays the target's)
    freeze_lm_head: bool = False

    # --- Medusa ---
    # residual blocks x + SiLU(Linear(x)) per head (Medusa's medusa_num_layers)
    medusa_num_layers: int = 1

    # --- Amphista ---
    # fuse the target's hidden state with the embedding of the sampled token
    use_token_embedding: bool = True
    fusion: str = "concat"  # concat: Linear([h; e]) (init = h) | add: h + e
    # staged adaptation layers: causal decoder layers per stage; [] or the switch off = no stages
    use_staged_adaptation: bool = True
    stage_layers: list[int] = field(default_factory=lambda: [1, 1])
    # heads fed by each stage (earlier heads from earlier stages); null = split K evenly
    stage_heads: Optional[list[int]] = None
    # per-head residual blocks that turn the stage feature into K distinct head states
    head_resblocks: int = 1
    # auto-embedding block: bidirectional encoder over the K head states (+ learned positions)
    use_auto_embedding: bool = True
    auto_embedding_layers: int = 1
    use_position_embedding: bool = True
    # attention heads / MLP width of the adaptation and auto-embedding layers (0 = target's)
    num_attention_heads: int = 0
    intermediate_size: int = 0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    # RMSNorm before the vocabulary projection
    final_norm: bool = False


@dataclass
class DraftDataConfig:
    # sharegpt (embedded ShareGPT V3) or a path to a chat JSONL file
    source: str = "sharegpt"
    path: Optional[str] = None  # ShareGPT JSON path override (null = the embedded file)
    limit: Optional[int] = 2000  # conversations read (null = all)
    heldout: int = 64  # conversations held out for per-head accuracy
    max_seq_len: int = 1024  # tokens per training sequence (truncated)
    min_assistant_tokens: int = 8  # drop conversations with fewer supervised tokens
    # self-distillation: regenerate assistant turns with the target (greedy) before training
    self_distill: bool = False
    distill_max_new_tokens: int = 256
    distill_max_turns: int = 1  # user turns regenerated per conversation
    distill_batch_size: int = 16
    distill_prompt_tokens: int = 512  # prompt truncated (from the left) to this many tokens
    seed: int = 0


@dataclass
class DraftTrainerConfig(TrainerConfig):
    """`trainer.*` of `draft train`: the shared trainer settings plus the drafter's own."""

    warmup_steps: int = 50
    max_steps: int = 2000
    # loss weight of head k = head_weight_decay**k (Medusa's 0.8^k)
    head_weight_decay: float = 0.8
    # what head k at position t learns: "data" = the sequence's own token t+2+k (Medusa-1);
    # "target" = the target's greedy prediction of that token given the sequence before it (its
    # argmax at position t+1+k). The second is self-distillation from one teacher-forced forward:
    # no generation, so any chat text (e.g. all of ShareGPT) yields labels in the target's own
    # distribution. For head 0 it is exactly the token greedy decoding would emit after t+1.
    # The default since run 9 of docs/benchmarks/draft.md (more accepted tokens per step).
    labels: str = "target"
    eval_every: int = 200  # held-out per-head accuracy (also at the end)
    eval_batch_size: int = 8
    # keep the target's hidden states in memory after the first pass (multi-epoch speed)
    cache_hidden: bool = True
    cache_hidden_max_gb: float = 8.0  # ...unless they would take more memory than this
    # CPU only: torch threads (0 = torch's default). On an oversubscribed CPU, 1 avoids OpenMP
    # threads waiting on each other at every small op (measured 20x faster on a loaded 2-core box).
    cpu_threads: int = 0
    # stop after this many seconds of training (0: no limit): the state is checkpointed and the
    # same command resumes it (a Slurm job's wall-clock limit, a benchmark's time budget)
    max_time_s: float = 0.0
    seed: int = 0


def drafter_config_from_dict(d: dict) -> DrafterConfig:
    known = {f for f in DrafterConfig.__dataclass_fields__}
    return DrafterConfig(**{k: v for k, v in d.items() if k in known})



# ----------------------------------------------------------------------------- decoding: bench and serve

BENCH_METHODS = ("ar", "hf_generate", "hf_generate_static", "medusa", "amphista")
TREE_ACCURACIES = ("conditional", "marginal")


def check_tree_accuracy(value: str) -> None:
    if value not in TREE_ACCURACIES:
        raise PlmtoolError(f"draft.tree_accuracy must be one of {', '.join(TREE_ACCURACIES)}, got '{value}'")


def check_dynamic_pool(size: int) -> None:
    """The sign only: whether the pool holds the tree is known once the tree is resolved
    (`setup.dynamic_pool_paths`)."""
    if size < 0:
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


CUDA_GRAPHS = ("auto", "true", "false")


@dataclass
class EngineOptions:
    """How the decoding engine runs: which programs are captured as CUDA graphs, compiled, checked.

    The `engine` node of `plmtool draft bench` and `plmtool draft serve` (`engine.compile=true`),
    the options `SpeculativeEngine` takes, recorded in each report. Every feature is on where it
    pays (except `compile`, which costs tens of seconds per step shape at start-up, and
    `sync_check`, a debugging aid); switching one off bisects a device fault without code edits.
    Without CUDA graphs the captured programs run eagerly, so the graph switches matter on CUDA only.
    """

    # auto: on CUDA | true | false: every step program (target steps, prefills, drafter step,
    # the greedy loop's programs) captured as a CUDA graph, each checked and falling back to eager
    cuda_graphs: str = "auto"
    # capture the drafter step too (with cuda_graphs); false: it runs eagerly, target steps captured
    drafter_graph: bool = True
    # the drafter's fixed-shape step (step_static) over one engine-lifetime cache; false: its
    # variable-shape eager `step` with a fresh cache per request
    static_drafter: bool = True
    # torch.compile the target step (a shared runner: as it was built) and the drafter step before
    # capturing them; checked against eager at capture, eager capture on mismatch
    compile: bool = False
    # greedy requests through the device-side loop (greedy_loop.py: no host decision between the
    # programs); false: the general loop, which reads the verdict before drafting
    greedy_loop: bool = True
    # prompts prefilled through padded CUDA graphs (prefill.py; with cuda_graphs), target and drafter
    prefill_graphs: bool = True
    # synchronise after every prefill, step replay and drafter step, so that a device fault raises
    # DeviceStepError naming the program that caused it (slower)
    sync_check: bool = False

    def check(self) -> None:
        if str(self.cuda_graphs).lower() not in CUDA_GRAPHS:
            raise PlmtoolError(f"engine.cuda_graphs must be one of {', '.join(CUDA_GRAPHS)}, got '{self.cuda_graphs}'")

    def graphs_on(self, device) -> bool:
        """Whether step programs are captured on `device` (a torch.device)."""
        self.check()
        value = str(self.cuda_graphs).lower()
        if value == "auto":
            return device.type == "cuda"
        if value == "true" and device.type != "cuda":
            raise PlmtoolError(f"engine.cuda_graphs=true needs a CUDA device, the model is on {device}")
        return value == "true"

    def prefill_graphs_on(self, device) -> bool:
        """Whether prompts are prefilled through padded graphs: only where steps are captured (an
        engine without graphs never replays the ones another engine captured on a shared runner)."""
        return self.graphs_on(device) and bool(self.prefill_graphs)


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
    host: str = "127.0.0.1"  # 0.0.0.0 to accept other machines (set serve.api_key then)
    port: int = 8000
    model_id: Optional[str] = None  # name served in /v1/models (default: the model path)
    max_len: int = 2048  # context per sequence (KV cache slots of each batch row)
    max_tokens_default: int = 256
    acceptance: str = "lossless"  # lossless | typical (Medusa's typical acceptance; lossy)
    typical_epsilon: float = 0.09
    # sequences decoded together per engine step (continuous batching); null: 16 on CUDA, 4 on CPU
    max_batch: Optional[int] = None
    # tree nodes one engine step verifies over all its rows (roots included): a step over b rows
    # decodes with trees of at most step_tokens // b nodes (an auto tree rebuilt at that size);
    # null: every step decodes with draft.tree
    step_tokens: Optional[int] = 512
    max_queue: int = 256  # sequences waiting for a row; beyond it requests get 429
    request_timeout_s: float = 600.0  # a sequence still waiting or decoding after this ends (504); 0 = none
    shutdown_timeout_s: float = 5.0  # SIGTERM / SIGINT: in-flight requests get this long to finish
    api_key: Optional[str] = None  # when set, /v1/* needs "Authorization: Bearer <key>" (else 401)
    max_body_mb: float = 8.0  # larger request bodies get 413
    dry_run: bool = False  # build the app and exit (checks config + model + drafter)

    def check(self) -> None:
        """Each limit in range; the error names the key."""
        if self.acceptance not in ("lossless", "typical"):
            raise PlmtoolError(f"serve.acceptance must be lossless or typical, got '{self.acceptance}'")
        if not 0 < self.port < 65536:
            raise PlmtoolError(f"serve.port must be in 1..65535, got {self.port}")
        if self.step_tokens is not None and self.step_tokens < 1:
            raise PlmtoolError(f"serve.step_tokens must be at least 1 (or null), got {self.step_tokens}")
        if self.max_batch is not None and self.max_batch < 1:
            raise PlmtoolError(f"serve.max_batch must be at least 1 (or null for the device's default), got {self.max_batch}")
        for key in ("max_queue", "max_tokens_default"):
            if getattr(self, key) < 1:
                raise PlmtoolError(f"serve.{key} must be at least 1, got {getattr(self, key)}")
        for key in ("request_timeout_s", "shutdown_timeout_s"):
            if getattr(self, key) < 0:
                raise PlmtoolError(f"serve.{key} must be >= 0, got {getattr(self, key)}")
        if self.max_body_mb <= 0:
            raise PlmtoolError(f"serve.max_body_mb must be > 0, got {self.max_body_mb}")

    def batch_for(self, device) -> int:
        """`max_batch`, or the device's default: 16 rows on CUDA (a step of the 135M target costs
        about the same for one tree or several there), 4 on a CPU."""
        if self.max_batch is not None:
            return int(self.max_batch)
        return 16 if getattr(device, "type", str(device)) == "cuda" else 4


# Hydra is optional at import time: the GPU box trains and benchmarks through the Python API without it.
try:
    from plmtool.config import ModelConfig, register
except ImportError:  # pragma: no cover - exercised only where hydra is missing
    ModelConfig = None  # type: ignore[assignment,misc]

if ModelConfig is not None:

    @dataclass
    class DraftTrainApp:
        model: ModelConfig = field(default_factory=ModelConfig)
        draft: DrafterConfig = field(default_factory=DrafterConfig)
        data: DraftDataConfig = field(default_factory=DraftDataConfig)
        trainer: DraftTrainerConfig = field(default_factory=DraftTrainerConfig)
        # Medusa drafters are also written in Medusa's own layout (TGI / LoRAX) under DIR/medusa_export
        export_medusa: bool = True
        seed: int = 0

    @dataclass
    class DecodeApp:
        """What draft bench and draft serve share: the target, its drafters, the engine."""

        model: ModelConfig = field(default_factory=ModelConfig)
        draft: DecodeDraftConfig = field(default_factory=DecodeDraftConfig)
        engine: EngineOptions = field(default_factory=EngineOptions)
        seed: int = 0

    @dataclass
    class DraftBenchApp(DecodeApp):
        bench: BenchConfig = field(default_factory=BenchConfig)

    @dataclass
    class DraftServeApp(DecodeApp):
        serve: ServeConfig = field(default_factory=ServeConfig)

    register("draft_train_schema", DraftTrainApp)
    register("draft_bench_schema", DraftBenchApp)
    register("draft_serve_schema", DraftServeApp)
