#!/usr/bin/env python
"""GPU benchmark of speculative decoding on SmolLM2-135M-Instruct (docs/benchmarks/draft.md).

Runs without Hydra: plain imports of plmtool modules. Two sub-commands:

  prepare  (CPU, where the embedded data packages are installed) writes one JSON file holding the
           MT-Bench questions and ShareGPT conversations, to be carried to the GPU machine:
             python scripts/bench_draft.py prepare --out .device/draft/data.json --sharegpt 1200
  run      self-distils ShareGPT prompts with the target, trains Medusa and Amphista with the same
           data and budget (plmtool.draft.train.train_drafter), then benchmarks MT-Bench (greedy,
           batch 1): ar, hf_generate, hf_generate_static, medusa, amphista in bf16, and an fp32
           pass checking outputs are identical to plain greedy. Writes report.json / report.md /
           answers.jsonl under --out after every phase (a timeout still leaves results).
             python scripts/bench_draft.py run --data .device/draft/data.json --model /tmp/smollm2.gguf --out $OUT
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("plmtool")


def prepare(args) -> None:
    from plmtool.data.chat import load_mtbench, load_sharegpt

    data = {"mtbench": load_mtbench(), "sharegpt": load_sharegpt(limit=args.sharegpt)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data))
    print(f"wrote {out}: {len(data['mtbench'])} questions, {len(data['sharegpt'])} conversations")


def run(args) -> None:
    import torch

    from plmtool.draft.config import DraftDataConfig, DrafterConfig, DraftTrainerConfig
    from plmtool.draft.data import self_distill
    from plmtool.draft.decoding.benchmark import (
        calibration_sequences, engine_method, hf_generate_method, prepare_questions, render_markdown, run_benchmark,
        setup_drafter, spec_bench_lines, stop_token_ids, summarize, tree_report,
    )
    from plmtool.draft.decoding.engine import SpeculativeEngine
    from plmtool.draft.train import train_drafter
    from plmtool.io import write_json, write_text
    from plmtool.models import load_model

    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = json.loads(Path(args.data).read_text())
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    report: dict = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "gpu": torch.cuda.get_device_name(0) if cuda else None, "torch": torch.__version__,
                    "phases": {}, "notes": []}
    try:
        import transformers

        report["transformers"] = transformers.__version__
    except ImportError:
        pass

    def elapsed() -> float:
        return time.perf_counter() - t_start

    def save() -> None:
        write_json(out / "report.json", report)

    def phase(name: str, t0: float) -> None:
        report["phases"][name] = round(time.perf_counter() - t0, 1)
        log.info("phase %s done in %.1fs (total %.1fs)", name, report["phases"][name], elapsed())
        save()

    # ------------------------------------------------------------------ model
    t0 = time.perf_counter()
    bench_dtype = "bfloat16" if cuda else "float32"
    model, tok = load_model(SimpleNamespace(name_or_path=args.model, dtype=bench_dtype, device=device))
    phase("load", t0)

    # ------------------------------------------------------------------ data: self-distillation
    t0 = time.perf_counter()
    convs = data["sharegpt"][: args.conversations]
    if args.distill:
        convs = self_distill(model, tok, convs, work / "distill", max_new_tokens=args.distill_tokens, max_turns=1,
                             batch_size=args.distill_batch, max_prompt_tokens=512)
    report["train_data"] = {"conversations": len(convs), "self_distilled": bool(args.distill),
                            "distill_max_new_tokens": args.distill_tokens}
    phase("distill", t0)

    # ------------------------------------------------------------------ train both drafters, same budget
    trainer = DraftTrainerConfig(lr=args.lr, warmup_steps=min(50, args.steps // 10), max_steps=args.steps,
                                 batch_size=args.batch, eval_every=args.steps, save_every=args.steps, log_every=50,
                                 cache_hidden=True, seed=0)
    dcfg = DraftDataConfig(max_seq_len=args.seq_len, heldout=args.heldout, min_assistant_tokens=8)
    kinds = {
        "medusa": DrafterConfig(kind="medusa", num_heads=args.heads, medusa_num_layers=1, share_lm_head=False),
        "amphista": DrafterConfig(kind="amphista", num_heads=args.heads),
    }
    report["training"] = {"trainer": vars(trainer), "data": vars(dcfg)}
    ckpts = {}
    for kind, cfg in kinds.items():
        t0 = time.perf_counter()
        metrics = train_drafter(model, tok, cfg, trainer, convs, work / kind, data_cfg=dcfg)
        ckpts[kind] = str(work / kind / "drafter")
        report["training"][kind] = {k: v for k, v in metrics.items() if k not in ("eval_history",)}
        report["training"][kind]["seconds"] = round(time.perf_counter() - t0, 1)
        phase(f"train_{kind}", t0)
    model.eval()
    model.requires_grad_(False)

    # ------------------------------------------------------------------ benchmark
    questions = data["mtbench"][: args.questions]
    prepared = prepare_questions(tok, questions)
    stops = stop_token_ids(model, tok)
    tree_spec = f"auto:{args.tree_nodes}"

    def bench(label: str, dtype_model, methods_wanted: list[str], qs: list[dict], runs: int, caps: dict | None,
              deadline: float) -> dict:
        ar_engine = SpeculativeEngine(dtype_model, max_len=args.max_len)
        cal_prompts = [q["calibration_ids"] or q["prompt_ids"] for q in prepared][: args.calibration]
        cal = calibration_sequences(ar_engine, cal_prompts, 128, stops)
        setups = {k: setup_drafter(dtype_model, p, tree_spec, cal, args.max_len) for k, p in ckpts.items() if k in methods_wanted}
        methods = {}
        for name in methods_wanted:
            if name == "ar":
                methods[name] = engine_method(ar_engine, args.max_new, stops)
            elif name.startswith("hf_generate"):
                methods[name] = hf_generate_method(dtype_model, args.max_new, stops, tok.pad_token_id, static=name.endswith("static"))
            else:
                eng = SpeculativeEngine(dtype_model, setups[name].drafter, setups[name].tree, max_len=args.max_len)
                methods[name] = engine_method(eng, args.max_new, stops)
        errors: dict[str, str] = {}
        records = run_benchmark(methods, qs, torch.device(device), runs=runs, warmup=1, question_caps=caps,
                                deadline=deadline, errors=errors)
        summary = summarize(records)
        res = {"num_questions": len(qs), "setup": {"device": device, "dtype": str(dtype_model.dtype).replace("torch.", ""),
                                                    "max_new_tokens": args.max_new, "runs": runs, "warmup": 1,
                                                    "cuda_graphs": ar_engine.cuda_graphs, "question_caps": caps},
               **summary, "trees": {k: tree_report(s) for k, s in setups.items()}, "model": args.model,
               "skipped": errors}
        for m in res["methods"].values():
            m.pop("divergences", None) if len(m.get("divergences", [])) > 20 else None
        lines = []
        for name, recs in records.items():
            lines += spec_bench_lines(name, recs, tok, f"smollm2-135m-{label}")
        write_text(out / f"answers_{label}.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
        return res

    t0 = time.perf_counter()
    methods = ["ar", "hf_generate", "hf_generate_static", "medusa", "amphista"] if cuda else ["ar", "hf_generate", "medusa", "amphista"]
    caps = {"hf_generate": args.hf_dynamic_questions, "hf_generate_static": args.hf_static_questions}
    report["bf16" if cuda else "fp32_main"] = bench("bf16" if cuda else "fp32", model, methods, prepared, args.runs, caps,
                                                    t_start + args.budget_s)
    phase("bench_main", t0)

    if cuda and args.fp32_questions and elapsed() < args.budget_s:
        t0 = time.perf_counter()
        del model
        torch.cuda.empty_cache()
        model32, _ = load_model(SimpleNamespace(name_or_path=args.model, dtype="float32", device=device))
        model32.requires_grad_(False)
        report["fp32"] = bench("fp32", model32, ["ar", "medusa", "amphista"], prepared[: args.fp32_questions], 1, None,
                               t_start + args.budget_s + args.fp32_budget_s)
        phase("bench_fp32", t0)
    elif cuda and args.fp32_questions:
        report["notes"].append(f"fp32 identity pass skipped: time budget {args.budget_s}s reached")
    report["total_s"] = round(elapsed(), 1)
    save()
    md = []
    for key in ("bf16", "fp32", "fp32_main"):
        if key in report:
            md.append(f"## {key}\n\n" + render_markdown({**report[key], "model": "SmolLM2-135M-Instruct"}))
    train_rows = [f"- {k}: " + json.dumps({kk: report['training'][k].get(kk) for kk in ('heads', 'seconds', 'steps') if kk in report['training'][k]})
                  for k in kinds if k in report["training"]]
    write_text(out / "report.md", f"# speculative decoding benchmark ({report['gpu'] or 'cpu'})\n\n" + "\n".join(train_rows) + "\n\n" + "\n".join(md))
    print((out / "report.md").read_text())


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("plmtool").setLevel(logging.INFO)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare")
    pp.add_argument("--out", required=True)
    pp.add_argument("--sharegpt", type=int, default=1200)
    pr = sub.add_parser("run")
    pr.add_argument("--data", required=True)
    pr.add_argument("--model", default="smollm2-135m")
    pr.add_argument("--out", required=True)
    pr.add_argument("--work", default="/tmp/draft_bench_work")
    pr.add_argument("--conversations", type=int, default=512)
    pr.add_argument("--distill", type=int, default=1)
    pr.add_argument("--distill-tokens", type=int, default=256)
    pr.add_argument("--distill-batch", type=int, default=128)
    pr.add_argument("--heads", type=int, default=4)
    pr.add_argument("--steps", type=int, default=600)
    pr.add_argument("--batch", type=int, default=8)
    pr.add_argument("--seq-len", type=int, default=1024)
    pr.add_argument("--lr", type=float, default=1e-3)
    pr.add_argument("--heldout", type=int, default=32)
    pr.add_argument("--questions", type=int, default=80)
    pr.add_argument("--max-new", type=int, default=256)
    pr.add_argument("--max-len", type=int, default=2048)
    pr.add_argument("--runs", type=int, default=1)
    pr.add_argument("--tree-nodes", type=int, default=64)
    pr.add_argument("--calibration", type=int, default=8)
    pr.add_argument("--hf-dynamic-questions", type=int, default=10)
    pr.add_argument("--hf-static-questions", type=int, default=40)
    pr.add_argument("--fp32-questions", type=int, default=20)
    pr.add_argument("--budget-s", type=float, default=430, help="main benchmark ends by this time since start")
    pr.add_argument("--fp32-budget-s", type=float, default=100)
    args = p.parse_args()
    prepare(args) if args.cmd == "prepare" else run(args)


if __name__ == "__main__":
    main()
