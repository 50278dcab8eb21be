"""GPU benchmark of adaptive semantic space learning on the embedded ShareGPT conversations.

Held-out loss (assistant tokens) and training time of: the base model, one LoRA on 100% of the
pool (`full`), on a random 10% (`random`), on the redistributed 10% (`redistributed`), the routed
per-cluster experts (`routed`) and the oracle expert per held-out group. The held-out split is
cut before clustering and never trained on. Every LoRA uses the same hyper-parameters and trains
for the same number of epochs over its own data (the same budget per sample).

`--expert-data` says what the experts train on: `redistributed` (default) each cluster's share of
the redistributed 10% (units expert_<k>, results `routed` / `oracle`); `cluster` every pool sample
of its cluster, so the experts together see the full-data unit's data (units expert_<k>_cluster,
results `routed_cluster` / `oracle_cluster`); `both` trains and evaluates the two kinds side by side.

Two steps, because the GPU machine has no hydra / datasets and no network:

    # on the CPU side: first user->assistant exchanges of ShareGPT, texts cut, gzipped JSONL
    python scripts/bench_experts.py prepare --limit 10500 --out .bench/experts/sharegpt.jsonl.gz
    # on the GPU machine (plain plmtool modules only)
    python scripts/bench_experts.py run --data .bench/experts/sharegpt.jsonl.gz --model /tmp/smollm2.gguf --out $OUT

`run` writes `$OUT/bench_experts.json` after every finished stage (load, redistribution, base
loss, then each trained unit with its held-out loss), so a run cut short keeps what finished.
Units run cheapest first (redistributed, random, the experts on the redistributed shares, the
experts on whole clusters - together about the cost of full - then full): every adapter starts
from the same frozen base with the same hyper-parameters; initialisation and dropout draw from one
random stream that runs on from unit to unit, so the order decides each unit's random draws and
which results exist if time runs out. A warm-up adapter absorbs the first-step CUDA setup so no
unit's time pays it.

A run may take several commands. A unit that cannot finish before --time-budget seconds (since
the command's start, less the time of one held-out evaluation) trains until then, checkpoints,
is written to the JSON as in progress, and the command exits 0 saying to rerun it. Rerunning
the same command (same --work) resumes: the state lives in --work (`bench_experts.json`, the
redistribution, the token ids, per-sample held-out losses, unit checkpoints), so finished stages
and units are not redone and --out may be a new, empty folder each time. A work dir holding a
run of other arguments is refused (--fresh discards it). Arguments that may differ between the
commands of one run: --out, --model-cache, --time-budget, --over-budget, --checkpoint-every.
`--over-budget skip` keeps the earlier behaviour instead: a unit whose projected end passes the
budget is skipped (and tried again by the next command).
A resumed unit ends exactly where an uninterrupted one would (same data order, learning-rate
schedule and dropout draws; see plmtool.experts.lora.train_adapter).

JSON fields beyond the stage results (top-level stage values, e.g. model_load_s, are those of
the command that first ran the stage):
    data_sha256               of the --data file (a resumed run must read the same data)
    commands                  one entry per command of the run: date, gpu, time_budget, stages
                              (those it ran), the timings (*_s) of those stages, elapsed_s, and
                              stopped_in (the unit it stopped in, or null)
    elapsed_s                 wall seconds of all commands together
    units.<u>.in_progress     while unit u is unfinished: steps_done, steps, train_s (so far)
    units.<u>.train           also: finished, steps_done, pieces (one per command that trained
                              the unit: steps [from, to], seconds, device), checkpoint_s (time
                              spent writing checkpoints, not counted in seconds)
A unit's `seconds` (and `train_seconds.<u>`) sums the training time of its pieces; when the
commands ran on different GPUs the pieces' devices say so and the log warns.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import math
import os
import pickle
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

STARTED = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# arguments that may change between the commands of one run (everything else must match to resume)
PER_COMMAND_ARGS = {"cmd", "out", "work", "model_cache", "time_budget", "over_budget", "checkpoint_every", "fresh"}
# arguments added since runs were stored: a stored run without one ran as its value here says
ARGS_ADDED_LATER = {"expert_data": "redistributed"}
EVAL_RESERVE_S = 10.0  # beyond one held-out evaluation: checkpoint, JSON, table
# --expert-data: the kinds of experts trained (plmtool.experts.routed.EXPERT_DATA), cheapest first
EXPERT_KINDS = {"redistributed": ["redistributed"], "cluster": ["cluster"], "both": ["redistributed", "cluster"]}


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
    """The benchmark's JSON, rewritten atomically after every stage.

    Written to --out and to the work dir: the work dir's copy is what a resumed command continues
    from (--out may be a fresh folder each command). The top-level values of a stage are those of
    the command that ran it first; each command's own timings are in its entry of `commands`.
    """

    def __init__(self, paths: list[Path], data: dict, command: dict):
        self.paths, self.data = paths, data
        self.data.setdefault("commands", []).append(command)
        self.command = command
        self.save()

    def done(self, name: str) -> bool:
        return name in self.data["stages_done"]

    def stage(self, name: str, **values) -> None:
        # every command keeps its own timings; the other values are the run's, set once
        self.command.update({k: v for k, v in values.items() if k.endswith("_s")})
        if not self.done(name):
            self.data.update(values)
            self.data["stages_done"].append(name)
        self.command["stages"].append(name)
        self.save()

    def save(self) -> None:
        from plmtool.io import write_text

        self.command["elapsed_s"] = round(elapsed(), 1)
        self.data["elapsed_s"] = round(sum(c.get("elapsed_s", 0.0) for c in self.data["commands"]), 1)
        text = json.dumps(self.data, indent=2, default=str)
        for p in self.paths:
            write_text(p, text)


def run_args(args) -> dict:
    """The arguments that define a run (JSON-normalised, as stored in the results)."""
    return {k: v for k, v in json.loads(json.dumps(vars(args), default=str)).items() if k not in PER_COMMAND_ARGS}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def open_results(args, out: Path, work: Path, head: dict, command: dict, log) -> Results:
    """Results of a new run, or of the run in `work` when it has the same arguments and data."""
    state = work / "bench_experts.json"
    paths = [out / "bench_experts.json", state]
    if state.is_file() and not args.fresh:
        data = json.loads(state.read_text())
        theirs = {**ARGS_ADDED_LATER, **{k: v for k, v in data["args"].items() if k not in PER_COMMAND_ARGS},
                  "data_sha256": data.get("data_sha256")}
        mine = {**run_args(args), "data_sha256": head["data_sha256"]}
        diff = [f"{k}: {theirs.get(k)!r} there, {mine.get(k)!r} now"
                for k in sorted(set(theirs) | set(mine)) if theirs.get(k) != mine.get(k)]
        if diff:
            raise SystemExit(f"{work} holds a run with other arguments or data ({'; '.join(diff)}): rerun with its arguments "
                             "to resume it, pass --fresh to discard it, or give another --work")
        if data["gpu"] != head["gpu"]:
            log.warning("resuming a run started on %s on %s: timings of units trained across both mix the two", data["gpu"], head["gpu"])
        log.info("resuming the run in %s (stages done: %s)", work, ", ".join(data["stages_done"]))
        return Results(paths, data, command)
    if work.exists():
        log.info("starting over in %s", work)
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return Results(paths, {**head, "stages_done": [], "eval": {}, "train_seconds": {}, "units": {}}, command)


def copy_data(src: str, dst: Path, limit: int | None) -> None:
    from plmtool.io import write_text

    if dst.is_file():
        return
    with gzip.open(src, "rt", encoding="utf-8", newline="\n") as f:
        # JSONL lines end at "\n" only: str.splitlines() would also cut at U+2028, U+0085, ...
        lines = [line.rstrip("\n") for line in f if line.strip()]
    write_text(dst, "\n".join(lines[:limit] if limit else lines) + "\n")


def redistribute(res: Results, args, data: Path, d: Path, out: Path, model, tok) -> None:
    from plmtool.experts import run_redistribute
    from plmtool.experts.config import RedistributeConfig

    if not res.done("redistribute"):
        # held-out split first, then embed, need signal, cluster, density, select
        o = RedistributeConfig(data=str(data), heldout=args.heldout, k=args.k, budget=args.budget, need=args.need,
                               max_len=args.max_len, max_prompt_len=args.max_len // 2, embed_max_len=256,
                               embed_batch_size=args.eval_batch_size, batch_size=args.eval_batch_size, plot=True)
        t = time.perf_counter()
        red = run_redistribute.run(o, d, args.seed, lambda: (model, tok), "smollm2-135m", None)
        res.stage("redistribute", redistribute_s=round(time.perf_counter() - t, 1), redistribution=red)
    for name in ("semantic_space.png", "manifest.jsonl"):
        if (d / name).is_file():
            shutil.copy(d / name, out / name)


def token_ids(res: Results, args, d: Path, work: Path, tok) -> SimpleNamespace:
    """Token ids of every pool sample once (shared by all units), the held-out set and its routes.

    Tokenizing is kept in the work dir: a resumed command reads it back instead of redoing it.
    """
    import numpy as np

    from plmtool.experts.routed import expert_name
    from plmtool.experts.router import Router
    from plmtool.experts.run_train import expert_samples
    from plmtool.experts.samples import read_samples
    from plmtool.experts.tokenize import encode
    from plmtool.io import atomic_write

    t = time.perf_counter()
    cache = work / "token_ids.pkl"
    if res.done("encode") and cache.is_file():
        with open(cache, "rb") as f:
            enc_of, held_enc = pickle.load(f)
    else:
        mpl = args.max_len // 2
        enc_of = {s["id"]: encode(tok, s["messages"], args.max_len, mpl) for s in read_samples(d / "samples.jsonl")}
        held_enc = [encode(tok, s["messages"], args.max_len, mpl) for s in read_samples(d / "heldout.jsonl")]

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                pickle.dump((enc_of, held_enc), f, protocol=pickle.HIGHEST_PROTOCOL)

        atomic_write(cache, write)
    router = Router.load(d / "centroids.npy")
    routes = router.route(np.load(d / "heldout_embeddings.npy"))
    k = router.k
    experts = {kind: [expert_name(c, kind) for c in range(k)] for kind in EXPERT_KINDS[args.expert_data]}
    files = {"redistributed": "selected.jsonl", "random": "random.jsonl", "full": "samples.jsonl"}
    unit_ids = {u: [s["id"] for s in read_samples(d / f)] for u, f in files.items()}
    for kind in experts:
        unit_ids.update({e: [s["id"] for s in samples] for e, samples in expert_samples(d, k, kind).items()})
    res.stage("encode", encode_s=round(time.perf_counter() - t, 1), heldout=len(held_enc),
              heldout_tokens=int(sum(sum(x != -100 for x in e["labels"]) for e in held_enc)),
              heldout_per_cluster=np.bincount(routes, minlength=k).tolist(),
              unit_samples={u: len(v) for u, v in unit_ids.items()})
    return SimpleNamespace(enc_of=enc_of, held_enc=held_enc, routes=routes, k=k, experts=experts, unit_ids=unit_ids)


class HeldoutLosses:
    """Per-sample held-out losses of each unit, in memory and in the work dir (routed / oracle
    combine the experts' losses, which a resumed command did not compute itself)."""

    def __init__(self, folder: Path):
        self.folder, self.of = folder, {}
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.npz"

    def load(self, name: str) -> bool:
        import numpy as np

        if not self.path(name).is_file():
            return False
        z = np.load(self.path(name))
        self.of[name] = (z["nll"], z["tokens"])
        return True

    def keep(self, name: str, value) -> None:
        import numpy as np

        from plmtool.io import atomic_write

        self.of[name] = value

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, nll=value[0], tokens=value[1])

        atomic_write(self.path(name), write)


