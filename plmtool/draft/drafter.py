"""Making drafters for a target: build one from its config, save and load checkpoints.

The interface the drafters implement is `interface.py`; Medusa and Amphista are `medusa.py` and
`amphista.py`. This module picks the class for a config (`build_drafter`) and holds all of the
checkpoint I/O: a checkpoint directory holds `drafter.safetensors` and `drafter_config.json`,
which names the base model so a drafter is never silently paired with the wrong target.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from plmtool.draft.amphista import AmphistaDrafter
from plmtool.draft.config import DRAFTER_KINDS, DrafterConfig, drafter_config_from_dict
from plmtool.draft.interface import Drafter
from plmtool.draft.medusa import MedusaDrafter
from plmtool.errors import PlmtoolError

WEIGHTS_FILE = "drafter.safetensors"
CONFIG_FILE = "drafter_config.json"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- target helpers


def target_dims(model) -> dict[str, Any]:
    """What a drafter must match in its target: hidden size, vocabulary, architecture."""
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    emb = model.get_input_embeddings()
    return {
        "name_or_path": getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None),
        "hidden_size": int(text_cfg.hidden_size),
        # the embedding table may be padded beyond config.vocab_size; the lm_head rows are what count
        "vocab_size": int(model.get_output_embeddings().weight.shape[0]) if model.get_output_embeddings() is not None else int(emb.weight.shape[0]),
        "architecture": (getattr(cfg, "architectures", None) or [type(model).__name__])[0],
        "model_type": getattr(cfg, "model_type", None),
        "num_attention_heads": int(getattr(text_cfg, "num_attention_heads", 0) or 0),
        "intermediate_size": int(getattr(text_cfg, "intermediate_size", 0) or 0),
        "rms_norm_eps": float(getattr(text_cfg, "rms_norm_eps", 1e-6) or 1e-6),
    }


def target_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The target's last hidden states after the final norm ([B,T,H], what its lm_head reads),
    without computing the full-vocabulary logits."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if base is None or base is model:
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
        return out.hidden_states[-1]
    out = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


# ----------------------------------------------------------------------------- construction


def validate_drafter_config(cfg: DrafterConfig) -> None:
    """Raise PlmtoolError for values that cannot make a drafter (before any model loads)."""
    if cfg.kind not in DRAFTER_KINDS:
        raise PlmtoolError(f"draft.kind must be one of {', '.join(DRAFTER_KINDS)}, got '{cfg.kind}'")
    if cfg.num_heads < 1:
        raise PlmtoolError(f"draft.num_heads must be >= 1, got {cfg.num_heads}")
    if cfg.medusa_num_layers < 0 or cfg.head_resblocks < 0 or cfg.auto_embedding_layers < 0:
        raise PlmtoolError("draft layer counts (medusa_num_layers, head_resblocks, auto_embedding_layers) must be >= 0")
    if cfg.kind == "amphista":
        if cfg.fusion not in ("concat", "add"):
            raise PlmtoolError(f"draft.fusion must be concat or add, got '{cfg.fusion}'")
        if any(n < 0 for n in cfg.stage_layers):
            raise PlmtoolError(f"draft.stage_layers must be non-negative, got {list(cfg.stage_layers)}")
        if cfg.stage_heads is not None:
            if len(cfg.stage_heads) != len(cfg.stage_layers) or sum(cfg.stage_heads) != cfg.num_heads or any(n < 0 for n in cfg.stage_heads):
                raise PlmtoolError(
                    f"draft.stage_heads {list(cfg.stage_heads)} must have one entry per stage "
                    f"({len(cfg.stage_layers)}) summing to num_heads ({cfg.num_heads})"
                )


def build_drafter(cfg: DrafterConfig, target=None, dims: dict | None = None) -> Drafter:
    """A fresh drafter for `target` (copies lm_head / embeddings from it when the config asks)."""
    validate_drafter_config(cfg)
    if dims is None:
        if target is None:
            raise ValueError("build_drafter needs a target model or its dims")
        dims = target_dims(target)
    drafter: Drafter = (MedusaDrafter if cfg.kind == "medusa" else AmphistaDrafter)(cfg, dims)
    if target is not None:
        drafter.init_from_target(target)
    return drafter


# ----------------------------------------------------------------------------- compatibility


def check_compatible(drafter_config: dict, target_model) -> None:
    """Raise PlmtoolError when a drafter checkpoint was trained for a different base model."""
    base = drafter_config.get("base_model", drafter_config)
    dims = target_dims(target_model)
    problems = []
    if int(base.get("hidden_size", -1)) != dims["hidden_size"]:
        problems.append(f"hidden size {base.get('hidden_size')} != target's {dims['hidden_size']}")
    if int(base.get("vocab_size", -1)) != dims["vocab_size"]:
        problems.append(f"vocabulary {base.get('vocab_size')} != target's {dims['vocab_size']}")
    if problems:
        raise PlmtoolError(
            f"drafter was trained for base model '{base.get('name_or_path')}' ({base.get('architecture')}) "
            f"and does not fit this target ({dims['architecture']}): " + "; ".join(problems)
        )


# ----------------------------------------------------------------------------- checkpoint I/O


def save_drafter(drafter: Drafter, path: str | Path, base_model_info: dict) -> Path:
    """Write `drafter.safetensors` + `drafter_config.json` into `path` (atomically per file)."""
    from safetensors.torch import save_file

    from plmtool.io import atomic_write, write_json

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared storage; clone so tied tensors save as separate entries
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in drafter.state_dict().items()}
    atomic_write(path / WEIGHTS_FILE, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    base = {k: base_model_info.get(k) for k in ("name_or_path", "hidden_size", "vocab_size", "architecture", "model_type")}
    base.update({k: v for k, v in base_model_info.items() if k not in base})
    config = {
        "format_version": FORMAT_VERSION,
        "kind": drafter.cfg.kind,
        "num_heads": drafter.num_heads,
        "drafter": dataclasses.asdict(drafter.cfg),
        "dims": drafter.dims,
        "base_model": base,
        "parameters": drafter.num_parameters(),
    }
    write_json(path / CONFIG_FILE, config)
    return path


def read_drafter_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise PlmtoolError(f"drafter checkpoint {path} not found (expected a directory written by `plmtool draft train`)")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise PlmtoolError(f"{path} is not a drafter checkpoint (no {CONFIG_FILE})")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise PlmtoolError(f"{cfg_file}: invalid JSON ({e})") from e
    if config.get("kind") not in DRAFTER_KINDS:
        raise PlmtoolError(f"{cfg_file}: unknown drafter kind '{config.get('kind')}'")
    return config


def _weights(path: Path, read: bool) -> dict[str, torch.Tensor] | None:
    """The checkpoint's tensors (`read`), or only a check that the file is whole: safetensors
    compares the header with the file's size without reading any tensor, so a truncated copy is
    caught before any model loads. Either way an unreadable file is one line naming it."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = path / WEIGHTS_FILE
    if not file.is_file():
        raise PlmtoolError(f"{path}: missing {WEIGHTS_FILE}")
    try:
        if read:
            return load_file(str(file))
        with safe_open(str(file), framework="pt") as f:
            f.keys()
        return None
    except Exception as e:  # safetensors' own error type for a bad header, OSError for the file
        raise PlmtoolError(f"{file}: unreadable, truncated or corrupt ({type(e).__name__}: {e}); "
                           "copy the checkpoint again or retrain it") from e


