"""Speed benchmark of plain, generate() and speculative decoding (Spec-Bench conventions).

Pure Python over torch/transformers (no Hydra), so the same code runs from `plmtool draft bench`
and from `scripts/bench_draft.py` on machines without Hydra. Drafters and trees are set up by
`plmtool.draft.setup`, as for `plmtool draft serve`.

Conventions: greedy, batch 1; every method first decodes `warmup` untimed questions; each timed run
is bracketed by device synchronisation; a question's time is the median over `runs`; tokens/s
per question = new tokens / time; a method's tokens/s is the mean over questions and speedup is
the ratio of those means against each baseline, over the questions both decoded. Accepted tokens
per step counts accepted drafted tokens + the bonus token (plain decoding: 1.00).
"""

from __future__ import annotations

import logging
import statistics
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from plmtool.markdown import md_table
from plmtool.draft.decoding.engine import GenerationConfig, SpeculativeEngine
from plmtool.draft.decoding.tree import expected_accept_length, rank_accuracy_from_top1, tree_summary
from plmtool.draft.setup import DrafterSetup, chat_prompt_ids
from plmtool.errors import PlmtoolError

log = logging.getLogger("plmtool")

BASELINES = ("ar", "hf_generate", "hf_generate_static")


# ----------------------------------------------------------------------------- prompts


def prepare_questions(tokenizer, questions: Sequence[dict], system_prompt: str | None = None) -> list[dict]:
    """First turns as prompts; second turns (when present) serve as tree-calibration prompts."""
    out = []
    for q in questions:
        out.append({
            "question_id": q["question_id"], "category": q.get("category", "unknown"),
            "prompt_ids": chat_prompt_ids(tokenizer, q["turns"][0], system_prompt),
            "calibration_ids": chat_prompt_ids(tokenizer, q["turns"][1], system_prompt) if len(q["turns"]) > 1 else None,
        })
    return out


# ----------------------------------------------------------------------------- methods


@dataclass
class Decoded:
    tokens: list[int]
    accept_lengths: list[int] = field(default_factory=list)
    first_token_s: float | None = None  # from the call to the first token on the host (the prefill)


def engine_method(engine: SpeculativeEngine, max_new: int, stops: Sequence[int]) -> Callable[..., Decoded]:
    def run(prompt: list[int], max_new_tokens: int | None = None) -> Decoded:
        gen = GenerationConfig(max_new_tokens=max_new_tokens or max_new, stop_token_ids=list(stops))
        t0 = time.perf_counter()
        first, out = None, None
        # the first token is read on the host (a device sync), so this time is the whole prefill
        for _, out in engine.stream(prompt, gen):
            if first is None:
                first = time.perf_counter() - t0
        assert out is not None
        return Decoded(out.tokens, out.accept_lengths, first)

    return run


def hf_generate_method(model, max_new: int, stops: Sequence[int], pad_id: int | None, static: bool) -> Callable[..., Decoded]:
    import copy

    gc = copy.deepcopy(model.generation_config)
    gc.do_sample = False
    gc.temperature = gc.top_p = gc.top_k = None
    gc.repetition_penalty = None
    gc.max_new_tokens = max_new
    gc.min_new_tokens = None
    gc.max_length = None
    gc.eos_token_id = list(stops) or None
    gc.pad_token_id = pad_id if pad_id is not None else (list(stops)[0] if stops else None)
    if static:
        gc.cache_implementation = "static"
    device = next(model.parameters()).device

    def run(prompt: list[int], max_new_tokens: int | None = None) -> Decoded:
        ids = torch.tensor([prompt], device=device)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc,
                                 max_new_tokens=max_new_tokens or max_new)
        tokens = out[0, len(prompt):].tolist()
        return Decoded(tokens, [1] * max(len(tokens) - 1, 0))

    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- the benchmark


