#!/usr/bin/env python
"""GPU benchmark of speculative decoding on SmolLM2-135M-Instruct (docs/benchmarks/draft.md).

Runs without Hydra: plain imports of plmtool modules. Two sub-commands:

  prepare  (CPU, where the embedded data packages are installed) writes one JSON file holding the
           MT-Bench questions and the first exchange of ShareGPT conversations (9.5 MB for 4000), to
           be carried to the GPU machine:
             python scripts/bench_draft.py prepare --out .device/draft/data.json --sharegpt 4000
  run      self-distils ShareGPT prompts with the target, trains Medusa and Amphista with the same
           data and budget (plmtool.draft.train.train_drafter), then benchmarks MT-Bench (greedy,
           batch 1, question by question with every method in turn, so a deadline cuts all methods
           after the same questions): ar, hf_generate (first few questions: it is slow),
           hf_generate_static, medusa, amphista in bf16; then a short fp32 pass (ar, hf_generate,
           medusa, amphista) that checks exact identity with plain greedy. Our engines share one
           target runner whose step is torch.compile'd and captured as a CUDA graph (checked
           against eager at capture; eager capture if it differs). report.json is rewritten after
           every phase and every 5 questions (a timeout still leaves results); report.md and
           answers_<pass>.jsonl (Spec-Bench layout) at the end of each pass. About 12 minutes on
           one H200 (7 of them distillation and training); rerunning the same command with the same
           --work resumes from the cached distillation and finished drafter checkpoints, which is
           how docs/benchmarks/draft.md ran it on a machine with a 10-minute command limit:
             python scripts/bench_draft.py run --data .device/draft/data.json --model /tmp/smollm2.gguf --out $OUT
           CPU end-to-end check at tiny size: add --tiny (real SmolLM2 in fp32, a few steps/tokens).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import logging
import lzma
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("plmtool")

COMPRESSED = {".gz": gzip, ".xz": lzma}  # data files: json, json.gz or json.xz


def prepare(args) -> None:
    from plmtool.data.chat import load_chat, load_mtbench

    convs = load_chat("sharegpt", limit=args.sharegpt).conversations
    if args.first_exchange:
        # the benchmark distils first turns only: keep (system,) user, assistant and drop the rest
        convs = [c[: next(i for i, m in enumerate(c) if m["role"] == "assistant") + 1] for c in convs]
    if args.max_chars:
        convs = [c for c in (_cut(c, args.max_chars) for c in convs) if any(m["role"] == "assistant" for m in c)]
    data = {"mtbench": load_mtbench(), "sharegpt": convs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data)
    if out.suffix in COMPRESSED:  # .xz packs ShareGPT ~25 % tighter than .gz: one carried file is capped
        out.write_bytes(COMPRESSED[out.suffix].compress(text.encode("utf-8")))
    else:
        out.write_text(text)
    print(f"wrote {out}: {len(data['mtbench'])} questions, {len(data['sharegpt'])} conversations, "
          f"{out.stat().st_size / 1e6:.1f} MB")


def _cut(conv: list[dict], max_chars: int) -> list[dict]:
    """The conversation through its first `max_chars` characters of content (the last message kept
    is cut short): a smaller file to carry. Training reads at most --seq-len tokens of a
    conversation, and SmolLM2's tokens average about 4 characters of English, so a cut at 6000
    characters shortens only what training would have truncated anyway, but for rare texts of very
    long tokens."""
    out, left = [], max_chars
    for m in conv:
        if left <= 0:
            break
        out.append({**m, "content": m["content"][:left]})
        left -= len(m["content"])
    return out


def _load_data(path: str) -> dict:
    raw = Path(path).read_bytes()
    suffix = Path(path).suffix
    if suffix in COMPRESSED:
        raw = COMPRESSED[suffix].decompress(raw)
    return json.loads(raw.decode("utf-8"))


ALL_METHODS = ("ar", "hf_generate", "hf_generate_static", "medusa", "amphista")

TINY = dict(conversations=24, distill_tokens=24, distill_batch=12, steps=6, batch=2, seq_len=256, heldout=4,
            questions=3, max_new=24, tree_nodes=8, calibration=2, calibration_tokens=24, hf_dynamic_questions=1,
            fp32_questions=2, fp32_max_new=16, fp32_hf_questions=1, max_len=512)


def _first_user_len(conv: list[dict]) -> int:
    return next((len(m["content"]) for m in conv if m["role"] == "user"), 0)


def run(args) -> None:
    import torch

    from plmtool.draft.config import DraftDataConfig, DrafterConfig, DraftTrainerConfig, EngineOptions
    from plmtool.draft.data import self_distill
    from plmtool.draft.bench.benchmark import (
        DEVICE_FAULT, engine_method, hf_generate_method, prepare_questions, render_markdown, run_benchmark, spec_bench_lines,
        summarize, tree_report,
    )
    from plmtool.draft.decoding.engine import SpeculativeEngine
    from plmtool.draft.setup import DrafterSetup, calibration_sequences, dynamic_pool_paths, setup_drafter, stop_token_ids
    from plmtool.draft.decoding.target import TargetRunner
    from plmtool.draft.train import train_drafter
    from plmtool.io import write_json, write_text
    from plmtool.models import load_model

    if args.tiny:
        for k, v in TINY.items():
            setattr(args, k, v)
    if not args.cudnn_sdpa and torch.cuda.is_available():
        # cuDNN attention is SDPA's first choice on H100/H200 with recent cuDNN; off = flash /
        # memory-efficient kernels (a bisection switch for attention-kernel faults)
        torch.backends.cuda.enable_cudnn_sdp(False)
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    _dynamic_sizes(args.dynamic_trees)  # a bad --dynamic-trees fails here, not after the training
    unknown = sorted(set(wanted) - set(ALL_METHODS))
    if unknown or "ar" not in wanted:
        raise SystemExit(f"--methods: needs ar and only {', '.join(ALL_METHODS)}; got {args.methods}")
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = _load_data(args.data)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    report: dict = {"command": " ".join(sys.argv), "args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "gpu": torch.cuda.get_device_name(0) if cuda else None, "torch": torch.__version__,
                    "phases": {}, "notes": [],
                    "cudnn": torch.backends.cudnn.version() if cuda else None}
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
    main_dtype = "bfloat16" if cuda else "float32"
    model, tok = load_model(SimpleNamespace(name_or_path=args.model, dtype=main_dtype, device=device))
    phase("load", t0)

    # ------------------------------------------------------------------ data: self-distillation
    t0 = time.perf_counter()
    convs = data["sharegpt"][: args.conversations]
    if args.distill:
        # similar prompt lengths per batch: less left padding in the batched generate()
        convs = sorted(convs, key=_first_user_len)
        convs = self_distill(model, tok, convs, work / "distill", max_new_tokens=args.distill_tokens, max_turns=1,
                             batch_size=args.distill_batch, max_prompt_tokens=512)
        convs = [convs[i] for i in torch.randperm(len(convs), generator=torch.Generator().manual_seed(0)).tolist()]
    report["train_data"] = {"conversations": len(convs), "self_distilled": bool(args.distill),
                            "distill_max_new_tokens": args.distill_tokens}
    phase("distill", t0)

    # ------------------------------------------------------------------ train both drafters, same budget
    trainer = DraftTrainerConfig(lr=args.lr, warmup_steps=min(50, max(args.steps // 10, 1)), max_steps=args.steps,
                                 batch_size=args.batch, eval_every=max(args.steps // 4, 1),
                                 # resumable every 250 steps: a command cut by its time limit loses little
                                 save_every=min(250, args.steps), log_every=50,
                                 cache_hidden=True, cache_hidden_max_gb=args.cache_gb, seed=0, labels=args.labels)
    dcfg = DraftDataConfig(max_seq_len=args.seq_len, heldout=args.heldout, min_assistant_tokens=8)
    kinds = {
        "medusa": DrafterConfig(kind="medusa", num_heads=args.heads, medusa_num_layers=1, share_lm_head=False),
        "amphista": DrafterConfig(kind="amphista", num_heads=args.heads, **_overrides(args.amphista)),
    }
    kinds = {k: v for k, v in kinds.items() if k in wanted}  # a bisection run may train only one
    report["training"] = {"trainer": vars(trainer), "data": vars(dcfg)}
    ckpts = {}
    for kind, cfg in kinds.items():
        t0 = time.perf_counter()
        if _finished(work / kind, cfg, trainer):  # in an earlier command with this --work: skip the re-tokenizing
            metrics = json.loads((work / kind / "train_metrics.json").read_text())
        else:
            if args.train_budget_s:  # what is left of the command's training budget, checkpointed at its end
                left = args.train_budget_s - (time.perf_counter() - t_start)
                trainer = dataclasses.replace(trainer, max_time_s=max(left, 1.0))
            metrics = train_drafter(model, tok, cfg, trainer, convs, work / kind, data_cfg=dcfg)
        if not metrics.get("finished", True):  # (runs trained before the time budget have no such key)
            report["training"][kind] = metrics
            save()
            log.warning("%s stopped at step %d of %d by --train-budget-s; rerun the same command (same --work) to resume",
                        kind, metrics["steps_done"], metrics["steps"])
            return
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

    def bench(label: str, dtype_model, methods_wanted: list[str], qs: list[dict], max_new: int, caps: dict,
              deadline: float | None, compile: bool, trees: dict | None, dynamic: dict | None = None) -> dict:
        """One pass: engines of our methods share one target runner (one compile per step shape);
        questions interleaved so every method decodes the same ones before the deadline. `trees`
        (method -> paths) and `dynamic` (method -> pool report) repeat an earlier pass's trees."""
        t_setup = time.perf_counter()
        runner = TargetRunner(dtype_model, args.max_len, compile=compile)
        graphs = bool(args.cuda_graphs)
        options = EngineOptions(cuda_graphs="auto" if graphs else "false", drafter_graph=bool(args.drafter_graph),
                                static_drafter=bool(args.static_drafter), compile=compile, sync_check=bool(args.sync_check))
        ar_engine = SpeculativeEngine(dtype_model, max_len=args.max_len, runner=runner, options=options)
        engines = {"ar": ar_engine}
        setups = {}
        if trees is None:  # auto trees from rank accuracies on the target's answers to second turns
            cal_prompts = [q["calibration_ids"] or q["prompt_ids"] for q in prepared][: args.calibration]
            cal = calibration_sequences(ar_engine, cal_prompts, args.calibration_tokens, stops)
            tree_spec = {k: f"auto:{args.tree_nodes}" for k in ckpts}
        else:
            cal, tree_spec = [], trees
        def drafter_engine(drafter, tree, prefill_graphs: bool = True, pool=None) -> SpeculativeEngine:
            return SpeculativeEngine(dtype_model, drafter, tree, max_len=args.max_len, runner=runner, dynamic_pool=pool,
                                     options=dataclasses.replace(options, prefill_graphs=prefill_graphs))

        for k, p in ckpts.items():
            if k in methods_wanted or any(m.startswith(k + "_") for m in methods_wanted):
                setups[k] = setup_drafter(dtype_model, p, tree_spec[k], cal, args.max_len, args.tree_accuracy)
                engines[k] = drafter_engine(setups[k].drafter, setups[k].tree)
        if trees is not None:  # the main pass's dynamic-tree methods again, with its trees and pools
            for name in [m for m in methods_wanted if m in (dynamic or {}) and dynamic[m]["kind"] in setups]:
                s, pool = setups[dynamic[name]["kind"]], dynamic[name]["pool"]
                setups[name] = DrafterSetup(s.name, s.drafter, trees[name], None, s.checkpoint, None, pool)
                engines[name] = drafter_engine(s.drafter, trees[name], pool=pool)

        def variants(suffix: str, nodes: int, table: str, pool: int = 0) -> list[str]:
            """The trained drafters again, as methods `<kind><suffix>`, with `nodes`-node trees
            built from accuracy table `table` (marginal or conditional); `pool` > 0: dynamic trees
            of that many nodes picked per step from a pool of `pool` paths."""
            from plmtool.draft.decoding.tree import resolve_tree

            names = []
            for k in [k for k in ckpts if k in setups and setups[k].measured is not None]:
                s = setups[k]
                acc = getattr(s.measured, table)
                tree = resolve_tree(f"auto:{nodes}", s.drafter.num_heads, acc)
                paths = dynamic_pool_paths(pool, tree, s.drafter.num_heads, acc)
                setups[k + suffix] = DrafterSetup(k, s.drafter, tree, acc, s.checkpoint, s.measured, paths)
                engines[k + suffix] = drafter_engine(s.drafter, tree, pool=paths)
                names.append(k + suffix)
            return names

        if trees is None:
            if args.tree_ablation:
                # the tree builder's A/B in the same run: trees from the other accuracy table
                # (marginal: independent heads, Medusa's assumption; conditional: given the prefix)
                other = "conditional" if args.tree_accuracy == "marginal" else "marginal"
                methods_wanted = methods_wanted + variants(f"_{other}_tree", args.tree_nodes, other)
            for nodes in _sizes(args.extra_trees):  # larger (or smaller) trees from the same table
                methods_wanted = methods_wanted + variants(f"_tree{nodes}", nodes, args.tree_accuracy)
            for nodes, pool in _dynamic_sizes(args.dynamic_trees):  # per-step trees picked from a pool
                methods_wanted = methods_wanted + variants(f"_dyn{nodes}", nodes, args.tree_accuracy, pool)
        ablate = [k.strip() for k in args.prefill_ablation.split(",") if k.strip()]
        unknown = [k for k in ablate if k not in engines or k not in methods_wanted]
        if unknown:  # a warning, not an exit: the drafters of this command are already trained
            log.warning("--prefill-ablation: %s not among this run's engines (%s); ignored", ", ".join(unknown),
                        ", ".join(k for k in engines if k in methods_wanted))
        if ablate and graphs and device == "cuda":
            # the padded prefill graphs' A/B in the same run: the same engines with eager prefills
            for k in [k for k in ablate if k in engines and k in methods_wanted]:
                drafted = engines[k].drafter is not None
                engines[k + "_eager_prefill"] = drafter_engine(engines[k].drafter, setups[k].tree if drafted else None,
                                                               prefill_graphs=False, pool=setups[k].pool if drafted else None)
                methods_wanted = methods_wanted + [k + "_eager_prefill"]
        methods = {}
        for name in methods_wanted:
            if name in engines:
                methods[name] = engine_method(engines[name], max_new, stops)
            elif name.startswith("hf_generate"):
                methods[name] = hf_generate_method(dtype_model, max_new, stops, tok.pad_token_id, static=name.endswith("static"))
        errors: dict[str, str] = {}
        res: dict = {"num_questions": len(qs),
                     "setup": {"device": device, "dtype": str(dtype_model.dtype).replace("torch.", ""),
                               "max_new_tokens": max_new, "runs": 1, "warmup": 1, "no_warmup": ["hf_generate"], "question_caps": caps,
                               "interleaved": True, "setup_s": round(time.perf_counter() - t_setup, 1),
                               "engine_options": dataclasses.asdict(options),
                               "engines": {k: {"cuda_graphs": e.cuda_graphs, "compiled_target_step": e.compiled,
                                               "drafter_graph": e.drafter_graph,
                                               "drafter_compiled": e.drafter_compiled,
                                               "static_drafter": e.drafter_step is not None,
                                               "prefill_graphs": e.prefill_graphs,
                                               "drafter_prefill_graphs": e.drafter_prefill_graphs,
                                               "dynamic_tree": e.dynamic,
                                               # greedy steps verified, committed and drafted on the device
                                               "greedy_loop": None if e.greedy_loop is None else
                                               ("graphs" if e.greedy_loop.graphs else "eager"),
                                               # relative errors of the compiled step's self-check, per step size
                                               "target_step_check": {name + str(p.n): {q: round(v, 5) for q, v in p.check_errors.items()}
                                                                     for name, p in (("", e.plain_step), ("", e.tree_step),
                                                                                     ("dynamic_", e.dynamic_step))
                                                                     if p is not None}}
                                           for k, e in engines.items()}},
                     "trees": {k: tree_report(s) for k, s in setups.items()}, "model": args.model, "skipped": errors}
        log.info("%s setup %.1fs: %s", label, res["setup"]["setup_s"], res["setup"]["engines"])
        report[label] = {**res, "partial": True}  # the engines' state is on record even if the pass dies
        save()

        def partial(records: dict) -> None:
            if records.get("ar"):  # after every question: a dead device still leaves what was decoded
                report[label] = {**res, **_summary(summarize, records), "partial": True}
                save()

        records = run_benchmark(methods, qs, torch.device(device), runs=1, warmup=1, question_caps=caps,
                                deadline=deadline, errors=errors, interleave=True, on_question=partial,
                                cold=["hf_generate"])
        fault = next((why for why in errors.values() if why.startswith(DEVICE_FAULT)), None)
        if fault:
            res["device_fault"] = fault
        if not records.get("ar"):  # the device died before every method finished one question
            report[label] = {**res, "methods": {}, "num_questions": 0}
            save()
            return report[label]
        res.update(_summary(summarize, records))
        res["num_questions"] = len(records["ar"])
        if not fault:  # after a device fault every further launch raises
            res["program_ms"] = program_times(engines, res["methods"])
        lines = []
        for name, recs in records.items():
            lines += spec_bench_lines(name, recs, tok, f"smollm2-135m-{label}")
        write_text(out / f"answers_{label}.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
        report[label] = res
        save()
        return res

    fp32_reserve = args.fp32_reserve_s if args.fp32_questions else 0.0
    end = t_start + args.budget_s if args.budget_s > 0 else None  # None: no deadline
    main_label = "bf16" if cuda else "fp32_main"
    methods = [m for m in ALL_METHODS if m in wanted]
    caps = {"hf_generate": args.hf_dynamic_questions}
    t0 = time.perf_counter()
    main = bench(main_label, model, methods, prepared, args.max_new, caps, end - fp32_reserve if end else None,
                 compile=args.compile and cuda, trees=None)
    phase("bench_main", t0)

    if args.fp32_questions and main.get("device_fault"):
        report["notes"].append(f"fp32 pass skipped: {main['device_fault']}")
    elif args.fp32_questions:
        t0 = time.perf_counter()
        trees = {k: t["choices"] for k, t in main["trees"].items()}
        dynamic = {k: {"kind": t["kind"], "pool": t["dynamic_pool"]["choices"]} for k, t in main["trees"].items()
                   if "dynamic_pool" in t}
        if cuda:
            del model
            torch.cuda.empty_cache()
            model32, _ = load_model(SimpleNamespace(name_or_path=args.model, dtype="float32", device=device))
            model32.requires_grad_(False)
        else:
            model32 = model
        bench("fp32", model32, [m for m in ("ar", "hf_generate", "medusa", "amphista") if m in wanted] + list(dynamic),
              prepared[: args.fp32_questions],
              args.fp32_max_new, {"hf_generate": args.fp32_hf_questions}, end, compile=False,
              trees=trees, dynamic=dynamic)
        phase("bench_fp32", t0)
    report["total_s"] = round(elapsed(), 1)
    save()
    md = []
    for key in ("bf16", "fp32_main", "fp32"):
        if key in report:
            md.append(f"## {key}\n\n" + render_markdown({**report[key], "model": "SmolLM2-135M-Instruct"}))
    table = summary_table(report)
    write_text(out / "report.md", f"# speculative decoding benchmark ({report['gpu'] or 'cpu'})\n\n{table}\n\n" + "\n".join(md))
    print("\n" + table)


def _finished(path: Path, cfg, trainer) -> bool:
    """Whether `path` holds a finished training run of exactly this drafter and trainer config."""
    import torch

    from plmtool.draft.train import CHECKPOINT, _config_key

    if not (path / "train_metrics.json").is_file() or not (path / CHECKPOINT).is_file():
        return False
    state = torch.load(path / CHECKPOINT, map_location="cpu", weights_only=False)
    return state["step"] == trainer.max_steps and state["config"] == _config_key(cfg, trainer)


def _sizes(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _overrides(items: list[str]) -> dict:
    """`key=value` strings -> {key: value}, values read as YAML (`stage_layers=[2,2]`, `use_auto_embedding=false`)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--amphista: expected key=value, got '{item}'")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _dynamic_sizes(text: str) -> list[tuple[int, int]]:
    """`N:M,...` -> [(nodes, pool paths)]; `N` alone means a pool of 4 N paths. Checked before any
    training: one pool per tree size (methods are named by N) and pools at least as large as their trees."""
    out = []
    for item in [x.strip() for x in text.split(",") if x.strip()]:
        nodes, _, pool = item.partition(":")
        n, m = int(nodes), int(pool) if pool else 4 * int(nodes)
        if m < n:
            raise SystemExit(f"--dynamic-trees {item}: the pool ({m} paths) is smaller than the tree ({n} nodes)")
        if any(n == k for k, _ in out):
            raise SystemExit(f"--dynamic-trees: {n} nodes given twice (methods are named <kind>_dyn{n})")
        out.append((n, m))
    return out


def program_times(engines: dict, methods: dict) -> dict:
    """Where each method's step time goes: its captured programs timed alone, against the time per
    step measured in the benchmark (1000 * accepted per step / total tokens per s over all
    questions); the rest is host work, the device waiting for it, and the prefills (amortised).
    `decode_step_ms` leaves out each question's time to its first token (the target's prefill);
    the drafter's prefill, which runs after the first token, stays in it.
    A compiled drafter step is also timed uncompiled (eager capture) for comparison."""
    from plmtool.draft.decoding.drafter_step import DrafterProgram
    from plmtool.draft.bench.step_timing import drafter_program_time, engine_program_times, rest_of_step

    out = {}
    for name, e in engines.items():
        t = engine_program_times(e)
        d = e.drafter_step
        if d is not None and d.compiled:
            eager = DrafterProgram(e.drafter, e.drafter.new_cache(1, e.max_len, e.device, e.runner.dtype), d.n,
                                   e.runner.hidden_size, e.device, e.runner.dtype, cuda_graph=d.graph is not None)
            t["drafter_uncompiled_ms"] = round(drafter_program_time(eager, e.device), 4)
            del eager
        m = methods.get(name)
        if m and m.get("tokens_per_s_total"):
            t["measured_step_ms"] = round(1000 * m["mean_accepted"] / m["tokens_per_s_total"], 4)
            t["host_and_other_ms"] = round(rest_of_step(t, t["measured_step_ms"]), 4)
            if m.get("decode_time_s") and m.get("steps"):  # the same without the prefills (to the first token)
                t["decode_step_ms"] = round(1000 * m["decode_time_s"] / m["steps"], 4)
                t["host_after_prefill_ms"] = round(rest_of_step(t, t["decode_step_ms"]), 4)
                t["first_token_ms"] = round(m["first_token_ms"], 3)
        out[name] = t
    log.info("program times (ms): %s", out)
    return out


def _summary(summarize, records: dict) -> dict:
    s = summarize(records)
    for m in s["methods"].values():  # keep report.json small: first divergences only
        m["divergences"] = m.get("divergences", [])[:20]
    return s


def summary_table(report: dict) -> str:
    """A short plain-text table of what matters: speed, acceptance, identity, training, phases."""
    lines = []
    for key in ("bf16", "fp32_main", "fp32"):
        res = report.get(key)
        if not res:
            continue
        lines.append(f"[{key}] {res.get('num_questions')} questions, max_new {res['setup']['max_new_tokens']}, "
                     f"engines {json.dumps(res['setup']['engines'])}")
        lines.append(f"{'method':<20}{'q':>4}{'tok/s':>9}{'acc/step':>10}{'x ar':>8}{'x hf_st':>9}{'diverged':>10}")
        for name, m in res["methods"].items():
            sp = res.get("speedups", {}).get(name, {})
            fmt = lambda b: f"{sp[b]:.2f}" if b in sp else ("1" if b == name else "-")  # noqa: E731
            lines.append(f"{name:<20}{m['questions']:>4}{m['tokens_per_s']:>9.1f}{m['mean_accepted']:>10.2f}"
                         f"{fmt('ar'):>8}{fmt('hf_generate_static'):>9}{m['divergent_questions']:>6} of {m['questions']}")
        for name, t in res.get("trees", {}).items():
            if "head_top1" in t:
                lines.append(f"  {name} tree {t['nodes']} nodes, depth {t['max_depth']}: rank-0 accuracy per head "
                             f"{t['head_top1']} (given the prefix {t.get('head_top1_given_prefix')}), per depth "
                             f"{t['per_depth']}, expected accepted/step conditional "
                             f"{t.get('expected_accept_length_conditional')} / independent heads "
                             f"{t.get('expected_accept_length_independent')}")
        for name, t in res.get("program_ms", {}).items():
            lines.append(f"  {name} ms: {json.dumps(t)}")
        for name, why in res.get("skipped", {}).items():
            lines.append(f"  skipped {name}: {why}")
        if res.get("device_fault"):
            lines.append(f"  pass stopped early: {res['device_fault']}")
    for kind in ("medusa", "amphista"):
        t = report.get("training", {}).get(kind)
        if t:
            lines.append(f"train {kind}: {t.get('seconds')}s, held-out top-1 per head {t.get('heads', {}).get('top1') if isinstance(t.get('heads'), dict) else t.get('heads')}")
    lines.append(f"phases (s): {json.dumps(report['phases'])}, total {report.get('total_s')}")
    return "\n".join(lines)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("plmtool").setLevel(logging.INFO)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare")
    pp.add_argument("--out", required=True)
    pp.add_argument("--sharegpt", type=int, default=4000)
    pp.add_argument("--first-exchange", type=int, default=1, help="keep only the first user/assistant exchange")
    pp.add_argument("--max-chars", type=int, default=0,
                    help="cut each conversation after this many characters of content (0: keep all)")
    pr = sub.add_parser("run")
    pr.add_argument("--data", required=True)
    pr.add_argument("--model", default="smollm2-135m")
    pr.add_argument("--out", required=True)
    pr.add_argument("--work", default="/tmp/draft_bench_work")
    pr.add_argument("--tiny", action="store_true", help="CPU end-to-end check at tiny size (overrides sizes)")
    pr.add_argument("--conversations", type=int, default=4000)
    pr.add_argument("--distill", type=int, default=1)
    pr.add_argument("--distill-tokens", type=int, default=256)
    pr.add_argument("--distill-batch", type=int, default=2000)
    pr.add_argument("--heads", type=int, default=4)
    pr.add_argument("--amphista", nargs="*", default=[], metavar="KEY=VALUE",
                    help="Amphista drafter settings other than conf/draft/amphista.yaml's (e.g. stage_layers=[2,2] "
                         "auto_embedding_layers=2); part of the drafter's config, so a changed one is retrained")
    pr.add_argument("--steps", type=int, default=1000)
    pr.add_argument("--batch", type=int, default=8)
    pr.add_argument("--seq-len", type=int, default=1024)
    pr.add_argument("--lr", type=float, default=1e-3)
    pr.add_argument("--heldout", type=int, default=32)
    pr.add_argument("--questions", type=int, default=80)
    pr.add_argument("--max-new", type=int, default=256)
    pr.add_argument("--max-len", type=int, default=2048)
    pr.add_argument("--tree-nodes", type=int, default=64)
    pr.add_argument("--extra-trees", default="",
                    help="comma-separated node budgets: every drafter also decodes with trees of these sizes "
                         "(methods <kind>_tree<N>), from the same accuracy table")
    pr.add_argument("--dynamic-trees", default="",
                    help="comma-separated N:M: every drafter also decodes with dynamic trees of N nodes picked at each "
                         "greedy step from a pool of M paths (built like an auto tree of M nodes) by the drafter's "
                         "probabilities (methods <kind>_dyn<N>; M defaults to 4 N)")
    pr.add_argument("--train-budget-s", type=float, default=0.0,
                    help="a training budget in seconds since the command's start: a drafter's training loop stops "
                         "with a checkpoint once it is used up (tokenizing the drafter's data before its loop comes on "
                         "top), the report is written and the command exits; the same command (same --work) resumes "
                         "(0: no budget)")
    pr.add_argument("--cache-gb", type=float, default=8.0,
                    help="trainer.cache_hidden_max_gb: keep the target's hidden states (and labels) of every training "
                         "conversation on the device after their first use when they fit this many GB (epochs 2+ then "
                         "skip the target's forward)")
    pr.add_argument("--prefill-ablation", default="",
                    help="comma-separated methods (e.g. ar,amphista_tree256) to decode also with eager prefills "
                         "(methods <name>_eager_prefill), where prefills are graphs")
    pr.add_argument("--labels", default="data", choices=["data", "target"],
                    help="what the heads learn (trainer.labels): the data's tokens or the target's own greedy "
                         "predictions; 'data' by default here so that the commands of runs 1-8 reproduce")
    pr.add_argument("--calibration", type=int, default=8)
    pr.add_argument("--tree-accuracy", default="marginal", choices=["marginal", "conditional"])
    pr.add_argument("--tree-ablation", type=int, default=1,
                    help="also decode with trees from the other accuracy table (<kind>_<other>_tree)")
    pr.add_argument("--calibration-tokens", type=int, default=128)
    pr.add_argument("--compile", type=int, default=1, help="torch.compile the target step before capture (GPU)")
    pr.add_argument("--cuda-graphs", type=int, default=1, help="0: no CUDA graphs at all (target and drafter eager)")
    pr.add_argument("--drafter-graph", type=int, default=1, help="0: drafter step eager (target steps still captured)")
    pr.add_argument("--static-drafter", type=int, default=1,
                    help="0: the drafter's variable-shape eager step() (no step_static, no drafter graph)")
    pr.add_argument("--cudnn-sdpa", type=int, default=1, help="0: disable cuDNN attention in SDPA (flash / mem-efficient)")
    pr.add_argument("--sync-check", type=int, default=0,
                    help="1: synchronise after every step so a device fault names the program that caused it (slower)")
    pr.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated subset (ar is required)")
    pr.add_argument("--hf-dynamic-questions", type=int, default=2, help="no warm-up: nothing to compile or capture")
    pr.add_argument("--fp32-questions", type=int, default=3)
    pr.add_argument("--fp32-max-new", type=int, default=128)
    pr.add_argument("--fp32-hf-questions", type=int, default=1)
    pr.add_argument("--budget-s", type=float, default=0,
                    help="stop decoding by this many seconds since the start, all methods after the same question "
                         "(0: no deadline; 545 fits a 10-minute command limit)")
    pr.add_argument("--fp32-reserve-s", type=float, default=30, help="kept for the fp32 pass at the end")
    args = p.parse_args()
    prepare(args) if args.cmd == "prepare" else run(args)


if __name__ == "__main__":
    main()
