"""Drafting heads: shapes, causality, incremental == full-sequence, ablations, checkpoints, export."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from plmtool.draft.amphista import AmphistaDrafter
from plmtool.draft.config import DrafterConfig
from plmtool.draft.drafter import (build_drafter, check_checkpoint, check_compatible, load_drafter, read_drafter_config, save_drafter,
                                   target_dims, target_hidden)
from plmtool.draft.medusa import MedusaDrafter, export_medusa, load_medusa_export
from plmtool.errors import PlmtoolError
from tests.conftest import build_tiny_llama, one_thread

VOCAB = 96


_single_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="module")
def target():
    return build_tiny_llama(VOCAB)


def perturbed(drafter, scale=0.2, seed=1):
    """Random values in the zero-initialised branches, so equality tests exercise every path."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in drafter.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return drafter.eval()


def inputs(target, b=2, t=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, t), generator=g)
    with torch.no_grad():
        return target_hidden(target, ids), ids


def test_target_hidden_is_what_lm_head_reads(target):
    hidden, ids = inputs(target)
    with torch.no_grad():
        assert torch.allclose(target.lm_head(hidden), target(ids).logits, atol=1e-5)


@pytest.mark.parametrize("kind", ["medusa", "amphista"])
def test_untrained_heads_start_from_the_target_lm_head(target, kind):
    # zero-initialised residual branches: every head starts as lm_head(h_t)
    d = build_drafter(DrafterConfig(kind=kind, num_heads=3), target).eval()
    hidden, ids = inputs(target)
    with torch.no_grad():
        out = d(hidden, ids)
        ref = target.lm_head(hidden)
    assert out.shape == (2, 11, 3, VOCAB)
    for k in range(3):
        assert torch.allclose(out[:, :, k], ref, atol=1e-4)


ABLATIONS = {
    "full": {},
    "no_stages": {"use_staged_adaptation": False},
    "no_auto_embedding": {"use_auto_embedding": False},
    "no_token_embedding": {"use_token_embedding": False},
    "add_fusion": {"fusion": "add"},
    "no_positions": {"use_position_embedding": False},
    "per_head_lm": {"share_lm_head": False},
    "three_stages": {"stage_layers": [1, 2, 1], "stage_heads": [1, 1, 2], "num_heads": 4},
    "final_norm": {"final_norm": True, "head_resblocks": 2},
}


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_amphista_step_equals_forward(target, name):
    cfg = DrafterConfig(kind="amphista", **{"num_heads": 3, **ABLATIONS[name]})
    d = perturbed(build_drafter(cfg, target))
    hidden, ids = inputs(target, t=13)
    with torch.no_grad():
        full = d(hidden, ids)
        cache = d.new_cache(2, 32)
        pos = 0
        for n in (4, 1, 3, 2, 3):  # accepted chunks of different lengths
            out = d.step(hidden[:, pos : pos + n], ids[:, pos : pos + n], cache)
            pos += n
            assert torch.allclose(out, full[:, pos - 1], atol=1e-4), (name, pos)
        # rejected tokens are dropped by cropping; re-feeding the accepted path reproduces forward
        d.crop_cache(cache, 6)
        out = d.step(hidden[:, 6:10], ids[:, 6:10], cache)
        assert torch.allclose(out, full[:, 9], atol=1e-4)


def test_amphista_is_causal_and_uses_next_tokens(target):
    d = perturbed(build_drafter(DrafterConfig(kind="amphista", num_heads=3), target))
    hidden, ids = inputs(target, t=10)
    with torch.no_grad():
        base = d(hidden, ids)
        hidden2, ids2 = hidden.clone(), ids.clone()
        hidden2[:, 6:] += 1.0
        ids2[:, 6:] = (ids2[:, 6:] + 1) % VOCAB
        changed = d(hidden2, ids2)
        assert torch.allclose(base[:, :6], changed[:, :6], atol=1e-5)  # the future is invisible
        assert not torch.allclose(base[:, 6:], changed[:, 6:], atol=1e-3)
        ids3 = ids.clone()
        ids3[:, 3] = (ids3[:, 3] + 7) % VOCAB  # the sampled token feeds the drafter
        assert not torch.allclose(d(hidden, ids3)[:, 3], base[:, 3], atol=1e-4)


