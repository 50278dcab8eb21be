"""Typed config schemas shared by every command.

Each primary config (`conf/<command>.yaml`) starts from a dataclass registered here (or in the
command's own schema module), so a wrong type (`data.seqlen=abc`) or an unknown key fails when
Hydra composes the config, with Hydra's own message, before anything heavy is loaded. A key added
with `+key=value` passes composition (Hydra opens the config for it); `check_known_keys` rejects it
when the run starts.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError

from plmtool.errors import PlmtoolError


@dataclass
class ModelConfig:
    # embedded alias, .gguf file, local checkpoint dir or hub id
    name_or_path: str = "smollm2-135m"
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto
    device: str = "auto"  # auto = cuda when present, else cpu
    device_map: Optional[str] = None  # e.g. "auto": accelerate places/offloads layers
    offload_folder: Optional[str] = None
    gguf_file: Optional[str] = None  # a GGUF file inside a local dir or hub repo
    revision: Optional[str] = None
    trust_remote_code: bool = False
    attn_implementation: Optional[str] = None  # sdpa | eager | flash_attention_2
    cache_dir: Optional[str] = None  # where converted GGUF checkpoints are cached


@dataclass
class DataConfig:
    # evaluation corpus: wiki_sample | news_sample | wikitext2 | c4 | path to .txt/.jsonl
    corpus: str = "wiki_sample"
    # calibration corpus (pruning); null = the calibration part of `corpus`
    calib_corpus: Optional[str] = None
    nsamples: int = 128  # calibration windows
    seqlen: int = 2048  # tokens per calibration window
    seed: int = 0
    text_field: str = "text"  # field read from local JSONL corpora
    cache_dir: Optional[str] = None


@dataclass
class EvalConfig:
    ppl: bool = True
    corpus: str = "${data.corpus}"
    seqlen: int = 2048  # perplexity window; always reported with the number
    max_tokens: Optional[int] = None  # cap on evaluated tokens (whole windows)
    batch_size: int = 1
    # lm-eval tasks by name, a preset (wanda7, sds7) or the generated task wiki_next_sentence
    zeroshot: list[str] = field(default_factory=lambda: ["wanda7"])
    zeroshot_limit: Optional[int] = None  # first N documents per task (None = all)
    zeroshot_batch_size: int = 32  # requests per forward (also capped at 16k tokens per batch)
    num_fewshot: int = 0
    include_path: Optional[str] = None  # local lm-eval task directory
    # where lm-eval's standard tasks read their data: auto = the embedded copies when no hub is
    # reachable, else the hub | local | hub
    task_source: str = "auto"
    # pre-rendered zero-shot requests (scripts/export_zeroshot_requests.py) for machines without lm-eval
    requests_file: Optional[str] = None

    offline_task_size: int = 500  # examples generated for wiki_next_sentence
    offline_task_choices: int = 4


@dataclass
class EvalApp:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    # run the 2:4 linear layers on sparse tensor cores (CUDA, fp16/bf16; plmtool.prune.semi_structured)
    semi_structured: bool = False


def check_known_keys(cfg: DictConfig) -> None:
    """Raise PlmtoolError naming the first key of the composed `cfg` that its schema lacks.

    The schema is the dataclass the config was composed from (`eval_schema`, `prune_sds_schema`,
    ...); merging the composed values into a fresh, closed instance of it applies OmegaConf's own
    rules (dataclass nodes are closed, dict-typed fields accept any key).
    """
    schema = OmegaConf.get_type(cfg)
    if not dataclasses.is_dataclass(schema):
        return
    values = OmegaConf.to_container(cfg, resolve=False)
    values.pop("hydra", None)
    closed = OmegaConf.structured(schema)
    try:
        OmegaConf.merge(closed, values)
    except ConfigKeyError as e:
        key = str(e.full_key)
        parent, _, name = key.rpartition(".")
        siblings = OmegaConf.select(closed, parent) if parent else closed
        known = list(siblings.keys()) if isinstance(siblings, DictConfig) else []
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {'.'.join(filter(None, (parent, close[0])))}?" if close else ""
        raise PlmtoolError(f"unknown config key '{key}'{hint}") from None


def register(name: str, node: Any) -> None:
    ConfigStore.instance().store(name=name, node=node)


register("eval_schema", EvalApp)