def unit_budget(u: str, n: int, hp: dict, args, full_n: int) -> tuple[dict, float]:
    """(hyper-parameters of unit u with n samples, samples it trains on in all)."""
    if args.budget_mode == "steps" and u != "full":
        # equal optimizer steps: every unit gets the full-data unit's step count (more
        # epochs over its smaller data) - an ablation beside the equal-epochs default
        full_steps = max(1, math.ceil(full_n * args.epochs / args.batch_size))
        return {**hp, "epochs": full_steps * args.batch_size / max(1, n), "max_steps": full_steps}, full_steps * args.batch_size
    return hp, n * args.epochs


def run(args) -> None:
    import numpy as np
    import torch
    import transformers

    from plmtool.experts.lora import BASE, add_adapters, lora_config, set_torch_rng_state, torch_rng_state, train_adapter
    from plmtool.experts.losses import encoded_losses, mean_loss
    from plmtool.io import atomic_write
    from plmtool.models import load_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log = logging.getLogger("bench")
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(0) if cuda else "cpu"
    date = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    res = open_results(args, out, work, {
        "date": date, "gpu": gpu, "torch": torch.__version__, "transformers": transformers.__version__, "args": vars(args),
        "data_sha256": file_sha256(args.data)}, {"date": date, "gpu": gpu, "time_budget": args.time_budget, "stages": [],
                                                 "stopped_in": None}, log)

    # 1. model (a GGUF path is dequantized once and cached outside the work dir)
    data = work / "sharegpt.jsonl"
    copy_data(args.data, data, args.limit)
    t = time.perf_counter()
    model, tok = load_model(SimpleNamespace(name_or_path=args.model, dtype="float32", device="auto", cache_dir=args.model_cache or None))
    res.stage("load", model_load_s=round(time.perf_counter() - t, 1))

    # 2. redistribution, 3. token ids (both kept in the work dir)
    d = work / "D"
    redistribute(res, args, data, d, out, model, tok)
    sets = token_ids(res, args, d, work, tok)
    routes, k, experts = sets.routes, sets.k, sets.experts
    all_experts = [e for names in experts.values() for e in names]

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    cfg = lora_config(args.r, 2 * args.r, args.dropout, "all-linear")
    hp = dict(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, grad_accum=1, max_steps=None, warmup_ratio=0.03,
              weight_decay=0.0, grad_clip=1.0, seed=args.seed, bf16=cuda, log_every=25)
    # warm-up adapter: cuBLAS / autocast / allocator setup happens here, not in the first timed unit
    # (every command: each is a new process)
    t = time.perf_counter()
    model = add_adapters(model, ["warmup"], cfg)
    some = [sets.enc_of[i] for i in sets.unit_ids["random"][: 2 * args.batch_size]]
    train_adapter(model, "warmup", some, pad, **{**hp, "max_steps": 2, "log_every": 0})
    res.stage("warmup", warmup_s=round(time.perf_counter() - t, 1))

    losses = HeldoutLosses(work / "heldout_losses")

    def heldout_loss(name: str, adapter: str) -> dict:
        t = time.perf_counter()
        held = sets.held_enc
        losses.keep(name, encoded_losses(model, held, pad, args.eval_batch_size, [adapter] * len(held),
                                         f"held-out loss: {name}", autocast=cuda))
        per = {str(g): mean_loss(*losses.of[name], routes == g) for g in range(k) if (routes == g).any()}
        return {"heldout_loss": mean_loss(*losses.of[name]), "per_cluster": per,
                "macro_over_clusters": float(np.mean(list(per.values()))), "eval_s": round(time.perf_counter() - t, 1)}

    # 4. base model
    if not (res.done("base") and losses.load("base")):
        base = heldout_loss("base", BASE)
        res.data["units"]["base"] = base
        res.data["eval"]["base"] = base["heldout_loss"]
        res.stage("base")
    # The global torch generators (adapter initialisation, dropout) continue from where the run
    # left them, so a unit started by a later command draws what it would have drawn in one command.
    rng_file = work / "torch_rng.pt"

    def save_rng() -> None:
        atomic_write(rng_file, lambda tmp: torch.save(torch_rng_state(), tmp))

    if rng_file.is_file():
        set_torch_rng_state(torch.load(rng_file, weights_only=True))
    else:
        save_rng()

    # 5. units, cheapest first; each: train (timed alone), then its held-out loss
    ckpt_dir = work / "checkpoints"
    trained_samples, trained_s, last_eval_s = 0.0, 0.0, res.data["units"]["base"]["eval_s"]
    for u in ["redistributed", "random", *all_experts, "full"]:
        n = len(sets.unit_ids[u])
        unit_hp, work_samples = unit_budget(u, n, hp, args, len(sets.unit_ids["full"]))
        ckpt = ckpt_dir / f"{u}.pt"
        if "heldout_loss" in res.data["units"].get(u, {}) and losses.load(u):
            # finished by an earlier command: its numbers are in the JSON, its losses in the work dir
            trained_samples += work_samples
            trained_s += res.data["units"][u]["train"]["seconds"]
            ckpt.unlink(missing_ok=True)
            continue
        deadline = None
        if args.time_budget and args.over_budget == "resume":
            # stop in time to evaluate the unit if it finishes, else to checkpoint and write the JSON
            deadline = time.time() + args.time_budget - elapsed() - last_eval_s - EVAL_RESERVE_S
        elif args.time_budget and trained_s > 0:
            projected = elapsed() + work_samples / (trained_samples / trained_s) + last_eval_s + 5
            if projected > args.time_budget:
                log.warning("skipping %s: projected end %.0f s > --time-budget %s s", u, projected, args.time_budget)
                res.data["units"][u] = {"skipped": f"projected end {projected:.0f} s > time budget {args.time_budget} s"}
                res.stage(f"skip {u}")
                continue
        model = add_adapters(model, [u], cfg)
        stats = train_adapter(model, u, [sets.enc_of[i] for i in sets.unit_ids[u]], pad, **unit_hp,
                              checkpoint=ckpt, checkpoint_every=args.checkpoint_every, deadline=deadline)
        if not stats["finished"]:
            pause(res, u, stats, log)
            table(res.data, args)
            return
        trained_samples += work_samples
        trained_s += stats["seconds"]
        ev = heldout_loss(u, u)
        last_eval_s = ev["eval_s"]
        res.data["units"][u] = {"train": stats, **ev}
        res.data["train_seconds"][u] = stats["seconds"]
        if u not in all_experts:
            res.data["eval"][u] = ev["heldout_loss"]
        for kind, names in experts.items():
            if u == names[-1] and all(e in losses.of or losses.load(e) for e in names):
                routed_oracle(res, losses.of, kind, names, routes, k, mean_loss, np)
        if cuda:
            peak = round(torch.cuda.max_memory_allocated() / 2**30, 1)
            res.data["max_memory_allocated_gb"] = max(peak, res.data.get("max_memory_allocated_gb", 0.0))
        save_rng()
        res.stage(u)
        ckpt.unlink(missing_ok=True)

    ev = res.data["eval"]
    if ev.get("full") is not None and ev["base"] - ev["full"] > 0:
        gain = ev["base"] - ev["full"]
        res.data["recovery_of_full_gain"] = {n: (ev["base"] - v) / gain for n, v in ev.items() if n not in ("base", "full")}
    res.stage("done")
    table(res.data, args)


