#!/usr/bin/env python
"""Benchmarks of plmtool prune on one GPU: quality on SmolLM2-135M, speed/memory at LLaMA-3-8B shapes.

    # on a machine with the embedded data and lm-eval (CPU is fine): token ids for calibration /
    # validation / evaluation, and the zero-shot requests rendered by lm-eval (a .json.gz beside)
    python scripts/bench_prune.py prepare --out .device/prune_data.pt
    # on the GPU machine (needs only torch + transformers + plmtool; no hydra / lm-eval / datasets)
    python scripts/bench_prune.py run --data .device/prune_data.pt --model /tmp/smollm2.gguf --out $OUT
    # a CPU dry run of every code path at toy sizes
    python scripts/bench_prune.py run --data .device/prune_data.pt --tiny --out /tmp/bench

Quality: 128 x 2048 calibration windows of wiki_sample's calibration articles (seed 0); perplexity at
seqlen 2048 on the validation articles (for choosing SDS settings) and on the held-out evaluation
articles (reported); Wanda's seven zero-shot tasks, every document, rendered by lm-eval from the
embedded copies and scored by plmtool.eval (lm-eval's acc / acc_norm), for 2:4, 4:8 and 50 %
unstructured: dense, magnitude, Wanda, SparseGPT, SDS(Wanda), SDS(SparseGPT). Each SDS row is the
variant (--sds-variants) with the lowest *validation* perplexity; only that pick is evaluated on
the test data, and every candidate's validation perplexity is recorded beside it.
Speed: LLaMA-3-8B shapes with random bf16 weights built on the GPU, 128 x 2048 random-token
calibration, 2:4: wall time and peak memory of SparseGPT, Wanda and the full SDS (Wanda one-shot +
re-dense + re-prune/adjust), all 32 blocks; then 2:4 sparse tensor cores vs dense prefill/decode.
Results are appended to $OUT/bench_prune.json after every measurement (a cut-off run keeps them).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

log = logging.getLogger("plmtool")

# ------------------------------------------------------------------------------------ prepare


def prepare(args) -> None:
    from plmtool.data.calibration import calibration_windows
    from plmtool.data.corpora import eval_tokens
    from plmtool.eval import requests as rq
    from plmtool.eval.zeroshot import PRESETS, build_requests

    tok = tokenizer_of("smollm2-135m")
    data = SimpleNamespace(corpus="wiki_sample", calib_corpus=None, nsamples=args.nsamples, seqlen=args.seqlen, seed=0, text_field="text", cache_dir=None)
    calib = calibration_windows(tok, data)
    val = eval_tokens(tok, "wiki_sample", data, split="val")
    ev = eval_tokens(tok, "wiki_sample", data)
    tasks = PRESETS["wanda7"]
    items = build_requests(tasks, {t: "local" for t in tasks}, limit=args.zeroshot_limit)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    req_path = rq.save(items, out.with_suffix(".requests.json.gz"))
    torch.save({"calib": calib, "val": val, "eval": ev, "requests": req_path.name, "vocab": len(tok)}, out)
    n_req = sum(len(d.requests) for i in items for d in i.docs)
    print(f"wrote {out}: calib {tuple(calib.shape)}, val {val.numel()} tokens, eval {ev.numel()} tokens; "
          f"{req_path}: {len(items)} tasks, {n_req} requests")


# ------------------------------------------------------------------------------------ helpers


class Recorder:
    def __init__(self, out: Path):
        self.path = out / "bench_prune.json"
        self.data = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                     "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "quality": [], "speed": [], "semi_structured": []}
        out.mkdir(parents=True, exist_ok=True)

    def add(self, section: str, row: dict) -> None:
        self.data[section].append(row)
        self.path.write_text(json.dumps(self.data, indent=1))
        print(json.dumps({section: row}), flush=True)


def load_target(path: str, dtype: str, device: str):
    """The real model (the embedded name or a GGUF / checkpoint path) through plmtool's loader."""
    from plmtool.models import load_model

    model, _ = load_model(SimpleNamespace(name_or_path=path, dtype=dtype, device=device, device_map=None, gguf_file=None,
                                          cache_dir=None, revision=None, trust_remote_code=False, attn_implementation=None))
    return model


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def restore(model, weights: dict) -> None:
    from plmtool.prune.sequential import block_linears, decoder_layers

    for i, block in enumerate(decoder_layers(model)):
        for name, lin in block_linears(block).items():
            lin.weight.data.copy_(weights[f"layers.{i}.{name}"])


