"""The captured-program helper (plmtool/cuda_graph.py) and SparseGPT's column blocks through it."""

from __future__ import annotations

import logging

import pytest
import torch

from plmtool.cuda_graph import CapturedGraph, capture_checked, compare, tolerance
from tests.core.cuda_graph_helpers import stand_in_graphs


def test_one_tolerance_table_by_kind_and_precision():
    assert tolerance("eager", torch.float32) == 1e-4 and tolerance("eager", torch.bfloat16) == 2e-2
    assert tolerance("compiled", torch.float32) == 1e-3 and tolerance("compiled", torch.float16) == 5e-2
    assert tolerance("forward", torch.float32) == 1e-3 and tolerance("forward", torch.bfloat16) == 0.1


def test_compare_names_every_error_over_the_bar_and_rejects_nan():
    want = torch.ones(4)
    errors, problem = compare([("a", want * 1.5, want), ("b", want, want), ("c", want * float("nan"), want)], 1e-3)
    assert errors["a"] == pytest.approx(0.5) and errors["b"] == 0.0
    assert problem.startswith("a 0.5, c nan differ from eager") and "b " not in problem
    assert compare([("a", want, want)], 1e-3) == ({"a": 0.0}, None)


@pytest.mark.parametrize("failure", ["capture", "check"])
def test_a_failed_capture_or_check_falls_back_with_one_warning(caplog, failure):
    cleaned = []

    def capture():
        if failure == "capture":
            raise RuntimeError("operation not permitted when stream is capturing")
        return "graph"

    with caplog.at_level(logging.WARNING, logger="plmtool"):
        got = capture_checked("the thing", "running it eagerly", capture, check=lambda g: "logits 0.5 differ",
                              cleanup=lambda: cleaned.append(True))
    assert got is None and cleaned == [True]
    reason = "operation not permitted when stream is capturing" if failure == "capture" else "logits 0.5 differ"
    assert caplog.messages == [f"the thing disabled (RuntimeError: {reason}); running it eagerly"]
    assert capture_checked("the thing", "eagerly", lambda: "graph", check=lambda g: None) == "graph"


def test_a_captured_graph_replays_into_its_outputs_and_refuses_recreated_buffers(monkeypatch):
    stand_in_graphs(monkeypatch)
    state = {"x": torch.arange(3.0)}
    graph = CapturedGraph("doubling", lambda: state["x"] * 2, lambda: [state["x"]])
    state["x"].add_(1)  # new values in the same buffer: the replay sees them
    assert graph.replay().tolist() == [2.0, 4.0, 6.0]
    state["x"] = state["x"].clone()  # the buffer re-created: the graph would read freed memory
    with pytest.raises(RuntimeError, match="buffer of the captured doubling was re-created after capture"):
        graph.replay()


# ----------------------------------------------------------------------------- SparseGPT's column blocks


def _block_inputs(rows=16, cols=32, seed=0):
    from plmtool.prune.sparsegpt import inverse_cholesky

    g = torch.Generator().manual_seed(seed)
    X = torch.randn(cols, 4 * cols, generator=g)
    U, _ = inverse_cholesky(X @ X.T / X.shape[1], 0.01)
    return torch.randn(rows, cols, generator=g), U, torch.diag(U)


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_sparsegpt_block_through_the_helper_is_checked_against_eager(monkeypatch, pattern):
    """The captured block (the unrolled substitution) passes its check against the eager block
    (the batched solve); a replay that computes something else does not."""
    from plmtool.prune import sparsegpt

    pat = sparsegpt.Pattern(sparsity=0.5) if pattern == "unstructured" else sparsegpt.Pattern(sparsity=0.5, n=2, m=4)
    W1, U1, d1 = _block_inputs()
    stand_in_graphs(monkeypatch)
    graphed = sparsegpt._GraphedBlock(W1, U1, d1, pat, 8, ())
    assert sparsegpt._check_block(graphed, W1, U1, d1, pat, 8, ()) is None
    got, ref = graphed(W1, U1, d1), sparsegpt._block(W1, U1, d1, pat, 8)
    assert torch.equal(got[2], ref[2]) and torch.allclose(got[0], ref[0], rtol=1e-4, atol=1e-6)
    stand_in_graphs(monkeypatch, shift=0.5)
    wrong = sparsegpt._GraphedBlock(W1, U1, d1, pat, 8, ())
    assert "weights" in sparsegpt._check_block(wrong, W1, U1, d1, pat, 8, ())
    wrong.W1 = wrong.W1.clone()
    with pytest.raises(RuntimeError, match="re-created after capture"):
        wrong(W1, U1, d1)
