"""Settings of pruning and SDS: the `prune` group of `plmtool prune sds`, and the objects the math
takes (plmtool.prune.oneshot, .sds, .sequential).

Plain dataclasses (no hydra, no torch): the command turns its composed config into them once
(`OmegaConf.to_object`), scripts build them directly, and every default lives here only. Each
dataclass checks its own fields as it is built and raises PlmtoolError with one line naming the
config key. The Hydra schema that embeds them is plmtool.prune.schema.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from plmtool.errors import PlmtoolError

METHODS = ("magnitude", "wanda", "sparsegpt")
STAGES = ("dense", "oneshot", "redense", "sds")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class Pattern:
    """A parsed `prune.pattern`: `n`/`m` set for N:M; `sparsity` is the fraction of weights pruned
    per layer."""

    sparsity: float
    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def prune_per_group(self) -> int:
        return self.m - self.n

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"unstructured {self.sparsity:.0%}"


def parse_pattern(pattern: str, sparsity: float | None = None) -> Pattern:
    """`"2:4"`, `"4:8"`, ... or `"unstructured"` (needs `sparsity` in (0, 1))."""
    text = str(pattern).strip().lower()
    match = re.fullmatch(r"(\d+)\s*:\s*(\d+)", text)
    if match:
        n, m = int(match.group(1)), int(match.group(2))
        if m < 2 or n < 1:
            raise PlmtoolError(f"prune.pattern={pattern}: N and M must be positive with M >= 2")
        if n >= m:
            raise PlmtoolError(f"prune.pattern={pattern}: N must be smaller than M (keep N of every M weights)")
        return Pattern(sparsity=1.0 - n / m, n=n, m=m)
    if text in ("unstructured", "dense-rows", "none"):
        if sparsity is None or not (0.0 < float(sparsity) < 1.0):
            raise PlmtoolError(f"prune.sparsity={sparsity}: must lie strictly between 0 and 1")
        return Pattern(sparsity=float(sparsity))
    raise PlmtoolError(f"prune.pattern={pattern}: expected 'unstructured' or N:M such as 2:4 or 4:8")


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise PlmtoolError(f"{key}={value}: expected one of {', '.join(allowed)}")


@dataclass
class OptimConfig:
    """One SDS optimisation (re-dense or adjustment) of every layer; see plmtool.prune.sds."""

    iterations: int = 30
    lr: float = 0.01
    optimizer: str = "adam"  # adam | sgd
    schedule: str = "cosine"  # cosine | constant
    divergence: float = 4.0  # loss above this multiple of the start loss = divergence (step halved)
    max_retries: int = 6  # step halvings before giving up (keeps the best weights seen)
    tf32: bool = True  # TF32 matmuls for the Gram iterations on GPU (reconstruction tolerates it)

    def validate(self, where: str) -> None:
        """`where`: this object's config key (prune.sds.redense / prune.sds.adjust), named in the
        error; SdsConfig checks both of its optimisations with it as it is built."""
        _one_of(f"{where}.optimizer", self.optimizer, OPTIMIZERS)
        _one_of(f"{where}.schedule", self.schedule, SCHEDULES)
        if self.iterations < 0:
            raise PlmtoolError(f"{where}.iterations={self.iterations}: must be >= 0")
        if not self.lr > 0:
            raise PlmtoolError(f"{where}.lr={self.lr}: must be positive")


@dataclass
class SdsConfig:
    inputs: str = "pruned"  # pruned | dense: activations X used by re-dense and adjustment
    # lambda_1 / lambda_2 of the L1 / L2 penalties, relative to ||W_dense||_1 / ||W_dense||^2.
    # 0.01: on SmolLM2-135M 2:4 (docs/benchmarks/prune.md) 0.1 held SDS(SparseGPT) back.
    l1: float = 0.01
    l2: float = 0.01
    redense: OptimConfig = field(default_factory=OptimConfig)
    # adjustment lr 0.05: on SmolLM2 (smoke) ppl 58.2 against 91.2 with 0.01 (docs/prune.md)
    adjust: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.05))
    # skip the adjustment when the re-pruned model already beats one-shot on calibration NLL
    # (the paper's shortcut for >3B models; misfires on small calibration sets, see docs/prune.md)
    early_exit: bool = False
    keep_oneshot_if_better: bool = True  # never end a layer worse than its one-shot weights

    def __post_init__(self) -> None:
        _one_of("prune.sds.inputs", self.inputs, ("pruned", "dense"))
        for key in ("l1", "l2"):
            if getattr(self, key) < 0:
                raise PlmtoolError(f"prune.sds.{key}={getattr(self, key)}: must be non-negative")
        self.redense.validate("prune.sds.redense")
        self.adjust.validate("prune.sds.adjust")


@dataclass
class PruneConfig:
    """One-shot pruning (method, pattern), the block walk that calibrates it, SparseGPT's knobs,
    SDS, and what the command runs and saves. The execution device is not a setting here: the
    math takes it as an argument (the command derives it from the loaded model)."""

    method: str = "wanda"  # magnitude | wanda | sparsegpt
    pattern: str = "2:4"  # N:M (keep N of every M) or "unstructured"
    sparsity: float = 0.5  # used by "unstructured"; N:M implies 1 - N/M
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    # --- the block walk (plmtool.prune.sequential)
    propagate: str = "pruned"  # pruned | dense: what the next block sees during one-shot pruning
    # calibration samples per block call. Same math for any value, but another summation order:
    # 1 is the references' loop (on the CPU it gave their Wanda masks bit for bit); with more,
    # near-ties can flip and the flips propagate to later blocks (docs/prune.md, Wanda)
    batch_size: int = 8
    activations: str = "auto"  # auto | device | cpu: where calibration activations live
    exclude: list[str] = field(default_factory=list)  # linear names (substrings) left dense
    # --- SparseGPT (plmtool.prune.sparsegpt)
    blocksize: int = 128  # column block
    percdamp: float = 0.01  # damping (fraction of mean diag H)
    cuda_graphs: bool = True  # replay each column block's loop as a CUDA graph (GPU)
    fuse: bool = True  # prune layers sharing an input (q/k/v, gate/up) in one run (same result)
    sds: SdsConfig = field(default_factory=SdsConfig)
    # --- the command's output
    save_model: bool = True  # final model as a Hugging Face checkpoint in <run_dir>/model
    histogram_bins: int = 200

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PlmtoolError(f"prune.method={self.method}: unknown method (choose from {', '.join(METHODS)})")
        if not (0.0 < float(self.sparsity) < 1.0):
            raise PlmtoolError(f"prune.sparsity={self.sparsity}: must lie strictly between 0 and 1")
        parse_pattern(self.pattern, self.sparsity)  # raises on a bad pattern
        if not self.stages:
            raise PlmtoolError(f"prune.stages is empty (choose from {', '.join(STAGES)})")
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise PlmtoolError(f"prune.stages: unknown stage(s) {unknown} (choose from {', '.join(STAGES)})")
        _one_of("prune.propagate", self.propagate, ("pruned", "dense"))
        _one_of("prune.activations", self.activations, ("auto", "device", "cpu"))
        for key in ("batch_size", "blocksize"):
            if getattr(self, key) < 1:
                raise PlmtoolError(f"prune.{key}={getattr(self, key)}: must be at least 1")
        if not self.percdamp > 0:
            raise PlmtoolError(f"prune.percdamp={self.percdamp}: must be positive")

    @property
    def parsed_pattern(self) -> Pattern:
        return parse_pattern(self.pattern, self.sparsity)