def test_ablation_switches_remove_components(target):
    full = build_drafter(DrafterConfig(kind="amphista", num_heads=4), target)
    assert len(full.stages) == 2 and len(full.auto_embedding) == 1 and full.embed is not None and full.position is not None
    assert full.head_stage == [1, 1, 2, 2]
    off = build_drafter(DrafterConfig(kind="amphista", num_heads=4, use_staged_adaptation=False, use_auto_embedding=False,
                                      use_token_embedding=False, use_position_embedding=False), target)
    assert len(off.stages) == 0 and len(off.auto_embedding) == 0 and off.embed is None and off.position is None
    assert off.new_cache(1, 8).layers == [] and off.num_parameters() < full.num_parameters()
    # the auto-embedding block mixes heads: changing one head's input changes the others' output
    d = perturbed(build_drafter(DrafterConfig(kind="amphista", num_heads=3, use_staged_adaptation=False), target))
    hidden, ids = inputs(target)
    states = torch.stack([blk(hidden) for blk in d.head_blocks], -2)
    with torch.no_grad():
        a = d.heads_from_features([hidden])
        d.head_blocks[2][0].linear.bias.add_(1.0)
        b = d.heads_from_features([hidden])
    assert states.shape[-2] == 3
    assert not torch.allclose(a[..., 0, :], b[..., 0, :], atol=1e-4)
    # without it, heads are independent
    d2 = perturbed(build_drafter(DrafterConfig(kind="amphista", num_heads=3, use_staged_adaptation=False, use_auto_embedding=False), target))
    with torch.no_grad():
        a = d2.heads_from_features([hidden])
        d2.head_blocks[2][0].linear.bias.add_(1.0)
        b = d2.heads_from_features([hidden])
    assert torch.allclose(a[..., 0, :], b[..., 0, :]) and not torch.allclose(a[..., 2, :], b[..., 2, :])


def test_medusa_ignores_next_tokens_and_steps_statelessly(target):
    d = perturbed(build_drafter(DrafterConfig(kind="medusa", num_heads=3, medusa_num_layers=2), target))
    hidden, ids = inputs(target)
    with torch.no_grad():
        full = d(hidden, ids)
        assert torch.equal(full, d(hidden, torch.zeros_like(ids)))
        assert d.new_cache(2, 16) is None
        assert torch.allclose(d.step(hidden[:, :5], ids[:, :5], None), full[:, 4], atol=1e-6)


@pytest.mark.parametrize("kind", ["medusa", "amphista"])
def test_save_load_round_trip(tmp_path, target, kind):
    d = perturbed(build_drafter(DrafterConfig(kind=kind, num_heads=2, share_lm_head=False), target))
    save_drafter(d, tmp_path / "ckpt", target_dims(target))
    conf = json.loads((tmp_path / "ckpt" / "drafter_config.json").read_text())
    assert conf["kind"] == kind and conf["base_model"]["hidden_size"] == 32 and conf["base_model"]["vocab_size"] == VOCAB
    loaded = load_drafter(tmp_path / "ckpt", target=target)
    assert dataclasses.asdict(loaded.cfg) == dataclasses.asdict(d.cfg)
    hidden, ids = inputs(target)
    with torch.no_grad():
        assert torch.equal(loaded(hidden, ids), d(hidden, ids))


def test_drafter_for_another_base_model_is_a_clear_error(tmp_path, target):
    d = build_drafter(DrafterConfig(kind="amphista", num_heads=2), target)
    save_drafter(d, tmp_path / "ckpt", {**target_dims(target), "name_or_path": "tiny-a"})
    other_hidden = build_tiny_llama(VOCAB, hidden_size=48)
    with pytest.raises(PlmtoolError, match="hidden size 32 != target's 48"):
        load_drafter(tmp_path / "ckpt", target=other_hidden)
    other_vocab = build_tiny_llama(VOCAB + 8)
    with pytest.raises(PlmtoolError, match="vocabulary"):
        check_compatible(read_drafter_config(tmp_path / "ckpt"), other_vocab)
    with pytest.raises(PlmtoolError, match="not a drafter checkpoint"):
        load_drafter(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "one_byte_short", "empty", "garbage"])
def test_a_truncated_or_corrupt_weights_file_is_one_line_naming_it(tmp_path, target, damage):
    """A checkpoint copied halfway (or overwritten) fails with one line naming the weights file,
    both where commands check it before loading any model and where it is loaded."""
    save_drafter(build_drafter(DrafterConfig(kind="amphista", num_heads=2), target), tmp_path / "ckpt", target_dims(target))
    weights = tmp_path / "ckpt" / "drafter.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "one_byte_short": data[:-1], "empty": b"",
                         "garbage": b"\x07" * 64}[damage])
    for read in (check_checkpoint, lambda path: load_drafter(path, target=target)):
        with pytest.raises(PlmtoolError) as e:
            read(tmp_path / "ckpt")
        message = str(e.value)
        assert message.startswith(f"{weights}: ") and "truncated or corrupt" in message and "\n" not in message