def pause(res: Results, u: str, stats: dict, log) -> None:
    """Record unit u as unfinished (its checkpoint holds the training so far) and say how to go on."""
    res.data["units"][u] = {"in_progress": {"steps_done": stats["steps_done"], "steps": stats["steps"], "train_s": stats["seconds"]}}
    res.command["stopped_in"] = u
    res.stage(f"paused {u}")
    log.warning("%s: %d of %d steps trained when the time budget ran out; checkpoint saved. "
                "Rerun the same command (same --work) to resume.", u, stats["steps_done"], stats["steps"])


def routed_oracle(res, losses, kind, experts, routes, k, mean_loss, np) -> None:
    """Routed (top-1 nearest centroid) and oracle (best expert per held-out group) losses of one kind of experts."""
    from plmtool.experts.routed import of_kind

    routed, oracle = of_kind("routed", kind), of_kind("oracle", kind)
    pick = lambda choice: tuple(np.array([losses[experts[int(choice(r))]][j][i] for i, r in enumerate(routes)]) for j in (0, 1))
    losses[routed] = pick(lambda r: r)
    best = {g: int(np.argmin([mean_loss(*losses[e], routes == g) or np.inf for e in experts])) for g in range(k) if (routes == g).any()}
    losses[oracle] = pick(lambda r: best[int(r)])
    for name in (routed, oracle):
        per = {str(g): mean_loss(*losses[name], routes == g) for g in range(k) if (routes == g).any()}
        res.data["units"][name] = {"heldout_loss": mean_loss(*losses[name]), "per_cluster": per,
                                   "macro_over_clusters": float(np.mean(list(per.values())))}
        res.data["eval"][name] = mean_loss(*losses[name])
    res.data["train_seconds"][routed] = round(sum(res.data["units"][e]["train"]["seconds"] for e in experts), 3)
    per_sample = np.argmin(np.stack([s / np.maximum(t, 1) for s, t in (losses[e] for e in experts)]), axis=0)
    res.data[of_kind("router", kind)] = {"oracle_expert_per_group": {str(g): b for g, b in best.items()},
                                          "agreement_group": float(np.mean([best[g] == g for g in best])),
                                          "agreement_per_sample_oracle": float(np.mean(per_sample == routes))}