# ------------------------------------------------------------------------------------ quality


def quality(args, rec: Recorder, data: dict, patterns: list[str], requests: list) -> None:
    import copy

    from plmtool.eval.perplexity import perplexity
    from plmtool.eval.zeroshot import average, score_requests
    from plmtool.prune.config import OptimConfig, PruneConfig, SdsConfig
    from plmtool.prune.oneshot import prune_model
    from plmtool.prune.sds import linear_weights, redense_model, reprune_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=data["vocab"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2)).to(device).eval()
        calib, val, ev, seqlen = data["calib"][:4, :64], data["val"][:1024], data["eval"][:2048], 256
    else:
        model = load_target(args.model, "float32", device)
        calib, val, ev, seqlen = data["calib"], data["val"], data["eval"], 2048
    tok = tokenizer_of("smollm2-135m" if args.tiny else args.model)
    dense = linear_weights(model, device=device)
    base = PruneConfig(sparsity=0.5, batch_size=args.batch_size)  # unstructured = 50 %
    tasks = [t.task for t in requests]

    def zero_shot() -> dict:
        """Zero-shot accuracy of a bf16 copy (the Wanda reference evaluates its fp16 model; on
        the GPU bf16 is several times faster than fp32 for these forwards)."""
        scorer = copy.deepcopy(model).to(torch.bfloat16) if args.zeroshot_dtype == "bfloat16" else model
        sync()
        t0 = time.perf_counter()
        per_task = score_requests(scorer, tok, requests, batch_size=args.zeroshot_batch)
        sync()
        del scorer
        acc = {t: m["acc"] for t, m in per_task.items()}
        return {"zeroshot": acc, "zeroshot_norm": {t: m["acc_norm"] for t, m in per_task.items() if "acc_norm" in m},
                "zeroshot_avg": average(acc, tasks), "zeroshot_n": {t: m["n"] for t, m in per_task.items()},
                "zeroshot_dtype": args.zeroshot_dtype, "zeroshot_seconds": round(time.perf_counter() - t0, 1)}

    def evaluate(label: str, pattern: str, seconds: float | None, extra: dict | None = None) -> None:
        sync()
        pv, pe = perplexity(model, val, seqlen), perplexity(model, ev, seqlen)
        rec.add("quality", {"method": label, "pattern": pattern, "val_ppl": round(pv["ppl"], 3), "ppl": round(pe["ppl"], 3),
                            "seqlen": seqlen, "val_tokens": pv["tokens"], "tokens": pe["tokens"], "seconds": seconds,
                            **zero_shot(), **(extra or {})})

    if not args.no_dense:
        evaluate("dense", "-", None)

    def sds_config(spec: str = "") -> SdsConfig:
        """SDS settings from the command line, overridden by "key=value,..." (keys: l1, l2, lr,
        alr (adjustment lr), it, opt, inputs)."""
        kv = dict(part.split("=", 1) for part in spec.split(",") if part)
        it = int(kv.get("it", args.iterations))
        opt = kv.get("opt", "adam")
        return SdsConfig(l1=float(kv.get("l1", args.l1)), l2=float(kv.get("l2", args.l2)), inputs=kv.get("inputs", "pruned"),
                         redense=OptimConfig(iterations=it, lr=float(kv.get("lr", args.lr)), optimizer=opt),
                         adjust=OptimConfig(iterations=it, lr=float(kv.get("alr", args.adjust_lr)), optimizer=opt))

    variants = {spec: sds_config(spec) for spec in (args.sds_variants.split(";") if args.sds_variants else [""])}
    for pat_text in patterns:
        at = replace(base, pattern=pat_text)
        shown = pat_text if at.parsed_pattern.structured else "50%"
        oneshot = {}
        for method in args.oneshot_methods.split(","):
            restore(model, dense)
            sync()
            t = time.perf_counter()
            prune_model(model, calib, replace(at, method=method), device)
            sync()
            secs = round(time.perf_counter() - t, 2)
            oneshot[method] = linear_weights(model, device=device)
            evaluate(method, shown, secs)
        for method in args.sds_methods.split(","):
            if method not in oneshot:
                continue
            # every variant is scored on the validation articles only; the best one is then
            # evaluated on the test data (the only numbers reported for SDS)
            candidates: dict[str, float] = {}
            best = None
            for spec, sds in variants.items():
                opts = replace(at, method=method, sds=sds)
                restore(model, oneshot[method])
                sync()
                t = time.perf_counter()
                redense_model(model, calib, dense, opts, device)
                res = reprune_model(model, calib, dense, oneshot[method], opts, device)
                sync()
                secs = round(time.perf_counter() - t, 2)
                candidates[spec or "default"] = round(perplexity(model, val, seqlen)["ppl"], 3)
                print(f"  SDS({method}) {shown} [{spec or 'default'}]: validation ppl {candidates[spec or 'default']}", flush=True)
                if best is None or candidates[spec or "default"] < best[0]:
                    choices: dict = {}
                    for v in res["layers"].values():
                        choices[v["choice"]] = choices.get(v["choice"], 0) + 1
                    best = (candidates[spec or "default"], spec, linear_weights(model, device="cpu"), secs, sds, choices, res["early_exit"])
            _, spec, weights, secs, sds, choices, early = best
            restore(model, weights)
            evaluate(f"SDS({method})", shown, secs, {"picked": spec or "default", "picked_on": "validation ppl", "candidates_val_ppl": candidates,
                                                     "iterations": sds.redense.iterations, "lr": sds.redense.lr, "adjust_lr": sds.adjust.lr,
                                                     "l1": sds.l1, "l2": sds.l2, "optimizer": sds.redense.optimizer,
                                                     "layer_choices": choices, "early_exit": early})
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def tokenizer_of(name: str):
    from plmtool.models import load_tokenizer

    return load_tokenizer(SimpleNamespace(name_or_path=name, gguf_file=None, cache_dir=None, revision=None, trust_remote_code=False))


