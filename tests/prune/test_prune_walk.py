"""Block walking: captured block inputs reproduce the full model, across model families."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from plmtool.prune.config import PruneConfig
from plmtool.prune.oneshot import prune_model
from plmtool.prune.patterns import parse_pattern, verify
from plmtool.prune.sequential import block_linears, decoder_layers, walk
from tests.conftest import build_tiny_llama


def _llama():
    return build_tiny_llama(128, hidden_size=64, num_hidden_layers=3, max_position_embeddings=128)


def _qwen3():
    return build_tiny_llama(128, family="qwen3", hidden_size=64, num_hidden_layers=3, max_position_embeddings=128)


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128, sliding_window=8))


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                    max_position_embeddings=128, word_embed_proj_dim=64))


FAMILIES = {"llama": _llama, "qwen3": _qwen3, "mistral": _mistral, "opt": _opt}


def _full_model_norms(model, ids):
    """Wanda's statistic of every block linear, from plain forwards of the whole model."""
    acc: dict[str, torch.Tensor] = {}
    hooks = []
    for i, block in enumerate(decoder_layers(model)):
        for name, lin in block_linears(block).items():
            key = f"{i}.{name}"

            def hook(mod, args, key=key):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                acc[key] = acc.get(key, 0) + (x**2).sum(0)

            hooks.append(lin.register_forward_pre_hook(hook))
    with torch.no_grad():
        for row in ids:
            model(input_ids=row[None], use_cache=False)
    for h in hooks:
        h.remove()
    return {k: v / ids.shape[0] for k, v in acc.items()}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("batch_size", [1, 3])
def test_walk_statistics_match_full_model(family, batch_size):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    ids = torch.randint(0, 128, (3, 24))
    expected = _full_model_norms(model, ids)
    got: dict[str, torch.Tensor] = {}

    def process(i, block, linears, stats):
        for name in linears:
            got[f"{i}.{name}"] = stats[name].sq_norm.clone()

    walk(model, ids, process, stats="norms", opts=PruneConfig(batch_size=batch_size, propagate="dense"))
    assert set(got) == set(expected)
    for k in expected:
        assert torch.allclose(got[k], expected[k], rtol=1e-4, atol=1e-5), k


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_pruned_propagation_feeds_next_block(family, method):
    """With propagate=pruned, block i+1's statistics equal those of the model whose blocks <= i
    are already pruned: checked by re-running the full pruned model."""
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    ids = torch.randint(0, 128, (2, 16))
    opts = PruneConfig(method=method, pattern="2:4", propagate="pruned", batch_size=1)
    pattern = parse_pattern("2:4")
    seen: dict[str, torch.Tensor] = {}
    prune_model(model, ids, opts)
    for block in decoder_layers(model):
        for name, lin in block_linears(block).items():
            assert verify(lin.weight, pattern) is None, name
    # the last block's input statistics in the walk == those from the final pruned model
    last = len(decoder_layers(model)) - 1

    def process(i, block, linears, stats):
        if i == last:
            for name in linears:
                seen[name] = stats[name].sq_norm.clone()

    walk(model, ids, process, stats="norms", opts=opts)
    full = _full_model_norms(model, ids)
    for name, v in seen.items():
        assert torch.allclose(v, full[f"{last}.{name}"], rtol=1e-4, atol=1e-5)


def test_offload_one_block_at_a_time_keeps_results():
    """Walking with activations forced to the CPU gives the same pruned weights."""
    a = _llama()
    b = copy.deepcopy(a)
    ids = torch.randint(0, 128, (2, 16))
    prune_model(a, ids, PruneConfig(method="wanda", pattern="4:8", batch_size=1))
    prune_model(b, ids, PruneConfig(method="wanda", pattern="4:8", activations="cpu", batch_size=2))
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na