def table(r: dict, args) -> None:
    from plmtool.experts.routed import expert_name, of_kind

    red, units, rec = r["redistribution"], r["units"], r.get("recovery_of_full_gain", {})
    kinds = EXPERT_KINDS[args.expert_data]
    n_of = dict(r["unit_samples"])
    for kind in kinds:
        n = sum(r["unit_samples"][expert_name(c, kind)] for c in range(red["k"]))
        n_of.update({of_kind("routed", kind): n, of_kind("oracle", kind): n})
    print(f"\n{r['gpu']}, torch {r['torch']}; pool {red['total']}, held-out {red['heldout']} ({r['heldout_tokens']} reply tokens), "
          f"K={red['k']}, budget {args.budget}, max_len {args.max_len}, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, "
          f"budget mode {args.budget_mode}, expert data {args.expert_data}")
    print("| model | train samples | held-out loss | mean over clusters | share of full-data gain | train s |")
    print("|---|---|---|---|---|---|")
    for name in ("base", "full", "random", "redistributed", *[of_kind(c, kind) for kind in kinds for c in ("routed", "oracle")]):
        u = units.get(name)
        if u is None or "heldout_loss" not in u:
            print(f"| {name} | {n_of.get(name, '')} | {unit_status(u)} | | | |")
            continue
        share = rec.get(name)
        print(f"| {name} | {n_of.get(name, '') if name != 'base' else 0} | {u['heldout_loss']:.4f} | {u['macro_over_clusters']:.4f} | "
              f"{'' if share is None else f'{share:.1%}'} | {r['train_seconds'].get(name, '')} |")
    for kind in kinds:
        if of_kind("router", kind) in r:
            print(f"router agreement with the oracle expert per group ({of_kind('routed', kind)}): "
                  f"{r[of_kind('router', kind)]['agreement_group']:.2f}")
    print(f"timings: load {r['model_load_s']} s, redistribute {r['redistribute_s']} s, encode {r['encode_s']} s, "
          f"total {r['elapsed_s']} s over {len(r['commands'])} command(s); peak GPU memory {r.get('max_memory_allocated_gb', '-')} GB")


