"""Records the operations that make a GPU step wait for the device (host reads of tensor values).

On CUDA, `.item()` / `int(t)` / `bool(t)` dispatch to `aten.item` -> `_local_scalar_dense` (a
device->host copy and a sync); `.tolist()`, `.cpu()`, `.numpy()` copy to the host; `nonzero` (and
boolean-mask indexing, which uses it) must learn its output size from the device; `torch.tensor`
of host data is a host->device copy. The same calls are visible on CPU through a
TorchDispatchMode / TorchFunctionMode, so a CPU test can assert that a step has none of them.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_DISPATCH = {"aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::lift_fresh"}
_FUNCTION = {"item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__", "tensor", "as_tensor"}


class _Dispatch(TorchDispatchMode):
    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in _DISPATCH:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


class _Function(TorchFunctionMode):
    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _FUNCTION:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


class HostSyncRecorder:
    """`with HostSyncRecorder() as rec: ...` then `rec.counts` (Counter of recorded op names)."""

    def __init__(self):
        self.counts: Counter = Counter()
        self._modes = [_Function(self.counts), _Dispatch(self.counts)]

    def __enter__(self) -> "HostSyncRecorder":
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)


def self_check() -> None:
    """The recorder must see the calls it claims to catch (guards the tests that expect zero)."""
    t = torch.arange(4)
    with HostSyncRecorder() as rec:
        int(t[1])
        t.tolist()
        torch.tensor([1, 2])
    scalar_reads = rec.counts["aten::item"] + rec.counts["aten::_local_scalar_dense"]
    assert scalar_reads >= 1 and rec.counts["tolist"] == 1 and rec.counts["tensor"] == 1, rec.counts