def run_benchmark(
    methods: dict[str, Callable[..., Decoded]],
    questions: Sequence[dict],
    device: torch.device,
    runs: int = 3,
    warmup: int = 1,
    warmup_tokens: int | None = None,
    question_caps: dict[str, int] | None = None,
    progress: Callable[[Any, str, int], Any] | None = None,
    deadline: float | None = None,
    errors: dict[str, str] | None = None,
    interleave: bool = False,
    on_question: Callable[[dict[str, list[dict]]], Any] | None = None,
    cold: Sequence[str] = (),
) -> dict[str, list[dict]]:
    """Decode every question with every method; returns per-method per-question records.

    `deadline` (a time.perf_counter() value) splits the remaining time evenly over the methods
    not yet run: a method out of time stops after the questions it finished (speedups are always
    computed over common questions). With `errors` given, a method that raises is recorded there
    and skipped instead of failing the whole benchmark.

    `interleave=True` decodes question by question, every method in turn, so that a `deadline`
    stops all methods after the same questions (no method is starved of time by the ones before
    it); `on_question(records)` is then called after each question (e.g. to save partial results).
    Methods named in `cold` skip the warm-up (nothing to warm, e.g. dynamic-cache generate()).
    """
    if "ar" not in methods:
        raise PlmtoolError("the benchmark needs the 'ar' method: every output is checked against it")
    if interleave:
        return _interleaved(methods, questions, device, runs, warmup, warmup_tokens, question_caps, deadline, errors,
                            on_question, set(cold))
    records: dict[str, list[dict]] = {}
    names = list(methods)
    for idx, name in enumerate(names):
        fn = methods[name]
        cap = (question_caps or {}).get(name)
        qs = list(questions)[: cap] if cap else list(questions)
        my_deadline = None
        if deadline is not None:
            my_deadline = time.perf_counter() + max(deadline - time.perf_counter(), 0) / (len(names) - idx)
        try:
            for q in list(questions)[: max(warmup, 0)]:
                fn(q["prompt_ids"], warmup_tokens)
            _sync(device)
            recs = _timed(fn, qs, device, runs, progress, name, my_deadline)
        except PlmtoolError:
            raise
        except Exception as e:
            if errors is None or name == "ar":
                raise
            errors[name] = f"{type(e).__name__}: {e}"
            log.warning("method %s failed: %s", name, errors[name])
            continue
        if not recs:
            if errors is not None and name != "ar":
                errors[name] = "out of time before the first question"
                continue
            raise PlmtoolError(f"method {name} decoded no question within the time budget")
        records[name] = recs
        log.info("%s: %.1f tokens/s over %d questions", name, statistics.mean(r["tokens_per_s"] for r in recs), len(recs))
    return records


DEVICE_FAULT = "device fault"  # prefix of an error after which the device can run nothing more


def device_dead(device: torch.device) -> bool:
    """True when the device context no longer works (a sticky CUDA error such as an illegal
    access or an unspecified launch failure): every later kernel would fail too."""
    if device.type != "cuda":
        return False
    try:
        torch.cuda.synchronize(device)
        torch.zeros(1, device=device).add_(1).item()
        return False
    except Exception:  # noqa: BLE001 - any failure here means the context is gone
        return True


def _interleaved(methods, questions, device, runs, warmup, warmup_tokens, caps, deadline, errors, on_question, cold):
    """Warm-ups, then question by question every method in turn. A method that raises is dropped
    (the others go on); after a device fault, which kills the context for every method, the pass
    stops and returns what was decoded before it (all methods over the questions they finished)."""
    live = dict(methods)
    dead: list[str] = []

    def failed(name: str, e: Exception) -> None:
        if device_dead(device):
            msg = f"{DEVICE_FAULT} in {name}: {type(e).__name__}: {e}"
            log.error("%s; the device can run nothing more, stopping the pass", msg)
            if errors is None:
                raise PlmtoolError(msg) from e
            errors[name] = msg
            dead.append(name)
            return
        if errors is None or name == "ar":
            raise e
        errors[name] = f"{type(e).__name__}: {e}"
        log.warning("method %s failed: %s", name, errors[name])
        live.pop(name, None)

    for name, fn in list(live.items()):
        if name in cold:
            continue
        try:  # each method's warm-up on its own: a Python exception drops that method only
            for q in list(questions)[: max(warmup, 0)]:
                fn(q["prompt_ids"], warmup_tokens)
            _sync(device)
        except PlmtoolError:
            raise
        except Exception as e:
            failed(name, e)
            if dead:
                return {}
    records: dict[str, list[dict]] = {name: [] for name in live}
    last = 0.0
    for i, q in enumerate(questions):
        t0 = time.perf_counter()
        if deadline is not None and i > 0 and t0 + last > deadline:
            log.warning("time budget reached: every method decoded the first %d questions", i)
            break
        for name, fn in list(live.items()):
            cap = (caps or {}).get(name)
            if cap is not None and i >= cap:
                continue
            try:
                records[name] += _timed(fn, [q], device, runs, None, name, None)
            except PlmtoolError:
                raise
            except Exception as e:
                failed(name, e)
                if dead:
                    break
        if dead:  # keep the questions every method finished: drop this one where it was decoded
            for recs in records.values():
                if recs and recs[-1]["question_id"] == q["question_id"]:
                    recs.pop()
            break
        last = time.perf_counter() - t0
        if on_question is not None:
            on_question({k: v for k, v in records.items() if v})
    for name in list(records):
        if not records[name]:
            if name == "ar":
                if dead:
                    return {}
                raise PlmtoolError("method ar decoded no question within the time budget")
            records.pop(name)
            if errors is not None:
                errors.setdefault(name, "out of time before the first question")
    for name, recs in records.items():
        log.info("%s: %.1f tokens/s over %d questions", name, statistics.mean(r["tokens_per_s"] for r in recs), len(recs))
    return records


