"""CPU stand-ins for CUDA graphs: tests replace `plmtool.cuda_graph.capture_graph`, the one function
that captures, and every captured program (decoding steps, prefills, SparseGPT blocks) then
replays through a stand-in that recomputes into the captured outputs, as a graph refills them."""

from __future__ import annotations

import torch


class StandInGraph:
    """A CPU stand-in for a captured CUDA graph: replay reruns the captured function into the
    captured outputs, as a graph refills them; `shift` is added to floating outputs (a replay
    that computes something else, e.g. a miscompiled kernel)."""

    def __init__(self, run, out, shift: float = 0.0):
        self.run, self.out, self.shift = run, out, shift

    def _copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src + self.shift if self.shift and src.is_floating_point() else src)

    def replay(self):
        res = self.run()
        if isinstance(res, torch.Tensor):
            self._copy(self.out, res)
        elif res is not None:
            for o, r in zip(self.out, res):
                self._copy(o, r)


def stand_in_capture(shift: float = 0.0):
    """A replacement for `plmtool.cuda_graph.capture_graph` (the one function that captures)."""

    def capture(run, pool=None, before=lambda: None, warmups=2):
        before()
        out = run()
        out = out.clone() if isinstance(out, torch.Tensor) else (None if out is None else tuple(t.clone() for t in out))
        return StandInGraph(run, out, shift), out

    return capture


def stand_in_graphs(monkeypatch, shift: float = 0.0) -> None:
    """Every capture of this test through stand-in graphs (replays off by `shift` where given)."""
    from plmtool import cuda_graph

    monkeypatch.setattr(cuda_graph, "capture_graph", stand_in_capture(shift))
