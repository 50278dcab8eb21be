"""Config schemas for the drafting heads and `plmtool draft train`.

`DrafterConfig` describes a drafter (Medusa or Amphista) and is shared by every draft command;
`DraftTrainConfig` holds what only training needs. Every detail the Amphista paper leaves open is
a knob here, with the default we chose (docs/draft.md says why), and every Amphista component has
an on/off switch so the paper's ablations can be rerun.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

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
class DraftTrainerConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    max_steps: int = 2000
    batch_size: int = 8
    grad_accum: int = 1
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU | bf16 | fp32
    grad_clip: float = 1.0
    # loss weight of head k = head_weight_decay**k (Medusa's 0.8^k)
    head_weight_decay: float = 0.8
    # what head k at position t learns: "data" = the sequence's own token t+2+k (Medusa-1);
    # "target" = the target's greedy prediction of that token given the sequence before it (its
    # argmax at position t+1+k). The second is self-distillation from one teacher-forced forward:
    # no generation, so any chat text (e.g. all of ShareGPT) yields labels in the target's own
    # distribution. For head 0 it is exactly the token greedy decoding would emit after t+1.
    # The default since run 9 of docs/benchmarks/draft.md (more accepted tokens per step).
    labels: str = "target"
    log_every: int = 10
    eval_every: int = 200  # held-out per-head accuracy (also at the end)
    save_every: int = 200  # resumable checkpoint (also at the end)
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


# Hydra is optional at import time: the GPU box trains through the Python API without it.
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

    register("draft_train_schema", DraftTrainApp)
