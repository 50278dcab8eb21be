"""Routed experts over one model: route by prompt embedding, evaluate and generate.

`RoutedExperts` holds a PeftModel carrying one adapter per expert (named expert_<k>, or
expert_<k>_cluster for experts trained on their whole cluster), the router, and the embedder
used at redistribution time. Embeddings are always taken from the base model (adapters
disabled), exactly as they were when the centroids were computed.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Sequence

import numpy as np
import torch

from plmtool.errors import PlmtoolError
from plmtool.experts.embed import ModelEmbedder
from plmtool.experts.losses import token_logprobs
from plmtool.experts.lora import BASE
from plmtool.experts.router import Router
from plmtool.experts.tokenize import encode_prompt


# what each expert trains on: cluster k's share of the redistributed subset, or every pool sample of cluster k
EXPERT_DATA = ("redistributed", "cluster")


def of_kind(name: str, expert_data: str) -> str:
    """`name` for the default experts, `name_<expert_data>` for the other kind (experts, their
    routed and oracle results): both kinds live side by side and are never mixed up."""
    return name if expert_data == "redistributed" else f"{name}_{expert_data}"


def expert_name(k: int, expert_data: str = "redistributed") -> str:
    """The adapter of cluster k's expert (`of_kind`: experts trained on whole clusters have names of
    their own, so a run never picks up the other kind from a shared adapters dir)."""
    return of_kind(f"expert_{k}", expert_data)


def replica(name: str, r: int) -> str:
    """The name of unit `name` in replicate r (replicate 0 keeps the plain name)."""
    return name if r == 0 else f"{name}_r{r}"


def base_name(unit: str) -> tuple[str, int]:
    """(name without the replicate suffix, replicate)."""
    m = re.fullmatch(r"(.+)_r(\d+)", unit)
    return (m.group(1), int(m.group(2))) if m else (unit, 0)


def routed_result(unit: str) -> str:
    """The routed result an expert unit belongs to: routed, routed_cluster or routed_shared (+ replicate)."""
    name, r = base_name(unit)
    group = "routed_shared" if name.startswith("shared_") else "routed_cluster" if name.endswith("_cluster") else "routed"
    return replica(group, r)


def check_expert_data(value: str, option: str = "expert_data") -> None:
    if value not in EXPERT_DATA:
        raise PlmtoolError(f"unknown {option} '{value}' (choose from {', '.join(EXPERT_DATA)})")


class RoutedExperts:
    def __init__(self, model, tokenizer, router: Router, embedder, expert_names: Sequence[str] | None = None):
        self.model, self.tokenizer, self.router, self.embedder = model, tokenizer, router, embedder
        self.names = list(expert_names or [expert_name(k) for k in range(router.k)])

    def _base_context(self):
        # the model embedder must see the base model, as at clustering time
        if isinstance(self.embedder, ModelEmbedder) and hasattr(self.model, "disable_adapter"):
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    def embed(self, prompts: Sequence[str]) -> np.ndarray:
        with self._base_context():
            return self.embedder.embed(list(prompts))

    def route(self, prompts: Sequence[str]) -> np.ndarray:
        return self.router.route(self.embed(prompts))

    def token_logprobs(self, encoded: Sequence[dict[str, Any]], routes: np.ndarray, pad_id: int, batch_size: int = 8,
                       blend: tuple[np.ndarray, np.ndarray] | None = None, autocast: bool = False) -> list[np.ndarray]:
        """Per-token log-probs under the routed experts; with `blend=(idx, w)`, the mixture
        sum_j w_j p_j of the top-k experts' distributions (evaluated at the target tokens)."""
        if blend is None:
            names = [self.names[int(r)] for r in routes]
            return token_logprobs(self.model, encoded, pad_id, batch_size, names, "routed loss", autocast)
        idx, w = blend
        per_rank = []
        for r in range(idx.shape[1]):
            names = [self.names[int(i)] for i in idx[:, r]]
            per_rank.append(token_logprobs(self.model, encoded, pad_id, batch_size, names, f"blend rank {r}", autocast))
        out = []
        for s in range(len(encoded)):
            stacked = np.stack([per_rank[r][s] for r in range(idx.shape[1])])  # [k, T]
            logw = np.log(np.maximum(w[s], 1e-30))[:, None]
            out.append(np.logaddexp.reduce(stacked + logw, axis=0))
        return out

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, max_prompt_len: int | None = None,
                 expert: int | None = None) -> dict[str, Any]:
        """Route one prompt (top-1) and generate with that expert; `expert` forces a choice."""
        scores = self.router.scores(self.embed([prompt]))[0]
        k = int(np.argmax(scores)) if expert is None else int(expert)
        ids = torch.tensor([encode_prompt(self.tokenizer, prompt, max_prompt_len)], device=next(self.model.parameters()).device)
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id}
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature)
        else:
            kwargs.update(do_sample=False)
        self.model.set_adapter(self.names[k])
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        text = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        return {"prompt": prompt, "expert": k, "adapter": self.names[k], "scores": [float(s) for s in scores], "response": text}


def load_routed(redistribution: str, model_cfg: Any, adapters_dir: str | None = None,
                expert_data: str = "redistributed") -> RoutedExperts:
    """Python entry point: the model of `model_cfg` with every trained expert and the router.

        experts = load_routed("outputs/experts/<run>", SimpleNamespace(name_or_path="smollm2-135m", dtype="float32"))
        experts.generate("Write a haiku about rain")

    `expert_data="cluster"` loads the experts trained on whole clusters instead.
    """
    from pathlib import Path

    from plmtool.experts.embed import make_embedder
    from plmtool.experts.lora import load_adapter
    from plmtool.experts.run_redistribute import load_meta
    from plmtool.models import load_model

    check_expert_data(expert_data)
    d, meta = load_meta(redistribution)
    model, tok = load_model(model_cfg)
    adapters = Path(adapters_dir).expanduser() if adapters_dir else d / "adapters"
    names = [expert_name(k, expert_data) for k in range(int(meta["k"]))]
    for n in names:
        model = load_adapter(model, n, adapters / n)
    embedder = make_embedder(meta["embedder"], model, tok, model_id=str(model_cfg.name_or_path),
                             layer=meta.get("embed_layer", -1), max_len=meta.get("embed_max_len", 256))
    return RoutedExperts(model, tok, Router.load(d / "centroids.npy"), embedder, names)


__all__ = ["EXPERT_DATA", "RoutedExperts", "check_expert_data", "expert_name", "load_routed", "of_kind", "BASE"]
