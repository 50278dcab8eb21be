"""Hydra schema of `plmtool prune sds`, registered as "prune_sds_schema": the shared model / data /
eval groups and the `prune` group (plmtool.prune.config.PruneConfig)."""

from __future__ import annotations

from dataclasses import dataclass, field

from plmtool.config import DataConfig, EvalConfig, ModelConfig, register
from plmtool.prune.config import PruneConfig


@dataclass
class PruneSdsApp:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    seed: int = 0


register("prune_sds_schema", PruneSdsApp)