def _timed(fn, qs, device, runs, progress, name, deadline) -> list[dict]:
    recs = []
    items = progress(qs, f"bench {name}", len(qs)) if progress else qs
    for q in items:
        if deadline is not None and time.perf_counter() > deadline and recs:
            log.warning("%s: time budget reached after %d questions", name, len(recs))
            break
        times, firsts, out = [], [], None
        for _ in range(max(runs, 1)):
            _sync(device)
            t0 = time.perf_counter()
            out = fn(q["prompt_ids"])
            _sync(device)
            times.append(time.perf_counter() - t0)
            firsts.append(out.first_token_s)
        assert out is not None
        t = statistics.median(times)
        timed_first = all(f is not None for f in firsts)
        recs.append({
            "question_id": q["question_id"], "category": q["category"], "tokens": out.tokens,
            "new_tokens": len(out.tokens), "wall_time": t, "times": times,
            "tokens_per_s": len(out.tokens) / t if t > 0 else 0.0, "accept_lengths": out.accept_lengths,
            # medians over the runs: time to the first token, and the time after it (the steps)
            "first_token_s": statistics.median(firsts) if timed_first else None,
            "decode_time": statistics.median(w - f for w, f in zip(times, firsts)) if timed_first else None,
        })
    return recs


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def summarize(records: dict[str, list[dict]]) -> dict[str, Any]:
    """Aggregate tokens/s, accepted tokens per step, identity with `ar`, per category; speedups."""
    ar = {r["question_id"]: r for r in records["ar"]}
    methods: dict[str, Any] = {}
    for name, recs in records.items():
        steps = sum(len(r["accept_lengths"]) for r in recs)
        accepted = sum(sum(r["accept_lengths"]) for r in recs)
        diverged = []
        for r in recs:
            pos = _first_divergence(r["tokens"], ar[r["question_id"]]["tokens"])
            if pos is not None:
                diverged.append({"question_id": r["question_id"], "position": pos})
        cats: dict[str, list[dict]] = {}
        for r in recs:
            cats.setdefault(r["category"], []).append(r)
        firsts = [r["first_token_s"] for r in recs if r.get("first_token_s") is not None]
        methods[name] = {
            "questions": len(recs),
            # time to the first token (the prompt's prefill), mean over questions; engines only
            "first_token_ms": 1000 * statistics.mean(firsts) if firsts else None,
            "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in recs),
            "tokens_per_s_total": sum(r["new_tokens"] for r in recs) / max(sum(r["wall_time"] for r in recs), 1e-9),
            "mean_accepted": accepted / steps if steps else 1.0,
            "new_tokens": sum(r["new_tokens"] for r in recs),
            "wall_time_s": sum(r["wall_time"] for r in recs),
            "steps": steps,
            # the time after the first token (the decoding steps), where the first token's time is known
            "decode_time_s": sum(r["decode_time"] for r in recs) if len(firsts) == len(recs) else None,
            "identical_to_ar": not diverged,
            "divergent_questions": len(diverged),
            "divergences": diverged,
            "per_category": {
                c: {"questions": len(rs), "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in rs),
                    "mean_accepted": (sum(sum(r["accept_lengths"]) for r in rs) / max(sum(len(r["accept_lengths"]) for r in rs), 1))
                    if any(r["accept_lengths"] for r in rs) else 1.0}
                for c, rs in sorted(cats.items())
            },
        }
    speedups: dict[str, dict[str, float]] = {}
    for name, recs in records.items():
        for base in BASELINES:
            if base == name or base not in records:
                continue
            base_by_q = {r["question_id"]: r for r in records[base]}
            common = [r for r in recs if r["question_id"] in base_by_q]
            if not common:
                continue
            mine = statistics.mean(r["tokens_per_s"] for r in common)
            theirs = statistics.mean(base_by_q[r["question_id"]]["tokens_per_s"] for r in common)
            speedups.setdefault(name, {})[base] = mine / theirs if theirs > 0 else float("nan")
    return {"methods": methods, "speedups": speedups,
            "identical_to_ar": all(m["identical_to_ar"] for m in methods.values()),
            "divergent_questions_total": sum(m["divergent_questions"] for m in methods.values())}


