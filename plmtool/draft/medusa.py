"""Medusa heads (Cai et al., 2024): the baseline drafter.

Head k = `x + SiLU(Linear(x))` residual block(s) on the target's last hidden state, then a
vocabulary projection. The Linear starts at zero, so every head starts as the target's own lm_head
applied to h_t; heads cannot see the sampled token nor each other's guesses (which is why later
heads' accuracy collapses, and what Amphista addresses). `export_medusa` writes the layout the
original Medusa code, TGI and LoRAX read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from plmtool.draft.config import DrafterConfig
from plmtool.draft.interface import Drafter, VocabProjection


class ResBlock(nn.Module):
    """x + SiLU(Linear(x)), zero-initialised so it starts as the identity."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.linear(x))


class MedusaDrafter(Drafter):
    def __init__(self, cfg: DrafterConfig, dims: dict):
        super().__init__()
        self.cfg = cfg
        self.dims = dict(dims)
        self.num_heads = cfg.num_heads
        self.hidden_size = int(dims["hidden_size"])
        self.vocab_size = int(dims["vocab_size"])
        self.blocks = nn.ModuleList(
            nn.Sequential(*[ResBlock(self.hidden_size) for _ in range(cfg.medusa_num_layers)]) for _ in range(cfg.num_heads)
        )
        self.lm_head = VocabProjection(cfg.num_heads, self.hidden_size, self.vocab_size, cfg.share_lm_head, cfg.freeze_lm_head)

    def init_from_target(self, target) -> None:
        if self.cfg.init_lm_head_from_target:
            self.lm_head.copy_from(target.get_output_embeddings().weight)

    def features(self, hidden: torch.Tensor, next_tokens: torch.Tensor | None = None) -> list[torch.Tensor]:
        return [hidden]  # next_tokens is ignored: Medusa heads read only h_t

    def heads_from_features(self, features: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([block(features[0]) for block in self.blocks], dim=-2)

    def project(self, states: torch.Tensor, head: int | None = None) -> torch.Tensor:
        return self.lm_head(states, head)


def export_medusa(drafter: MedusaDrafter, path: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write `medusa_lm_head.safetensors` + `config.json` in Medusa's original layout.

    Keys: `{i}.{j}.linear.weight|bias` for residual block j of head i and `{i}.{n}.weight` for its
    vocabulary projection (n = medusa_num_layers); config: medusa_num_heads, medusa_num_layers,
    base_model_name_or_path, hidden_size, vocab_size. A shared projection is written once per head.
    """
    from safetensors.torch import save_file

    from plmtool.io import atomic_write, write_json

    if not isinstance(drafter, MedusaDrafter):
        raise TypeError("export_medusa needs a Medusa drafter")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    n = drafter.cfg.medusa_num_layers
    state: dict[str, torch.Tensor] = {}
    for i, block in enumerate(drafter.blocks):
        for j, res in enumerate(block):
            state[f"{i}.{j}.linear.weight"] = res.linear.weight.detach().cpu().clone().contiguous()
            state[f"{i}.{j}.linear.bias"] = res.linear.bias.detach().cpu().clone().contiguous()
        w = drafter.lm_head.weight[0 if drafter.lm_head.shared else i]
        state[f"{i}.{n}.weight"] = w.detach().cpu().clone().contiguous()
    atomic_write(path / "medusa_lm_head.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    base = base_model_name_or_path or drafter.dims.get("name_or_path")
    write_json(
        path / "config.json",
        {
            "medusa_num_heads": drafter.num_heads,
            "medusa_num_layers": n,
            "base_model_name_or_path": base,
            "hidden_size": drafter.hidden_size,
            "vocab_size": drafter.vocab_size,
            "architectures": ["MedusaModel"],
        },
    )
    return path


def load_medusa_export(path: str | Path, dims: dict | None = None) -> MedusaDrafter:
    """Read a Medusa-layout export back (round trip check, or heads trained elsewhere)."""
    from safetensors.torch import load_file

    path = Path(path)
    conf = json.loads((path / "config.json").read_text())
    state = load_file(str(path / "medusa_lm_head.safetensors"))
    k, n = int(conf["medusa_num_heads"]), int(conf["medusa_num_layers"])
    vocab, hidden = state[f"0.{n}.weight"].shape
    dims = dict(dims or {"name_or_path": conf.get("base_model_name_or_path"), "hidden_size": hidden, "vocab_size": vocab})
    drafter = MedusaDrafter(DrafterConfig(kind="medusa", num_heads=k, medusa_num_layers=n, share_lm_head=False), dims)
    with torch.no_grad():
        for i, block in enumerate(drafter.blocks):
            for j, res in enumerate(block):
                res.linear.weight.copy_(state[f"{i}.{j}.linear.weight"])
                res.linear.bias.copy_(state[f"{i}.{j}.linear.bias"])
            drafter.lm_head.weight[i].copy_(state[f"{i}.{n}.weight"])
    return drafter
