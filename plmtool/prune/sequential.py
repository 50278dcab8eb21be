"""Walk the decoder blocks one at a time: calibrate, prune (or optimise), propagate.

The layout the reference implementations share, made independent of the model family and of the
transformers version:

1. *Capture*: every decoder block is temporarily replaced by a recorder that keeps the positional
   and keyword arguments it is called with (attention mask, position ids / rotary embeddings,
   cache position, ... whatever this transformers version passes, per block so models with
   per-layer masks such as Qwen's sliding-window layers work too) and returns its input unchanged.
   The hidden states entering block 0 are stored for every calibration sample. Only the base
   model runs (no LM head).
2. Per block: move it to the execution device (one block on the GPU at a time when the model sits
   on the CPU), hook its linear layers to accumulate input statistics (`InputStats`) over a
   calibration pass, call `process(...)` to change the weights, then re-run the block so the next
   block sees the *pruned* outputs (`propagate="pruned"`), or keep the outputs of the calibration
   pass (`propagate="dense"`).
Activations live on the execution device when they fit, otherwise on the CPU.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from plmtool.errors import PlmtoolError
from plmtool.progress import track
from plmtool.prune.config import PruneConfig
from plmtool.prune.stats import InputStats

log = logging.getLogger("plmtool")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a causal LM (Llama / Mistral / Qwen2/3: model.model.layers;
    OPT: model.model.decoder.layers)."""
    base = getattr(model, "base_model", model)
    for path in ("layers", "decoder.layers", "model.layers", "transformer.h", "h"):
        obj: Any = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise PlmtoolError(f"cannot find the decoder blocks of {type(model).__name__} (supported: Llama-family, Qwen, Mistral, OPT)")


def block_linears(block: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, nn.Linear]:
    """Every nn.Linear inside a block, by its name within the block."""
    return {
        name: mod
        for name, mod in block.named_modules()
        if isinstance(mod, nn.Linear) and not any(x and x in name for x in exclude)
    }


class _Recorder(nn.Module):
    """Stands in for a decoder block during capture: records its call, returns the input."""

    def __init__(self, index: int, module: nn.Module, sink: "Captured", returns_tuple: bool):
        super().__init__()
        self.index = index
        self.module = module
        self.sink = sink
        self.returns_tuple = returns_tuple

    def __getattr__(self, name: str) -> Any:
        # models read attributes such as `attention_type` off their blocks
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        rest = args[1:]
        if self.index == 0:
            self.sink.hidden.append(hidden)
        if self.index not in self.sink.call:
            self.sink.call[self.index] = (rest, kwargs)
        return (hidden,) if self.returns_tuple else hidden


@dataclass
class Captured:
    hidden: list  # block-0 inputs per batch
    call: dict  # block index -> (extra positional args, keyword args) of its first call


def _returns_tuple(block: nn.Module) -> bool:
    ann = inspect.signature(type(block).forward).return_annotation
    return "tuple" in str(ann).lower()


def _to(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


class _StatsHooks:
    """Forward pre-hooks accumulating InputStats; linears fed the *same* tensor (q/k/v, gate/up)
    share one accumulator, which saves memory and time for Gram matrices."""

    def __init__(self, linears: dict[str, nn.Linear], gram: bool):
        self.linears = linears
        self.gram = gram
        self.stats: dict[str, InputStats] = {}
        self.leader: dict[str, str] = {}
        self._seen: list[tuple[torch.Tensor, str]] = []
        self._handles = [mod.register_forward_pre_hook(self._hook(name)) for name, mod in linears.items()]

    def new_pass(self, batch: int) -> None:
        self._seen = []
        self.batch = batch

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if name not in self.leader:
                same = next((lead for t, lead in self._seen if t is x), None)
                if same is None:
                    self.leader[name] = name
                    self.stats[name] = InputStats(x.shape[-1], x.device, gram=self.gram)
                else:
                    self.leader[name] = same
            self._seen.append((x, self.leader[name]))
            if self.leader[name] == name:
                self.stats[name].add(x.detach(), self.batch)

        return hook

    def remove(self) -> dict[str, InputStats]:
        for h in self._handles:
            h.remove()
        self._seen = []
        return {name: self.stats[self.leader[name]] for name in self.linears if name in self.leader}


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_inputs(model: nn.Module, input_ids: torch.Tensor, device: str, batch_size: int) -> Captured:
    """Block-0 inputs for every calibration batch, and each block's call arguments."""
    layers = decoder_layers(model)
    base = getattr(model, "base_model", model)
    sink = Captured(hidden=[], call={})
    originals = list(layers)
    tuple_out = _returns_tuple(originals[0])
    for i, layer in enumerate(originals):
        layers[i] = _Recorder(i, layer, sink, tuple_out)
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start : start + batch_size].to(device)
            base(input_ids=batch, use_cache=False)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
        if use_cache is not None:
            model.config.use_cache = use_cache
    return sink


