"""Model and tokenizer loading: hub ids, local checkpoints, GGUF files and the embedded default."""

from plmtool.models.loader import load_model, load_tokenizer, resolve_model_source

__all__ = ["load_model", "load_tokenizer", "resolve_model_source"]
