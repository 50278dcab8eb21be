"""GPU benchmark of adaptive semantic space learning on the embedded ShareGPT conversations.

Held-out loss (assistant tokens) and training time of: the base model, one LoRA on 100% of the
pool (`full`), on a random 10% (`random`), on the redistributed 10% (`redistributed`), the routed
per-cluster experts (`routed`) and the oracle expert per held-out group. The held-out split is
cut before clustering and never trained on. Every LoRA uses the same hyper-parameters and trains
for the same number of epochs over its own data (the same budget per sample).

Two steps, because the GPU machine has no hydra / datasets and no network:

    # on the CPU side: first user->assistant exchanges of ShareGPT, texts cut, gzipped JSONL
    python scripts/bench_experts.py prepare --limit 10500 --out .bench/experts/sharegpt.jsonl.gz
    # on the GPU machine (plain plmtool modules only)
    python scripts/bench_experts.py run --data .bench/experts/sharegpt.jsonl.gz --model /tmp/smollm2.gguf --out $OUT

`run` writes `$OUT/bench_experts.json` after every finished stage (load, redistribution, base
loss, then each trained unit with its held-out loss), so a run cut short keeps what finished.
Units run cheapest first (redistributed, random, the experts, then full): every adapter starts
from the same frozen base and the same seed, so the order changes nothing but which results exist
if time runs out; a warm-up adapter absorbs the first-step CUDA setup so no unit's time pays it.
A unit whose projected end (from the measured training throughput) would pass --time-budget
seconds is skipped and recorded as such rather than cut mid-way.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

STARTED = time.perf_counter()
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


def elapsed() -> float:
    return time.perf_counter() - STARTED


class Results:
    """The benchmark's JSON, rewritten atomically after every stage."""

    def __init__(self, path: Path, head: dict):
        self.path, self.data = path, {**head, "stages_done": [], "eval": {}, "train_seconds": {}, "units": {}}
        self.save()

    def stage(self, name: str, **values) -> None:
        self.data.update(values)
        self.data["stages_done"].append(name)
        self.data["elapsed_s"] = round(elapsed(), 1)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)