def check_checkpoint(path: str | Path) -> dict:
    """The checkpoint's config, once its config and weights files are known to be whole (the
    tensors are not read): what commands check before loading any model."""
    config = read_drafter_config(path)
    _weights(Path(path), read=False)
    return config


def load_drafter(path: str | Path, device=None, dtype=None, target=None) -> Drafter:
    """Load a drafter checkpoint. With `target`: check it was trained for that base model, and
    place it on the target's device and dtype unless `device` / `dtype` say otherwise."""
    path = Path(path)
    config = check_checkpoint(path)
    if target is not None:
        check_compatible(config, target)
        param = next(target.parameters())
        device, dtype = device or param.device, dtype or param.dtype
    cfg = drafter_config_from_dict(config["drafter"])
    drafter = build_drafter(cfg, dims=config["dims"])
    state = _weights(path, read=True)
    try:
        missing, unexpected = drafter.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of another shape than the config makes: name the first
        lines = str(e).strip().splitlines()
        raise PlmtoolError(f"{path / WEIGHTS_FILE}: weights do not match {CONFIG_FILE} ({lines[min(1, len(lines) - 1)].strip()})") from e
    if missing or unexpected:
        raise PlmtoolError(f"{path}: weights do not match the drafter config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if device is not None or dtype is not None:
        drafter.to(device=device, dtype=dtype)
    drafter.eval()
    return drafter
