"""GPU benchmark of adaptive semantic space learning on the embedded ShareGPT conversations.

Held-out loss (assistant tokens) and training time of: the base model, one LoRA on 100% of the
pool (`full`), on a random 10% (`random`), on the redistributed 10% (`redistributed`), the routed
per-cluster experts (`routed`) and the oracle expert per held-out group. The held-out split is
cut before clustering and never trained on. Every LoRA trains for the same number of epochs over
its own data (the same budget per sample).

Two steps, because the GPU machine has no hydra / datasets and no network:

    # on the CPU side: first user->assistant exchanges of ShareGPT, texts cut, gzipped JSONL
    python scripts/bench_experts.py prepare --limit 10500 --out .bench/experts/sharegpt.jsonl.gz
    # on the GPU machine (plain plmtool modules only)
    python scripts/bench_experts.py run --data .bench/experts/sharegpt.jsonl.gz --model /tmp/smollm2.gguf --out $OUT
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def prepare(args) -> None:
    from plmtool.experts.samples import load_samples

    samples = load_samples("sharegpt", limit=args.limit, turns="first")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(out, "wt", encoding="utf-8") as f:
        for s in samples:
            user, reply = s["messages"][0]["content"], s["messages"][1]["content"]
            # texts beyond the token window are never seen; cutting them keeps the file small
            row = {"id": s["id"], "messages": [{"role": "user", "content": user[: args.max_chars]},
                                               {"role": "assistant", "content": reply[: args.max_chars]}]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(samples)} samples -> {out} ({out.stat().st_size / 1e6:.1f} MB)")


def run(args) -> None:
    import torch

    from plmtool.experts import run_redistribute, run_train
    from plmtool.experts.config import LoraOptions, RedistributeConfig, TrainExpertsConfig
    from plmtool.models import load_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    data = work / "sharegpt.jsonl"
    work.mkdir(parents=True)
    with gzip.open(args.data, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    data.write_text("\n".join(lines[: args.limit] if args.limit else lines) + "\n", encoding="utf-8")
    model_cfg = SimpleNamespace(name_or_path=args.model, dtype="float32", device="auto", cache_dir=str(work / "cache"))
    t = time.perf_counter()
    loaded = load_model(model_cfg)  # dequantizes the GGUF once (cached in work/cache)
    load_s = time.perf_counter() - t

    def load():
        return loaded

    o = RedistributeConfig(data=str(data), heldout=args.heldout, k=args.k, budget=args.budget, need=args.need,
                           max_len=args.max_len, max_prompt_len=args.max_len // 2, embed_max_len=256,
                           embed_batch_size=64, batch_size=64, plot=True)
    d, e = work / "D", work / "E"
    t = time.perf_counter()
    red = run_redistribute.run(o, d, args.seed, load, "smollm2-135m", work / "emb-cache")
    red_s = time.perf_counter() - t
    trainer = SimpleNamespace(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, grad_accum=1, max_steps=None,
                              warmup_steps=0, weight_decay=0.0, grad_clip=1.0, precision="auto", max_seq_len=args.max_len,
                              log_every=50)
    to = TrainExpertsConfig(redistribution=str(d), lora=LoraOptions(r=args.r, alpha=2 * args.r, dropout=0.05),
                            eval_batch_size=64, top_k=1)
    t = time.perf_counter()
    tr = run_train.run(to, trainer, e, args.seed, load, "smollm2-135m")
    train_s = time.perf_counter() - t
    result = {
        "date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "args": vars(args), "model_load_s": round(load_s, 1),
        "redistribute_s": round(red_s, 1), "train_and_eval_s": round(train_s, 1), "redistribute": red, "train": tr,
    }
    (out / "bench_experts.json").write_text(json.dumps(result, indent=2, default=str))
    if (d / "semantic_space.png").is_file():
        shutil.copy(d / "semantic_space.png", out / "semantic_space.png")
    ev, secs, rec = tr["eval"], tr["train_seconds"], tr.get("recovery_of_full_gain", {})
    n_of = {"full": red["total"], "random": red["selected"], "redistributed": red["selected"], "routed": red["selected"]}
    print(f"\nGPU {result['gpu']}; pool {red['total']}, held-out {red['heldout']}, K={red['k']}, budget {args.budget}")
    print("| model | train samples | held-out loss | share of full-data gain | train s |")
    print("|---|---|---|---|---|")
    for name, v in ev.items():
        r = rec.get(name)
        print(f"| {name} | {n_of.get(name, '')} | {v:.4f} | {'' if r is None else f'{r:.1%}'} | {secs.get(name, '')} |")
    print(f"router agreement with oracle (groups): {tr.get('router', {}).get('agreement_group')}")
    print(f"timings: load {load_s:.1f}s, redistribute {red_s:.1f}s ({red['seconds']}), train+eval {train_s:.1f}s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--limit", type=int, default=10500)
    p.add_argument("--max-chars", type=int, default=1500)
    p.add_argument("--out", default=".bench/experts/sharegpt.jsonl.gz")
    r = sub.add_parser("run")
    r.add_argument("--data", default=".bench/experts/sharegpt.jsonl.gz")
    r.add_argument("--model", default="/tmp/smollm2.gguf")
    r.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    r.add_argument("--work", default="/tmp/bench_experts")
    r.add_argument("--heldout", type=float, default=0.05)
    r.add_argument("--k", type=int, default=8)
    r.add_argument("--budget", type=float, default=0.1)
    r.add_argument("--need", default="loss")
    r.add_argument("--max-len", type=int, default=512)
    r.add_argument("--lr", type=float, default=4e-4)
    r.add_argument("--epochs", type=float, default=1.0)
    # batch 16 ran at ~4 steps/s on an H200 (launch-bound: 210 LoRA modules); 64 keeps the step
    # count of the full-data run near 150 so that the whole benchmark fits in a few minutes
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--limit", type=int, default=None, help="use only the first N prepared samples")
    r.add_argument("--r", type=int, default=16)
    r.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    prepare(args) if args.cmd == "prepare" else run(args)


if __name__ == "__main__":
    main()