def _activation_device(activations: str, device: str, shape: tuple, dtype: torch.dtype, streams: int) -> str:
    if activations != "auto":
        return device if activations == "device" else "cpu"
    if not device.startswith("cuda"):
        return device
    need = streams * 2 * torch.Size(shape).numel() * torch.finfo(dtype).bits // 8
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return device if need < 0.3 * free else "cpu"


ProcessFn = Callable[[int, nn.Module, dict, dict], Optional[dict]]


@torch.no_grad()
def walk(
    model: nn.Module,
    input_ids: torch.Tensor,
    process: ProcessFn,
    stats: str = "norms",
    opts: Optional[PruneConfig] = None,
    device: Optional[str] = None,
    calib_weights: Optional[Callable[[int, str], torch.Tensor]] = None,
    description: str = "pruning",
) -> list[Optional[dict]]:
    """Run `process(index, block, linears, stats)` on every decoder block in order.

    `stats`: "none" (no calibration pass), "norms" (Wanda) or "gram" (SparseGPT, SDS).
    `opts`: the walk reads batch_size, propagate, activations and exclude (defaults: PruneConfig's).
    `device`: where each block runs (None: where the model is); a model kept elsewhere (CPU) has
    one block at a time moved there.
    `calib_weights(index, name)`: weights swapped into the block for the calibration pass only
    (e.g. the dense weights, so statistics come from the dense model); the block's own weights are
    put back before `process`. Returns what `process` returned, per block.
    """
    opts = opts or PruneConfig()
    layers = decoder_layers(model)
    model_device = next(model.parameters()).device
    device = str(device or model_device)
    offload = torch.device(device) != model_device
    base = getattr(model, "base_model", model)
    outer = [m for m in base.children() if m is not layers and not any(m is x for x in layers)]
    if offload:
        for m in outer:
            m.to(device)
    try:
        cap = capture_inputs(model, input_ids, device, opts.batch_size)
    finally:
        if offload:
            for m in outer:
                m.to(model_device)
    # activations: one buffer per batch; moved to the chosen device
    first = cap.hidden[0]
    total_shape = (input_ids.shape[0], *first.shape[1:])
    act_dev = _activation_device(opts.activations, device, total_shape, first.dtype, streams=2)
    inps = [h.to(act_dev) for h in cap.hidden]
    del cap.hidden
    log.info("%s: %d blocks, %d calibration samples, activations on %s", description, len(layers), input_ids.shape[0], act_dev)
    results: list[Optional[dict]] = []
    for i in track(range(len(layers)), description=description):
        block = layers[i]
        if offload:
            block.to(device)
        args, kwargs = _to(cap.call.get(i, cap.call[0]), device)

        def run_block(h: torch.Tensor) -> torch.Tensor:
            return _block_output(block(h.to(device), *args, **kwargs)).to(act_dev)

        linears = block_linears(block, opts.exclude)
        block_stats: dict[str, InputStats] = {}
        outs: Optional[list[torch.Tensor]] = None
        if stats != "none":
            saved = None
            if calib_weights is not None:
                saved = {n: lin.weight.data for n, lin in linears.items()}
                for n, lin in linears.items():
                    lin.weight.data = calib_weights(i, n).to(lin.weight.device, lin.weight.dtype)
            hooks = _StatsHooks(linears, gram=(stats == "gram"))
            outs = []
            try:
                for h in inps:
                    hooks.new_pass(h.shape[0])
                    outs.append(run_block(h))
            finally:
                block_stats = hooks.remove()
                if saved is not None:
                    for n, lin in linears.items():
                        lin.weight.data = saved[n]
        results.append(process(i, block, linears, block_stats))
        del block_stats
        if outs is None or opts.propagate == "pruned":
            outs = [run_block(h) for h in inps]
        inps = outs
        if offload:
            block.to(model_device)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return results
