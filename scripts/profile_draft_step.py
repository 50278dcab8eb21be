#!/usr/bin/env python
"""Where a speculative decoding step's time goes, per drafter kind (docs/benchmarks/draft.md).

Builds one engine per drafter kind on the same target, shared runner and tree, decodes a fixed
number of tokens with each (no stop token), and reports

* the wall time per step of the whole loop (CUDA-synchronised around each generation),
* each captured program timed alone (target tree step, drafter step; `step_timing`),
* the rest (host work and the device idling while the host decides), and
* a torch.profiler table of the host-side ops of one generation (`profile_<kind>.txt`) and its
  Chrome trace (`trace_<kind>.json`).

Drafters are freshly initialised unless `--checkpoint KIND=PATH` is given: the loop's structure
(and so its overhead per step) does not depend on the weights, only the accepted lengths do, and
those are reported next to the times.

    python scripts/profile_draft_step.py --model /tmp/smollm2.gguf --out $OUT
    python scripts/profile_draft_step.py --model smollm2-135m --out /tmp/prof --tokens 24 --compile 0   # CPU check
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural experiences."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", required=True)
    p.add_argument("--kinds", default="medusa,amphista")
    p.add_argument("--checkpoint", action="append", default=[], help="KIND=PATH of a trained drafter")
    p.add_argument("--tree", default="auto:64")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--compile", type=int, default=1)
    p.add_argument("--new-lengths", type=int, default=0,
                   help="time N generations whose prompts all have lengths no method has seen (first-call costs "
                        "per prompt shape: attention plans, allocator) instead of repeating one prompt")
    p.add_argument("--cudnn-sdpa", type=int, default=1, help="0: disable cuDNN attention in SDPA")
    p.add_argument("--prefill-lengths", default="",
                   help="comma-separated prompt lengths: time the target's prefill at each (padded graphs and eager) "
                        "and each drafter's prefill (eager, and padded where the engine pads it), milliseconds, "
                        "median of 5 (`prefill_ms` in the report)")
    args = p.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from plmtool.draft.config import DrafterConfig, EngineOptions
    from plmtool.draft.decoding import GenerationConfig, SpeculativeEngine, resolve_tree
    from plmtool.draft.bench.step_timing import engine_program_times, rest_of_step
    from plmtool.draft.decoding.target import TargetRunner
    from plmtool.draft.drafter import build_drafter, load_drafter
    from plmtool.models import load_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    if cuda and not args.cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)
    device = "cuda" if cuda else "cpu"
    model, tok = load_model(SimpleNamespace(name_or_path=args.model, dtype="bfloat16" if cuda else "float32", device=device))
    model.requires_grad_(False)
    prompt = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt)
    gen = GenerationConfig(max_new_tokens=args.tokens, stop_token_ids=[])
    checkpoints = dict(c.split("=", 1) for c in args.checkpoint)
    runner = TargetRunner(model, args.max_len, compile=bool(args.compile) and cuda)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    report = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "tree": args.tree, "tokens": args.tokens, "prompt_tokens": len(prompt), "cudnn_sdpa": bool(args.cudnn_sdpa),
              "new_lengths": args.new_lengths, "kinds": {}}
    filler = tok.encode(" and then", add_special_tokens=False)
    fresh = iter(range(1, 10**6))  # each new-length prompt gets one more filler block than any before

    def timed_prompt() -> list[int]:
        if not args.new_lengths:
            return prompt
        return prompt[:-5] + filler * next(fresh) + prompt[-5:]
    for kind in ["ar"] + [k for k in args.kinds.split(",") if k]:
        if kind == "ar":
            engine = SpeculativeEngine(model, max_len=args.max_len, runner=runner)
        else:
            if kind in checkpoints:
                drafter = load_drafter(checkpoints[kind], target=model)
            else:
                drafter = build_drafter(DrafterConfig(kind=kind, num_heads=4), target=model).to(device, model.dtype).eval()
            tree = resolve_tree(args.tree, drafter.num_heads)
            engine = SpeculativeEngine(model, drafter, tree, max_len=args.max_len, runner=runner,
                                       options=EngineOptions(compile=bool(args.compile)))
        engine.generate(prompt, gen)  # warm-up (allocator, lazy init)
        walls, steps, accepted = [], [], 0.0
        for _ in range(args.new_lengths or args.repeats):
            this = timed_prompt()
            sync()
            t0 = time.perf_counter()
            res = engine.generate(this, gen)
            sync()
            walls.append(time.perf_counter() - t0)
            steps.append(len(res.accept_lengths))
            accepted = sum(res.accept_lengths) / max(len(res.accept_lengths), 1)
        step_ms = statistics.median(w / s for w, s in zip(walls, steps)) * 1000
        programs = engine_program_times(engine)
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            engine.generate(prompt, gen)
            sync()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
        (out / f"profile_{kind}.txt").write_text(table)
        prof.export_chrome_trace(str(out / f"trace_{kind}.json"))
        report["kinds"][kind] = {
            "step_ms": round(step_ms, 4), "steps": steps[-1], "mean_accepted": round(accepted, 3),
            "programs_ms": programs, "rest_ms": round(rest_of_step(programs, step_ms), 4),
            "cuda_graphs": engine.cuda_graphs, "drafter_graph": engine.drafter_graph,
            "drafter_compiled": getattr(engine, "drafter_compiled", False)}
        if args.prefill_lengths:
            report["kinds"][kind]["prefill_ms"] = prefill_times(engine, [int(x) for x in args.prefill_lengths.split(",")], sync)
        print(kind, json.dumps(report["kinds"][kind]), flush=True)
        print(table[:6000], flush=True)
    (out / "profile.json").write_text(json.dumps(report, indent=1))


def prefill_times(engine, lengths: list[int], sync, reps: int = 5) -> dict:
    """ms per prefill of `n`-token prompts: the target's (through the padded graphs where the
    runner has them, and eagerly) and, with a drafter, the drafter's over the prompt (eagerly, and
    padded as the engine runs it where the engine has padded drafter prefills)."""
    import torch

    from plmtool.draft.decoding.device import variable_shape_attention

    runner, out = engine.runner, {}

    def median_ms(fn) -> float:
        times = []
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(1000 * (time.perf_counter() - t0))
        return round(statistics.median(times), 3)

    with torch.inference_mode():
        for n in lengths:
            prompt = [int(t) for t in torch.randint(0, runner.vocab_size, (n,))]
            row = {"target_eager": median_ms(lambda: runner.prefill(prompt, graphs=False))}
            if runner.prefill_graphs is not None:
                row["target_graphs"] = median_ms(lambda: runner.prefill(prompt, graphs=True))
            if engine.drafter is not None:
                _, hidden = runner.prefill(prompt)
                nxt = torch.tensor([prompt[1:] + [0]], device=runner.device)
                cache = engine.drafter.new_cache(1, runner.max_len, runner.device, runner.dtype)

                def drafter_prefill():
                    engine.drafter.crop_cache(cache, 0)
                    with variable_shape_attention():
                        engine.drafter.step(hidden.unsqueeze(0), nxt, cache)

                row["drafter_eager"] = median_ms(drafter_prefill)
                padded = engine.drafter_prefills
                if padded is not None:  # what the engine runs: the padded drafter prefill (graphs on CUDA)
                    def drafter_padded():
                        engine.drafter.crop_cache(padded.cache, 0)
                        padded(hidden, nxt[0])

                    row["drafter_graphs" if padded.cuda_graphs else "drafter_padded"] = median_ms(drafter_padded)
                    engine.drafter.crop_cache(padded.cache, 0)
            out[str(n)] = row
    runner.reset()
    return out


if __name__ == "__main__":
    main()