def test_weights_of_another_shape_are_one_line_naming_the_file(tmp_path, target):
    save_drafter(build_drafter(DrafterConfig(kind="medusa", num_heads=2, share_lm_head=False), target), tmp_path / "a",
                 target_dims(target))
    save_drafter(build_drafter(DrafterConfig(kind="medusa", num_heads=2, share_lm_head=True), target), tmp_path / "b",
                 target_dims(target))
    (tmp_path / "a" / "drafter.safetensors").write_bytes((tmp_path / "b" / "drafter.safetensors").read_bytes())
    with pytest.raises(PlmtoolError) as e:
        load_drafter(tmp_path / "a")
    assert str(e.value).startswith(f"{tmp_path / 'a' / 'drafter.safetensors'}: weights do not match") and "\n" not in str(e.value)


def test_bad_drafter_config_is_a_clear_error(target):
    with pytest.raises(PlmtoolError, match="draft.kind"):
        build_drafter(DrafterConfig(kind="eagle"), target)
    with pytest.raises(PlmtoolError, match="stage_heads"):
        build_drafter(DrafterConfig(kind="amphista", num_heads=4, stage_heads=[1, 1]), target)


def test_medusa_export_layout_round_trips(tmp_path, target):
    d = perturbed(build_drafter(DrafterConfig(kind="medusa", num_heads=3, medusa_num_layers=2, share_lm_head=True), target))
    export_medusa(d, tmp_path / "medusa", base_model_name_or_path="tiny")
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "medusa" / "medusa_lm_head.safetensors")))
    expected = {f"{i}.{j}.linear.{w}" for i in range(3) for j in range(2) for w in ("weight", "bias")} | {f"{i}.2.weight" for i in range(3)}
    assert keys == expected
    conf = json.loads((tmp_path / "medusa" / "config.json").read_text())
    assert conf["medusa_num_heads"] == 3 and conf["medusa_num_layers"] == 2 and conf["base_model_name_or_path"] == "tiny"
    back = load_medusa_export(tmp_path / "medusa")
    hidden, ids = inputs(target)
    with torch.no_grad():
        assert torch.allclose(back(hidden, ids), d(hidden, ids), atol=1e-6)


def test_amphista_cache_overflow_is_an_error(target):
    d = build_drafter(DrafterConfig(kind="amphista", num_heads=2), target)
    hidden, ids = inputs(target, t=6)
    cache = d.new_cache(2, 4)
    with pytest.raises(ValueError, match="cache full"):
        d.step(hidden, ids, cache)
    assert isinstance(d, AmphistaDrafter) and not isinstance(d, MedusaDrafter)


def test_amphista_step_reads_nothing_back_from_the_device(target):
    """A steady-state step, the static step and cropping never read a device value on the host
    (no .item()/int()/tolist()/nonzero/host->device tensor), so they run without syncs on a GPU."""
    from tests.draft.host_sync_recorder import HostSyncRecorder, self_check

    self_check()
    d = perturbed(build_drafter(DrafterConfig(kind="amphista", num_heads=3), target))
    hidden, ids = inputs(target, t=12)
    with torch.no_grad():
        cache = d.new_cache(2, 32)
        d.step(hidden[:, :4], ids[:, :4], cache)
        count = torch.tensor(2)
        with HostSyncRecorder() as rec:
            d.step(hidden[:, 4:7], ids[:, 4:7], cache)
            d.crop_cache(cache, 6)
            d.step(hidden[:, 6:7], ids[:, 6:7], cache)
            d.step_static(hidden[:, 7:10], ids[:, 7:10], count, cache)
    assert sum(rec.counts.values()) == 0, dict(rec.counts)


@pytest.mark.parametrize("name", ["full", "three_stages", "no_stages", "per_head_lm"])
def test_amphista_static_step_equals_forward(target, name):
    """Fixed-shape step: N=4 rows holding `count` accepted positions then garbage padding; mixed
    with the eager step (host length kept by the caller) it reproduces forward()."""
    cfg = DrafterConfig(kind="amphista", **{"num_heads": 3, **ABLATIONS[name]})
    d = perturbed(build_drafter(cfg, target))
    hidden, ids = inputs(target, t=13)
    g = torch.Generator().manual_seed(5)
    N = 4
    with torch.no_grad():
        full = d(hidden, ids)
        cache = d.new_cache(2, 32)
        pos = 0
        for n, static in ((3, True), (1, True), (2, False), (4, True), (3, True)):
            if static:
                h = torch.randn(2, N, hidden.shape[-1], generator=g) * 5
                t = torch.randint(0, VOCAB, (2, N), generator=g)
                h[:, :n], t[:, :n] = hidden[:, pos : pos + n], ids[:, pos : pos + n]
                out = d.step_static(h, t, torch.tensor(n), cache)
                if cache is not None:
                    cache.length += n
            else:
                out = d.step(hidden[:, pos : pos + n], ids[:, pos : pos + n], cache)
            pos += n
            assert torch.allclose(out, full[:, pos - 1], atol=1e-4), (name, pos)
