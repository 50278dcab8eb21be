"""Where a decoding step's time goes: each program of an engine timed on its own.

A speculative step is the target's tree step, the drafter step and the host work between them
(tree candidates, verification, bookkeeping, the one device-to-host read). Timing the captured
programs in isolation and comparing with the measured time per step (from tokens/s and accepted
tokens per step) splits a step into those parts.
"""

from __future__ import annotations

import time
from typing import Callable

import torch


def time_call(fn: Callable[[], object], device: torch.device, reps: int = 100, warmup: int = 10) -> float:
    """Milliseconds per call of `fn`: CUDA events around `reps` back-to-back calls on a GPU (what
    the device spends, launches included), wall clock on the CPU."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) * 1000 / reps


@torch.no_grad()
def engine_program_times(engine, reps: int = 100) -> dict[str, float]:
    """ms per call of the engine's target steps (1 node, the tree) and its drafter step, each as it
    decodes (the captured graph's replay where there is one, else the eager program). A captured
    target step always attends over the whole cache, as timed here; an eager one decodes over the
    filled part only, so its time here is an upper bound. Leaves the engine's caches empty, as
    between two requests."""
    times: dict[str, float] = {}
    runner = engine.runner
    # the tree step greedy requests decode with: the dynamic tree's own program where there is one
    tree_step = engine.dynamic_step if engine.dynamic else engine.tree_step
    for name, prog in (("target_1_node", engine.plain_step), ("target_tree", tree_step)):
        if prog is None:
            continue
        prog.start.zero_()
        run = prog.graph.cuda_graph.replay if prog.graph is not None else (lambda p=prog: p._run(runner.max_len))
        times[f"{name}_ms"] = round(time_call(run, runner.device, reps), 4)
    runner.reset()
    program = engine.drafter_step
    if program is not None:
        times["drafter_ms"] = round(drafter_program_time(program, runner.device, reps), 4)
    return times


def rest_of_step(times: dict[str, float], step_ms: float) -> float:
    """ms of a measured step outside its programs (times from `engine_program_times`): host work,
    the device waiting for it, anything not captured. A speculative step runs the tree step and the
    drafter step; a plain one the 1-node step."""
    target = times.get("target_tree_ms", times["target_1_node_ms"])
    return step_ms - target - times.get("drafter_ms", 0.0)


@torch.no_grad()
def drafter_program_time(program, device: torch.device, reps: int = 100) -> float:
    """ms per drafter step (one accepted token per step; the shapes are fixed, so the count does not
    change the work). Each call advances the drafter cache by one slot; it is emptied afterwards."""
    program.count.fill_(1)
    program._set_start(0)
    run = program.graph.cuda_graph.replay if program.graph is not None else program._run
    ms = time_call(run, device, reps)
    program._reset_cache()
    return ms
