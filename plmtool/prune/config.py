"""Config schema of `plmtool prune sds` (registered as "prune_sds_schema")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from plmtool.config import DataConfig, EvalConfig, ModelConfig, register


@dataclass
class OptimConfig:
    iterations: int = 30
    lr: float = 0.01
    optimizer: str = "adam"  # adam | sgd
    schedule: str = "cosine"  # cosine | constant
    divergence: float = 4.0  # loss above this multiple of the start loss = divergence (step halved)
    max_retries: int = 6
    tf32: bool = True  # TF32 matmuls for the Gram iterations on GPU


@dataclass
class SdsConfig:
    inputs: str = "pruned"  # pruned | dense: activations X used by re-dense and adjustment
    # lambda_1 / lambda_2 of the L1 / L2 penalties, relative to ||W_dense||_1 / ||W_dense||^2.
    # 0.01: on SmolLM2-135M 2:4 (docs/benchmarks/prune.md) 0.1 held SDS(SparseGPT) back.
    l1: float = 0.01
    l2: float = 0.01
    redense: OptimConfig = field(default_factory=OptimConfig)
    adjust: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.05))
    # skip the adjustment when the re-pruned model already beats one-shot on calibration NLL
    # (the paper's shortcut for >3B models; misfires on small calibration sets, see docs/prune.md)
    early_exit: bool = False
    keep_oneshot_if_better: bool = True


@dataclass
class PruneConfig:
    method: str = "wanda"  # magnitude | wanda | sparsegpt
    pattern: str = "2:4"  # N:M (keep N of every M) or "unstructured"
    sparsity: float = 0.5  # used by "unstructured"; N:M implies 1 - N/M
    stages: list[str] = field(default_factory=lambda: ["dense", "oneshot", "redense", "sds"])
    propagate: str = "pruned"  # pruned | dense: what the next block sees during one-shot pruning
    # calibration samples per block call. Same math for any value, but another summation order:
    # 1 is the references' loop (on the CPU it gave their Wanda masks bit for bit); with more,
    # near-ties can flip and the flips propagate to later blocks (docs/prune.md, Wanda)
    batch_size: int = 8
    activations: str = "auto"  # auto | device | cpu: where calibration activations live
    exclude: list[str] = field(default_factory=list)  # linear names (substrings) left dense
    blocksize: int = 128  # SparseGPT column block
    percdamp: float = 0.01  # SparseGPT damping (fraction of mean diag H)
    cuda_graphs: bool = True  # SparseGPT: replay each column block's loop as a CUDA graph (GPU)
    fuse: bool = True  # SparseGPT: prune layers sharing an input (q/k/v, gate/up) in one run (same result)
    sds: SdsConfig = field(default_factory=SdsConfig)
    save_model: bool = True  # final model as a Hugging Face checkpoint in <run_dir>/model
    histogram_bins: int = 200


@dataclass
class PruneSdsApp:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    seed: int = 0


register("prune_sds_schema", PruneSdsApp)