def unit_status(u: dict | None) -> str:
    if u is None:
        return "not run"
    if "in_progress" in u:
        return f"in progress ({u['in_progress']['steps_done']}/{u['in_progress']['steps']} steps)"
    return "skipped"


def main(argv: list[str] | None = None) -> None:
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
    r.add_argument("--work", default="/tmp/bench_experts", help="the run's state; a rerun with the same arguments resumes from it")
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
    r.add_argument("--expert-data", choices=tuple(EXPERT_KINDS), default="redistributed",
                   help="what the experts train on: redistributed (each cluster's share of the redistributed subset), "
                        "cluster (each its whole cluster: all experts together see the full-data unit's data), or both "
                        "(two sets of experts, evaluated side by side as routed / routed_cluster)")
    r.add_argument("--budget-mode", choices=("epochs", "steps"), default="epochs",
                   help="epochs: the same epochs per sample for every unit (the issue's comparison); "
                        "steps: every unit gets the full-data unit's number of optimizer steps")
    # batch 16 ran at ~4 steps/s on an H200 (launch-bound: 210 LoRA-wrapped linears)
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--eval-batch-size", type=int, default=64)
    r.add_argument("--r", type=int, default=16)
    r.add_argument("--dropout", type=float, default=0.05)
    r.add_argument("--time-budget", type=float, default=300.0,
                   help="seconds since this command's start by which it ends (0: no limit); see --over-budget")
    r.add_argument("--over-budget", choices=("resume", "skip"), default="resume",
                   help="resume: a unit that cannot finish in time trains until the budget, checkpoints, and the command "
                        "exits 0 - rerun it to resume; skip: a unit projected to end later is skipped (retried by a rerun)")
    r.add_argument("--checkpoint-every", type=int, default=500,
                   help="also checkpoint a unit every N optimizer steps, so a killed command loses at most N steps (0: only "
                        "at the budget and at the unit's end)")
    r.add_argument("--fresh", action="store_true", help="discard the run in --work and start over (default: resume it)")
    r.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    prepare(args) if args.cmd == "prepare" else run(args)


if __name__ == "__main__":
    main()