def spec_bench_lines(name: str, recs: Sequence[dict], tokenizer, model_id: str) -> list[dict]:
    """One Spec-Bench answer record per question (fields of Spec-Bench's evaluation scripts)."""
    lines = []
    for r in recs:
        text = tokenizer.decode(r["tokens"], skip_special_tokens=True) if tokenizer is not None else ""
        lines.append({
            "question_id": r["question_id"], "category": r["category"], "answer_id": uuid.uuid4().hex[:22],
            "model_id": f"{model_id}-{name}",
            "choices": [{"index": 0, "turns": [text], "decoding_steps": [max(len(r["accept_lengths"]), 1)],
                         "new_tokens": [r["new_tokens"]], "wall_time": [r["wall_time"]],
                         "accept_lengths": [r["accept_lengths"]]}],
            "tstamp": time.time(),
        })
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    methods = report["methods"]
    bases = [b for b in BASELINES if b in methods]
    head = (["method", "questions", "tokens/s", "mean accepted", "first token ms"] + [f"× {b}" for b in bases]
            + ["identical to ar", "divergent q."])
    rows = []
    for name, m in methods.items():
        sp = report.get("speedups", {}).get(name, {})
        first = m.get("first_token_ms")
        rows.append([name, m["questions"], round(m["tokens_per_s"], 2), round(m["mean_accepted"], 3),
                     "" if first is None else round(first, 2)]
                    + [round(sp[b], 3) if b in sp else ("1" if b == name else "") for b in bases]
                    + ["yes" if m["identical_to_ar"] else "no", m["divergent_questions"]])
    info = report.get("setup", {})
    lines = [f"# plmtool draft bench: {report.get('model', '')}", "",
             f"{report.get('num_questions')} questions, greedy, batch 1, up to {info.get('max_new_tokens')} new tokens, "
             f"{info.get('runs')} run(s) per question (median), device {info.get('device')}, dtype {info.get('dtype')}.", "",
             md_table(head, rows), ""]
    cats = sorted({c for m in methods.values() for c in m["per_category"]})
    if cats:
        lines += ["## tokens/s per category", "",
                  md_table(["category"] + list(methods), [[c] + [round(methods[n]["per_category"].get(c, {}).get("tokens_per_s", 0.0), 1) for n in methods] for c in cats]), ""]
    for name, t in report.get("trees", {}).items():
        lines.append(f"- {name}: tree of {t['nodes']} nodes, depth {t['max_depth']} (per depth {t['per_depth']}), "
                     f"expected accepted/step {t.get('expected_accept_length', 'n/a')}")
    for name, why in report.get("skipped", {}).items():
        lines.append(f"- skipped {name}: {why}")
    return "\n".join(lines) + "\n"


def tree_report(setup: DrafterSetup) -> dict[str, Any]:
    info = tree_summary(setup.tree)
    if setup.pool is not None:  # greedy steps pick this many nodes per step from the pool
        info["dynamic_pool"] = {**tree_summary(setup.pool), "choices": setup.pool}
    acc = setup.rank_accuracy or rank_accuracy_from_top1([0.5] * setup.drafter.num_heads)
    info["expected_accept_length"] = round(expected_accept_length(setup.tree, acc), 3)
    if setup.measured is not None:
        m = setup.measured
        info["head_top1"] = [round(a[0], 4) for a in m.marginal]
        info["head_top5"] = [round(sum(a[:5]), 4) for a in m.marginal]
        # given that heads 0..k-1 ranked their tokens within the table: what the tree was built from
        info["head_top1_given_prefix"] = [round(a[0], 4) for a in m.conditional]
        info["calibration_positions"] = m.positions
        # both models' estimates for this tree, for comparison with the measured accepted length
        info["expected_accept_length_conditional"] = round(expected_accept_length(setup.tree, m.conditional), 3)
        info["expected_accept_length_independent"] = round(expected_accept_length(setup.tree, m.marginal), 3)
    info["checkpoint"] = setup.checkpoint
    info["kind"] = setup.name
    info["choices"] = setup.tree
    return info