# ------------------------------------------------------------------------------------ speed


def llama3_8b(tiny: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=448, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=1, max_position_embeddings=256)
    else:
        cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16 if device == "cuda" else torch.float32)
    return model.eval(), cfg


def speed(args, rec: Recorder) -> None:
    from plmtool.prune.config import OptimConfig, PruneConfig, SdsConfig
    from plmtool.prune.oneshot import prune_model
    from plmtool.prune.patterns import verify
    from plmtool.prune.sds import linear_weights, redense_model, reprune_model

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    t = time.perf_counter()
    model, cfg = llama3_8b(args.tiny)
    sync()
    build = round(time.perf_counter() - t, 1)
    n, L = (4, 64) if args.tiny else (args.speed_nsamples, 2048)
    calib = torch.randint(0, cfg.vocab_size, (n, L), generator=torch.Generator().manual_seed(0))
    base_opts = PruneConfig(pattern="2:4", batch_size=args.batch_size, cuda_graphs=not args.no_graphs)
    pattern = base_opts.parsed_pattern
    dense = linear_weights(model, device="cpu")  # targets of SDS, kept off the GPU
    base = {"shape": "llama3-8b" if not args.tiny else "tiny", "layers": cfg.num_hidden_layers, "calibration": f"{n}x{L}",
            "dtype": str(next(model.parameters()).dtype), "batch_size": args.batch_size, "build_seconds": build}

    def measure(label: str, fn) -> float:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        extra = fn() or {}
        sync()
        secs = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        rec.add("speed", {**base, "method": label, "seconds": round(secs, 1), "peak_gib": round(peak, 2) if peak else None, **extra})
        return secs

    def check() -> dict:
        bad = 0
        from plmtool.prune.sequential import block_linears, decoder_layers

        for block in decoder_layers(model):
            for lin in block_linears(block).values():
                bad += verify(lin.weight, pattern) is not None
        return {"layers_violating_2:4": bad}

    def timed_sparsegpt() -> dict:
        """SparseGPT one-shot, with the time spent inside the pruning kernels (the rest is the
        calibration passes and the Gram accumulation) measured by wrapping the solver."""
        import plmtool.prune.oneshot as oneshot_mod

        inner = {"seconds": 0.0}
        solver = oneshot_mod.prune_sparsegpt

        def wrapped(*a, **k):
            sync()
            t0 = time.perf_counter()
            out = solver(*a, **k)
            sync()
            inner["seconds"] += time.perf_counter() - t0
            return out

        oneshot_mod.prune_sparsegpt = wrapped
        try:
            prune_model(model, calib, replace(base_opts, method="sparsegpt"), device)
        finally:
            oneshot_mod.prune_sparsegpt = solver
        return {**check(), "solver_seconds": round(inner["seconds"], 1), "cuda_graphs": not args.no_graphs}

    wanted = [w for w in args.speed.split(",") if w]
    for method in ("sparsegpt", "wanda"):
        sds_key = "sds" if method == "wanda" else "sds-sparsegpt"
        if method not in wanted and sds_key not in wanted:
            continue
        if method == "sparsegpt":
            t_os = measure("SparseGPT 2:4", timed_sparsegpt)
        else:
            t_os = measure("Wanda 2:4", lambda: (prune_model(model, calib, replace(base_opts, method="wanda"), device), check())[1])
        if sds_key in wanted:
            oneshot = linear_weights(model, device="cpu")
            it = 5 if args.tiny else args.speed_iterations
            opts = replace(base_opts, method=method, sds=SdsConfig(redense=OptimConfig(iterations=it, lr=args.lr),
                                                                    adjust=OptimConfig(iterations=it, lr=args.adjust_lr)))
            t_rd = measure(f"SDS({method}) re-dense ({it} it)", lambda: redense_model(model, calib, dense, opts, device) and None)
            t_rp = measure(f"SDS({method}) re-prune + adjust ({it} it)",
                           lambda: (reprune_model(model, calib, dense, oneshot, opts, device), check())[1])
            rec.add("speed", {**base, "method": f"SDS({method}) total = one-shot + re-dense + re-prune/adjust ({it} it)",
                              "seconds": round(t_os + t_rd + t_rp, 1), "peak_gib": None})
        restore(model, dense)