def run(args) -> None:
    import numpy as np
    import torch
    import transformers

    from plmtool.experts import run_redistribute
    from plmtool.experts.config import RedistributeConfig
    from plmtool.experts.lora import BASE, add_adapters, lora_config, train_adapter
    from plmtool.experts.losses import encoded_losses, mean_loss
    from plmtool.experts.routed import expert_name
    from plmtool.experts.router import Router
    from plmtool.experts.samples import read_samples
    from plmtool.experts.tokenize import encode
    from plmtool.models import load_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log = logging.getLogger("bench")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cuda = torch.cuda.is_available()
    res = Results(out / "bench_experts.json", {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "gpu": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "args": vars(args)})

    # 1. model (a GGUF path is dequantized once and cached outside the work dir)
    data = work / "sharegpt.jsonl"
    with gzip.open(args.data, "rt", encoding="utf-8", newline="\n") as f:
        # JSONL lines end at "\n" only: str.splitlines() would also cut at U+2028, U+0085, ...
        lines = [line.rstrip("\n") for line in f if line.strip()]
    data.write_text("\n".join(lines[: args.limit] if args.limit else lines) + "\n", encoding="utf-8")
    t = time.perf_counter()
    model, tok = load_model(SimpleNamespace(name_or_path=args.model, dtype="float32", device="auto", cache_dir=args.model_cache or None))
    res.stage("load", model_load_s=round(time.perf_counter() - t, 1))

    # 2. redistribution: held-out split first, then embed, need signal, cluster, density, select
    o = RedistributeConfig(data=str(data), heldout=args.heldout, k=args.k, budget=args.budget, need=args.need,
                           max_len=args.max_len, max_prompt_len=args.max_len // 2, embed_max_len=256,
                           embed_batch_size=args.eval_batch_size, batch_size=args.eval_batch_size, plot=True)
    d = work / "D"
    t = time.perf_counter()
    red = run_redistribute.run(o, d, args.seed, lambda: (model, tok), "smollm2-135m", None)
    if (d / "semantic_space.png").is_file():
        shutil.copy(d / "semantic_space.png", out / "semantic_space.png")
    shutil.copy(d / "manifest.jsonl", out / "manifest.jsonl")
    res.stage("redistribute", redistribute_s=round(time.perf_counter() - t, 1), redistribution=red)

    # 3. token ids: every pool sample once (shared by all units), the held-out set and its routes
    t = time.perf_counter()
    mpl = args.max_len // 2
    pool = read_samples(d / "samples.jsonl")
    enc_of = {s["id"]: encode(tok, s["messages"], args.max_len, mpl) for s in pool}
    held = read_samples(d / "heldout.jsonl")
    held_enc = [encode(tok, s["messages"], args.max_len, mpl) for s in held]
    router = Router.load(d / "centroids.npy")
    routes = router.route(np.load(d / "heldout_embeddings.npy"))
    k = router.k
    experts = [expert_name(c) for c in range(k)]
    files = {"redistributed": "selected.jsonl", "random": "random.jsonl", "full": "samples.jsonl",
             **{e: f"shards/{e}.jsonl" for e in experts}}
    unit_ids = {u: [s["id"] for s in read_samples(d / f)] for u, f in files.items()}
    res.stage("encode", encode_s=round(time.perf_counter() - t, 1), heldout=len(held),
              heldout_tokens=int(sum(sum(x != -100 for x in e["labels"]) for e in held_enc)),
              heldout_per_cluster=np.bincount(routes, minlength=k).tolist(),
              unit_samples={u: len(v) for u, v in unit_ids.items()})

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    cfg = lora_config(args.r, 2 * args.r, args.dropout, "all-linear")
    hp = dict(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, grad_accum=1, max_steps=None, warmup_ratio=0.03,
              weight_decay=0.0, grad_clip=1.0, seed=args.seed, bf16=cuda, log_every=25)
    # warm-up adapter: cuBLAS / autocast / allocator setup happens here, not in the first timed unit
    t = time.perf_counter()
    model = add_adapters(model, ["warmup"], cfg)
    some = [enc_of[i] for i in unit_ids["random"][: 2 * args.batch_size]]
    train_adapter(model, "warmup", some, pad, **{**hp, "max_steps": 2, "log_every": 0})
    res.stage("warmup", warmup_s=round(time.perf_counter() - t, 1))

    losses: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def heldout_loss(name: str, adapter: str) -> dict:
        t = time.perf_counter()
        losses[name] = encoded_losses(model, held_enc, pad, args.eval_batch_size, [adapter] * len(held_enc),
                                      f"held-out loss: {name}", autocast=cuda)
        per = {str(g): mean_loss(*losses[name], routes == g) for g in range(k) if (routes == g).any()}
        return {"heldout_loss": mean_loss(*losses[name]), "per_cluster": per,
                "macro_over_clusters": float(np.mean(list(per.values()))), "eval_s": round(time.perf_counter() - t, 1)}

    # 4. base model
    base = heldout_loss("base", BASE)
    res.data["units"]["base"] = base
    res.data["eval"]["base"] = base["heldout_loss"]
    res.stage("base")

    # 5. units, cheapest first; each: train (timed alone), then its held-out loss
    trained_samples, trained_s, last_eval_s = 0.0, 0.0, base["eval_s"]
    for u in ["redistributed", "random", *experts, "full"]:
        n = len(unit_ids[u])
        work_samples = n * args.epochs
        unit_hp = hp
        if args.budget_mode == "steps" and u != "full":
            # equal optimizer steps: every unit gets the full-data unit's step count (more
            # epochs over its smaller data) - an ablation beside the equal-epochs default
            full_steps = max(1, math.ceil(len(unit_ids["full"]) * args.epochs / args.batch_size))
            unit_hp = {**hp, "epochs": full_steps * args.batch_size / max(1, n), "max_steps": full_steps}
            work_samples = full_steps * args.batch_size
        if trained_s > 0 and args.time_budget:
            projected = elapsed() + work_samples / (trained_samples / trained_s) + last_eval_s + 5
            if projected > args.time_budget:
                log.warning("skipping %s: projected end %.0f s > --time-budget %s s", u, projected, args.time_budget)
                res.data["units"][u] = {"skipped": f"projected end {projected:.0f} s > time budget {args.time_budget} s"}
                res.stage(f"skip {u}")
                continue
        model = add_adapters(model, [u], cfg)
        stats = train_adapter(model, u, [enc_of[i] for i in unit_ids[u]], pad, **unit_hp)
        trained_samples += work_samples
        trained_s += stats["seconds"]
        ev = heldout_loss(u, u)
        last_eval_s = ev["eval_s"]
        res.data["units"][u] = {"train": stats, **ev}
        res.data["train_seconds"][u] = stats["seconds"]
        if not u.startswith("expert_"):
            res.data["eval"][u] = ev["heldout_loss"]
        if u == experts[-1] and all(e in losses for e in experts):
            routed_oracle(res, losses, experts, routes, k, mean_loss, np)
        if cuda:
            res.data["max_memory_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        res.stage(u)

    ev = res.data["eval"]
    if ev.get("full") is not None and ev["base"] - ev["full"] > 0:
        gain = ev["base"] - ev["full"]
        res.data["recovery_of_full_gain"] = {n: (ev["base"] - v) / gain for n, v in ev.items() if n not in ("base", "full")}
    res.stage("done")
    table(res.data, args)


def routed_oracle(res, losses, experts, routes, k, mean_loss, np) -> None:
    """Routed (top-1 nearest centroid) and oracle (best expert per held-out group) losses."""
    pick = lambda choice: tuple(np.array([losses[experts[int(choice(r))]][j][i] for i, r in enumerate(routes)]) for j in (0, 1))
    losses["routed"] = pick(lambda r: r)
    best = {g: int(np.argmin([mean_loss(*losses[e], routes == g) or np.inf for e in experts])) for g in range(k) if (routes == g).any()}
    losses["oracle"] = pick(lambda r: best[int(r)])
    for name in ("routed", "oracle"):
        per = {str(g): mean_loss(*losses[name], routes == g) for g in range(k) if (routes == g).any()}
        res.data["units"][name] = {"heldout_loss": mean_loss(*losses[name]), "per_cluster": per,
                                   "macro_over_clusters": float(np.mean(list(per.values())))}
        res.data["eval"][name] = mean_loss(*losses[name])
    res.data["train_seconds"]["routed"] = round(sum(res.data["units"][e]["train"]["seconds"] for e in experts), 3)
    per_sample = np.argmin(np.stack([s / np.maximum(t, 1) for s, t in (losses[e] for e in experts)]), axis=0)
    res.data["router"] = {"oracle_expert_per_group": {str(g): b for g, b in best.items()},
                          "agreement_group": float(np.mean([best[g] == g for g in best])),
                          "agreement_per_sample_oracle": float(np.mean(per_sample == routes))}


def table(r: dict, args) -> None:
    red, units, rec = r["redistribution"], r["units"], r.get("recovery_of_full_gain", {})
    n_of = {**r["unit_samples"], "routed": r["unit_samples"]["redistributed"], "oracle": r["unit_samples"]["redistributed"]}
    print(f"\n{r['gpu']}, torch {r['torch']}; pool {red['total']}, held-out {red['heldout']} ({r['heldout_tokens']} reply tokens), "
          f"K={red['k']}, budget {args.budget}, max_len {args.max_len}, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, budget mode {args.budget_mode}")
    print("| model | train samples | held-out loss | mean over clusters | share of full-data gain | train s |")
    print("|---|---|---|---|---|---|")
    for name in ("base", "full", "random", "redistributed", "routed", "oracle"):
        u = units.get(name)
        if u is None or "skipped" in u:
            print(f"| {name} | {n_of.get(name, '')} | {'skipped' if u else 'not run'} | | | |")
            continue
        share = rec.get(name)
        print(f"| {name} | {n_of.get(name, '') if name != 'base' else 0} | {u['heldout_loss']:.4f} | {u['macro_over_clusters']:.4f} | "
              f"{'' if share is None else f'{share:.1%}'} | {r['train_seconds'].get(name, '')} |")
    if "router" in r:
        print(f"router agreement with the oracle expert per group: {r['router']['agreement_group']:.2f}")
    print(f"timings: load {r['model_load_s']} s, redistribute {r['redistribute_s']} s, encode {r['encode_s']} s, "
          f"total {r['elapsed_s']} s; peak GPU memory {r.get('max_memory_allocated_gb', '-')} GB")


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
    r.add_argument("--model-cache", default="/tmp/bench_experts_cache", help="where a GGUF model is dequantized once")
    r.add_argument("--limit", type=int, default=None, help="use only the first N prepared samples")
    r.add_argument("--heldout", type=float, default=0.05)
    # ~1,000 redistributed samples: K=4 leaves each expert ~250 of them (K=8 would leave ~125,
    # i.e. 2 optimizer steps per epoch at batch 64)
    r.add_argument("--k", type=int, default=4)
    r.add_argument("--budget", type=float, default=0.1)
    r.add_argument("--need", default="loss")
    # 384 tokens (prompt <= 192) keep 58% of the first exchanges whole (512: 85%) at 3/4 of the padded tokens
    r.add_argument("--max-len", type=int, default=384)
    r.add_argument("--lr", type=float, default=4e-4)
    # 2 epochs for every unit: the 10% subsets get ~31 optimizer steps instead of ~16
    r.add_argument("--epochs", type=float, default=2.0)
    r.add_argument("--budget-mode", choices=("epochs", "steps"), default="epochs",
                   help="epochs: the same epochs per sample for every unit (the issue's comparison); "
                        "steps: every unit gets the full-data unit's number of optimizer steps")
    # batch 16 ran at ~4 steps/s on an H200 (launch-bound: 210 LoRA-wrapped linears)
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--eval-batch-size", type=int, default=64)
    r.add_argument("--r", type=int, default=16)
    r.add_argument("--dropout", type=float, default=0.05)
    r.add_argument("--time-budget", type=float, default=300.0, help="skip a unit projected to end later (s since start; 0: never)")
    r.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    prepare(args) if args.cmd == "prepare" else run(args)


if __name__ == "__main__":
    main()
