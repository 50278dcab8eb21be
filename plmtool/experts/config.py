"""Config schemas of `plmtool experts redistribute` and `plmtool experts train`.

The method dataclasses are plain (no hydra import) so that scripts on machines without hydra can
build them; the app schemas are registered in Hydra's ConfigStore only when hydra is present.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from plmtool.train_config import TrainerConfig


@dataclass
class DensityConfig:
    method: str = "dbscan"  # dbscan (adaptive DBSCAN modes + k-NN radius) | knn (k-NN radius only)
    k: int = 10  # neighbours for the k-NN radius; DBSCAN min_samples
    quantile: float = 0.5  # eps of a cluster = this quantile of its k-NN radii
    ref_size: int = 2048  # reference points per cluster for k-NN / DBSCAN


@dataclass
class RedistributeConfig:
    # instruction data: sharegpt | commonsense (both embedded) | .jsonl (instruction/input/output[/task]
    # or messages) | .json list
    data: str = "sharegpt"
    # first N usable samples (None = all); of `commonsense`, a seeded sample of N with every task's
    # share of the pool (each task at least task_floor)
    limit: Optional[int] = None
    turns: str = "first"  # first: first user->assistant exchange; all: whole conversation
    heldout: float = 0.05  # fraction kept apart for evaluation (never clustered or trained on)
    # embeddings
    embedder: str = "model"  # model (mean-pooled hidden states) | minilm | sentence-transformers path
    embed_layer: int = -1
    embed_max_len: int = 256
    embed_batch_size: int = 16
    cache_dir: Optional[str] = None  # embedding cache; default <plmtool cache>/experts/embeddings
    # clustering
    k: Optional[int] = 8  # null: choose K in [k_min, k_max] by k_criterion
    k_min: int = 2
    k_max: int = 12
    k_criterion: str = "silhouette"  # silhouette | calinski_harabasz
    kmeans_n_init: int = 3
    kmeans_fit_size: Optional[int] = 20000  # fit centroids on a seeded subsample of this size (null = all)
    density: DensityConfig = field(default_factory=DensityConfig)
    # redistribution
    budget: float = 0.1  # fraction of the (non-held-out) samples selected
    floor: int = 8  # minimum samples per cluster (capped at its size; >= 1)
    # task-labelled pools: minimum selected samples per task (a task with fewer in the pool is an error)
    task_floor: int = 8
    # independent 10% selections (redistributed, random, task-balanced random) drawn with seeds
    # seed, seed+1, ...: the 10% units are trained and evaluated once per replicate
    replicates: int = 1
    alpha: float = 0.5  # cluster quota ~ size**alpha
    beta: float = 1.0  # weight ~ (k-NN radius / median)**beta: sparse neighbourhoods favoured
    mode_alpha: float = 0.5  # weight ~ (DBSCAN mode size)**-mode_alpha: dense modes thinned
    tail_boost: float = 2.0  # extra weight of DBSCAN noise points (the long tail)
    need: str = "loss"  # none | loss | ifd: the model's need for a sample
    gamma: float = 1.0  # weight ~ (need / mean need)**gamma
    # tokenization for the need signal (and recorded for training)
    max_len: int = 512
    max_prompt_len: int = 256
    batch_size: int = 8
    plot: bool = True
    plot_points: int = 20000


@dataclass
class LoraOptions:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])


@dataclass
class TrainExpertsConfig:
    redistribution: Optional[str] = None  # run dir of `plmtool experts redistribute`
    mode: str = "all"  # all: train what is missing + evaluate | assemble: evaluate trained adapters | generate
    expert_index: Optional[int] = None  # train only this expert (one job of a multirun / Slurm array)
    baseline: Optional[str] = None  # train only this baseline (full | random | redistributed)
    # full | random | random_balanced (a task-labelled pool; left out, and said so, for others) | redistributed
    baselines: list[str] = field(default_factory=lambda: ["full", "random", "random_balanced", "redistributed"])
    # what each expert trains on: redistributed (its cluster's share of the redistributed subset) |
    # cluster (every pool sample of its cluster: all experts together see the pool, as `full` does) |
    # both kinds, side by side
    expert_data: str = "redistributed"
    # experts that share the redistributed LoRA (frozen) and each add a small LoRA of their own,
    # trained on the cluster's share of the redistributed subset (units shared_<k>)
    shared_experts: bool = False
    shared_r: int = 4  # rank of each expert's own part
    # multiple-choice accuracy per task: null = the embedded tasks' evaluation splits when the pool is
    # `commonsense`, none otherwise | commonsense | a .jsonl(.gz) of {task, contexts, continuations, gold}
    eval_data: Optional[str] = None
    eval_tasks: list[str] = field(default_factory=list)  # default: every task of the pool with evaluation data
    eval_limit: Optional[int] = None  # a seeded sample of N documents per task (None = all)
    adapters_dir: Optional[str] = None  # default <redistribution>/adapters (shared by array jobs)
    lora: LoraOptions = field(default_factory=LoraOptions)
    max_prompt_len: Optional[int] = None  # default: the redistribution's
    eval_batch_size: int = 8
    oracle: bool = True  # evaluate every expert on every held-out sample (K passes)
    top_k: int = 1  # >1: routed loss also for a top-k blend of experts
    temperature: float = 0.05  # softmax temperature of the top-k blend weights (over cosine)
    prompt: Optional[str] = None  # generate mode: route this prompt and answer it
    max_new_tokens: int = 128
    gen_temperature: float = 0.0
    lm_eval_tasks: list[str] = field(default_factory=list)  # optional, routed per example
    lm_eval_include_path: Optional[str] = None
    lm_eval_limit: Optional[int] = None


@dataclass
class ExpertsTrainerConfig(TrainerConfig):
    """`trainer.*` of `experts train`: every baseline and expert trains for `epochs` passes over its
    own data (the same budget per sample); `max_steps` is only a safety cap."""

    lr: float = 2e-4
    max_steps: int = 1_000_000
    epochs: int = 1
    max_seq_len: int = 512  # tokens per training / held-out sequence


try:
    from plmtool.config import ModelConfig, register
except ImportError:  # no hydra here (e.g. a bare GPU box running a benchmark script)
    register = None  # type: ignore[assignment]

if register is not None:

    @dataclass
    class ExpertsRedistributeApp:
        model: ModelConfig = field(default_factory=ModelConfig)
        experts: RedistributeConfig = field(default_factory=RedistributeConfig)
        seed: int = 0

    @dataclass
    class ExpertsTrainApp:
        model: ModelConfig = field(default_factory=ModelConfig)
        experts: TrainExpertsConfig = field(default_factory=TrainExpertsConfig)
        trainer: ExpertsTrainerConfig = field(default_factory=ExpertsTrainerConfig)
        seed: int = 0

    register("experts_redistribute_schema", ExpertsRedistributeApp)
    register("experts_train_schema", ExpertsTrainApp)