def semi_part(args, rec: Recorder) -> None:
    """LLaMA-3-8B shapes, 2:4 by magnitude (kernel speed does not depend on which weights
    survive), dense vs sparse tensor cores."""
    from plmtool.prune.config import PruneConfig
    from plmtool.prune.oneshot import prune_model

    if not torch.cuda.is_available():
        rec.add("semi_structured", {"error": "needs a CUDA GPU"})
        return
    linear_kernels(rec, tiny=args.tiny)
    model, cfg = llama3_8b(args.tiny)
    prune_model(model, None, PruneConfig(method="magnitude", pattern="2:4"))
    semi_structured(model, rec, {"shape": "llama3-8b" if not args.tiny else "tiny", "dtype": str(next(model.parameters()).dtype)})


@torch.no_grad()
def semi_real(args, rec: Recorder, data: dict) -> None:
    """The real SmolLM2-135M in bf16, Wanda 2:4, perplexity (seqlen 2048, held-out wiki_sample)
    with the pruned weights as dense tensors and then on the sparse kernels: the conversion must
    not change the model (bf16 rounding aside)."""
    from plmtool.eval.perplexity import perplexity
    from plmtool.prune.config import PruneConfig
    from plmtool.prune.oneshot import prune_model
    from plmtool.prune.semi_structured import to_semi_structured

    if not torch.cuda.is_available():
        rec.add("semi_structured", {"error": "needs a CUDA GPU"})
        return
    model = load_target(args.model, "bfloat16", "cuda")
    calib, ev = (data["calib"][:8, :256], data["eval"][:4096]) if args.tiny else (data["calib"], data["eval"])
    prune_model(model, calib, PruneConfig(method="wanda", pattern="2:4", batch_size=args.batch_size), "cuda")
    seqlen = 256 if args.tiny else 2048
    t = time.perf_counter()
    dense = perplexity(model, ev, seqlen)
    dense_s = time.perf_counter() - t
    n = to_semi_structured(model)
    t = time.perf_counter()
    sparse = perplexity(model, ev, seqlen)
    sparse_s = time.perf_counter() - t
    rec.add("semi_structured", {"model": "SmolLM2-135M", "dtype": "bfloat16", "pruning": "wanda 2:4", "layers_converted": n,
                                 "ppl_dense_kernels": round(dense["ppl"], 3), "ppl_sparse_kernels": round(sparse["ppl"], 3),
                                 "tokens": dense["tokens"], "seqlen": seqlen, "eval_s_dense": round(dense_s, 2), "eval_s_sparse": round(sparse_s, 2)})


@torch.no_grad()
def linear_kernels(rec: Recorder, tiny: bool) -> None:
    """One linear layer at a time, timed with CUDA events over many launches, so the comparison
    is the matmul kernels themselves (whole-model eager decoding is bound by per-op host
    overhead). Both of torch's 2:4 backends: cuSPARSELt (the default where available) and CUTLASS."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    from plmtool.prune.patterns import nm_mask, parse_pattern

    shapes = {"q/o_proj 4096x4096": (4096, 4096), "k/v_proj 1024x4096": (1024, 4096),
              "gate/up_proj 14336x4096": (14336, 4096), "down_proj 4096x14336": (4096, 14336)}
    if tiny:
        shapes = {"tiny 256x256": (256, 256)}
    reps = 50

    def event_ms(fn) -> float:
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps

    g = torch.Generator(device="cuda").manual_seed(0)
    for label, (out_f, in_f) in shapes.items():
        w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16, generator=g)
        w = w.masked_fill(nm_mask(w.abs(), parse_pattern("2:4")), 0)
        for backend in ("cusparselt", "cutlass"):
            try:
                SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
                ws = to_sparse_semi_structured(w)
            except Exception as e:  # a backend missing from this build is reported, not hidden
                rec.add("semi_structured", {"kernel": label, "backend": backend, "error": f"{type(e).__name__}: {e}"})
                continue
            finally:
                SparseSemiStructuredTensor._FORCE_CUTLASS = False
            for tokens in (1, 16, 128, 2048):
                x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16, generator=g)
                try:
                    err = float((torch.nn.functional.linear(x, ws) - torch.nn.functional.linear(x, w)).abs().max())
                    dense = event_ms(lambda: torch.nn.functional.linear(x, w))
                    sparse = event_ms(lambda: torch.nn.functional.linear(x, ws))
                    rec.add("semi_structured", {"kernel": label, "backend": backend, "tokens": tokens, "dense_ms": round(dense, 4),
                                                 "sparse_2of4_ms": round(sparse, 4), "speedup": round(dense / sparse, 3), "max_abs_diff": err})
                except Exception as e:
                    rec.add("semi_structured", {"kernel": label, "backend": backend, "tokens": tokens, "error": f"{type(e).__name__}: {e}"})


@torch.no_grad()
def semi_structured(model, rec: Recorder, base: dict) -> None:
    """Prefill (1 x 2048) and decode-step (batch 1 and 16, 1 token on a 512-token cache) latency:
    dense weights vs the same 2:4 weights on sparse tensor cores."""
    from plmtool.prune.semi_structured import to_semi_structured

    def bench(fn, reps=5):
        fn()
        sync()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2] * 1000

    def timings() -> dict:
        out = {}
        ids = torch.randint(0, 1000, (1, 2048), device="cuda")
        out["prefill_1x2048_ms"] = bench(lambda: model(input_ids=ids, use_cache=False))
        for b in (1, 16):
            ctx = torch.randint(0, 1000, (b, 512), device="cuda")
            o = model(input_ids=ctx, use_cache=True)
            cache = o.past_key_values
            nxt = torch.randint(0, 1000, (b, 1), device="cuda")

            def step():
                return model(input_ids=nxt, past_key_values=cache, use_cache=True)

            # the cache grows by one token per call; 6 calls on a 512-token cache are negligible
            out[f"decode_step_batch{b}_ms"] = bench(step)
        return out

    try:
        dense_t = timings()
        n = to_semi_structured(model)
        sparse_t = timings()
        for k in dense_t:
            rec.add("semi_structured", {**base, "metric": k, "dense_ms": round(dense_t[k], 2), "sparse_2of4_ms": round(sparse_t[k], 2),
                                         "speedup": round(dense_t[k] / sparse_t[k], 3), "layers_converted": n})
    except Exception as e:  # report, do not hide: some torch builds lack the kernels for a dtype
        rec.add("semi_structured", {**base, "error": f"{type(e).__name__}: {e}"})


# ------------------------------------------------------------------------------------ main


def main() -> None:
    from plmtool.prune.config import PruneConfig

    defaults = PruneConfig()  # the command's defaults, unless a flag says otherwise
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", default=".device/prune_data.pt")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--zeroshot-limit", type=int, default=None, help="first N documents per task (default: all)")
    r = sub.add_parser("run")
    r.add_argument("--data", default=".device/prune_data.pt")
    r.add_argument("--model", default="/tmp/smollm2.gguf")
    r.add_argument("--out", default=os.environ.get("OUT", "outputs/bench_prune"))
    r.add_argument("--tiny", action="store_true", help="toy sizes on any device (a dry run of every path)")
    r.add_argument("--parts", default="quality24,speed,quality", help="comma list, run in order: quality24, quality48, quality50, quality (4:8, 50%%), speed, semi (2:4 sparse tensor cores at 8B shapes), semi-real (SmolLM2 perplexity on the 2:4 kernels)")
    r.add_argument("--speed", default="sparsegpt,sds", help="which 8B measurements: sparsegpt, wanda, sds (SDS(Wanda)), sds-sparsegpt")
    r.add_argument("--speed-nsamples", type=int, default=128)
    r.add_argument("--speed-iterations", type=int, default=200)
    r.add_argument("--iterations", type=int, default=200, help="SDS iterations in the quality runs (the paper: 200)")
    r.add_argument("--lr", type=float, default=defaults.sds.redense.lr, help="SDS re-dense learning rate")
    r.add_argument("--adjust-lr", type=float, default=defaults.sds.adjust.lr, help="SDS adjustment learning rate")
    r.add_argument("--no-graphs", action="store_true", help="SparseGPT without CUDA graphs (speed runs)")
    r.add_argument("--l1", type=float, default=defaults.sds.l1)
    r.add_argument("--l2", type=float, default=defaults.sds.l2)
    r.add_argument("--batch-size", type=int, default=defaults.batch_size, help="calibration samples per block call")
    r.add_argument("--sds-variants", default="l1=0.01,l2=0.01;l1=0.1,l2=0.1", help='SDS settings to choose from on the validation split, ";"-separated, e.g. "l1=0,l2=0;lr=0.03,alr=0.1" ("" = the defaults)')
    r.add_argument("--zeroshot-dtype", default="bfloat16", choices=["bfloat16", "float32"], help="dtype of the copy that scores zero-shot")
    r.add_argument("--zeroshot-batch", type=int, default=256)
    r.add_argument("--no-dense", action="store_true", help="skip the dense row (already measured in an earlier run of the same data)")
    r.add_argument("--zeroshot-limit", type=int, default=None, help="first N documents per task of the request file")
    r.add_argument("--oneshot-methods", default="magnitude,wanda,sparsegpt")
    r.add_argument("--sds-methods", default="wanda,sparsegpt", help="SDS rows with the main settings")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    if args.cmd == "prepare":
        prepare(args)
        return
    from plmtool.eval.requests import load as load_requests

    data = torch.load(args.data)
    rec = Recorder(Path(args.out))
    requests = load_requests(Path(args.data).parent / data["requests"])
    if args.zeroshot_limit or args.tiny:
        for item in requests:
            item.docs = item.docs[: args.zeroshot_limit or 4]
    start = time.perf_counter()
    for part in args.parts.split(","):
        if part == "quality24":
            quality(args, rec, data, ["2:4"], requests)
        elif part == "quality":
            quality(args, rec, data, ["4:8", "unstructured"], requests)
        elif part in ("quality48", "quality50"):
            quality(args, rec, data, ["4:8" if part == "quality48" else "unstructured"], requests)
        elif part == "speed":
            # per-block progress lines ("SDS adjust: 12/32 (80.1s)") show where a cut-off run was
            logging.getLogger("plmtool").setLevel(logging.INFO)
            speed(args, rec)
        elif part == "semi":
            semi_part(args, rec)
        elif part == "semi-real":
            semi_real(args, rec, data)
        print(f"[{part} done at {time.perf_counter() - start:.0f}s]", flush=True)
    table(rec.data)


def table(d: dict) -> None:
    print(f"\n# bench_prune on {d['device']} ({d['date']}, torch {d['torch']})")
    if d["quality"]:
        tasks = list(d["quality"][0].get("zeroshot", {}))
        print("\n| method | pattern | val ppl | ppl | " + " | ".join(tasks) + " | avg | seconds |")
        print("|" + "---|" * (6 + len(tasks)))
        for r in d["quality"]:
            accs = " | ".join(f"{r['zeroshot'].get(t, float('nan')):.3f}" for t in tasks)
            print(f"| {r['method']} | {r['pattern']} | {r['val_ppl']} | {r['ppl']} | {accs} | {r['zeroshot_avg']:.4f} | {r['seconds']} |")
    if d["speed"]:
        print("\n| method | seconds | peak GiB | solver s |\n|---|---|---|---|")
        for r in d["speed"]:
            print(f"| {r['method']} | {r['seconds']} | {r['peak_gib']} | {r.get('solver_seconds', '')} |")
    for r in d["semi_structured"]:
        print(r)


if __name__ == "__main__":
    main()
