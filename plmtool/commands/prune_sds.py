"""plmtool prune sds: one-shot pruning (magnitude / Wanda / SparseGPT) and Sparse-Dense-Sparse.

    plmtool prune sds                                        # SmolLM2-135M, Wanda 2:4, all stages
    plmtool prune sds experiment=smoke hydra.run.dir=DIR
    plmtool prune sds -m prune.method=magnitude,wanda,sparsegpt prune.pattern=2:4,4:8 prune.stages=[oneshot]
    plmtool prune sds experiment=paper model=llama3-8b       # paper settings (128x2048 C4, 200 iterations)

Stages (each evaluated, each resumable from the run dir): dense -> oneshot -> redense -> sds.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

import plmtool.prune.schema  # noqa: F401  (registers prune_sds_schema)
from plmtool.errors import PlmtoolError
from plmtool.paths import CONF_DIR
from plmtool.prune.config import STAGES, PruneConfig
from plmtool.markdown import md_table
from plmtool.runner import Report, execute

log = logging.getLogger("plmtool")

PRUNED_STAGES = ("oneshot", "redense", "sds")


# ------------------------------------------------------------------------------------ validation


def validate(cfg: DictConfig) -> PruneConfig:
    """Every check that does not need the weights; raises PlmtoolError. Returns `cfg.prune` as
    the dataclass the math takes (built once here; its fields check themselves as it is built,
    plmtool/prune/config.py)."""
    from plmtool.eval.suite import check_config

    prune = OmegaConf.to_object(cfg.prune)
    check_config(cfg.eval)  # every stage is evaluated
    return prune


def check_widths(cfg: DictConfig, pattern) -> None:
    """N:M must divide every pruned layer's input width: check it from the model config alone."""
    if not pattern.structured:
        return
    from transformers import AutoConfig

    from plmtool.models.loader import materialize, resolve_model_source
    from plmtool.prune.patterns import check_width

    source = materialize(resolve_model_source(cfg.model.name_or_path, cfg.model.gguf_file), cfg.model.cache_dir)
    try:
        mc = AutoConfig.from_pretrained(source.location, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as e:  # offline hub id etc.: checked again on the loaded weights
        log.info("could not read the model config before loading (%s); widths are checked after loading", e)
        return
    mc = getattr(mc, "text_config", mc)
    widths = {"hidden_size": getattr(mc, "hidden_size", None)}
    for key in ("intermediate_size", "ffn_dim"):
        if getattr(mc, key, None):
            widths[key] = getattr(mc, key)
    heads, head_dim = getattr(mc, "num_attention_heads", None), getattr(mc, "head_dim", None)
    if heads and head_dim:
        widths["attention output (heads x head_dim)"] = heads * head_dim
    for where, width in widths.items():
        if width:
            check_width(pattern, int(width), f"{where} of {cfg.model.name_or_path}")


# ------------------------------------------------------------------------------------ helpers


def _weights_path(run_dir: Path, stage: str) -> Path:
    return run_dir / "weights" / f"{stage}.safetensors"


def _save_weights(run_dir: Path, stage: str, weights: dict) -> None:
    from safetensors.torch import save_file

    from plmtool.io import atomic_write

    flat = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    atomic_write(_weights_path(run_dir, stage), lambda tmp: save_file(flat, tmp))


def _load_weights(run_dir: Path, stage: str) -> dict:
    from safetensors.torch import load_file

    path = _weights_path(run_dir, stage)
    if not path.is_file():
        raise PlmtoolError(f"stage '{stage}' is marked done but {path} is missing; delete {run_dir}/stages/{stage}.json to redo it")
    return load_file(str(path))


def _assign(model, weights: dict, exclude: tuple) -> None:
    from plmtool.prune.sequential import block_linears, decoder_layers

    for i, block in enumerate(decoder_layers(model)):
        for name, lin in block_linears(block, exclude).items():
            lin.weight.data.copy_(weights[f"layers.{i}.{name}"].to(lin.weight.device, lin.weight.dtype))


def _verify_all(weights: dict, pattern, stage: str) -> None:
    from plmtool.prune.patterns import verify

    bad = {k: msg for k, w in weights.items() if (msg := verify(w.float(), pattern))}
    if bad:
        first = next(iter(bad.items()))
        raise RuntimeError(f"stage {stage}: {len(bad)} layers violate the {pattern} pattern, e.g. {first[0]}: {first[1]}")


def _sparsity(weights: dict) -> float:
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())
    return zeros / max(1, total)


def _histogram(weights: dict, dense: dict, bins: int) -> dict:
    """Histogram of the non-zero weights of the pruned layers on a fixed range (set by the dense
    weights), plus the zero fraction; the same bins for every stage so the figures compare."""
    import torch

    sample = torch.cat([w.flatten().float()[:: max(1, w.numel() // 20000)] for w in dense.values()]).abs()
    limit = float(torch.quantile(sample, 0.999))
    counts = torch.zeros(bins, dtype=torch.float64)
    zeros = total = 0
    for w in weights.values():
        v = w.flatten().float()
        nz = v[v != 0]
        zeros += v.numel() - nz.numel()
        total += v.numel()
        counts += torch.histc(nz.clamp(-limit, limit), bins=bins, min=-limit, max=limit).double()
    return {"range": [-limit, limit], "counts": counts.tolist(), "zero_fraction": zeros / max(1, total)}


def _plot(run_dir: Path, hists: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from plmtool.io import atomic_write

    written = []
    names = [s for s in STAGES if s in hists]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        h = hists[name]
        lo, hi = h["range"]
        counts = np.asarray(h["counts"])
        edges = np.linspace(lo, hi, len(counts) + 1)
        ax.stairs(counts / max(1.0, counts.sum()), edges, fill=True)
        ax.set_title(f"{name} ({h['zero_fraction']:.0%} zeros)")
        ax.set_xlabel("weight (non-zero)")
    axes[0][0].set_ylabel("fraction")
    fig.suptitle("weight distribution of the pruned layers per stage")
    fig.tight_layout()
    path = run_dir / "weights_histogram.png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    written.append(path.name)
    return written


# ------------------------------------------------------------------------------------ the command


def run(cfg: DictConfig, run_dir: Path) -> Report:
    import torch

    from plmtool.data.corpora import check_corpus
    from plmtool.eval.suite import evaluate
    from plmtool.io import Stages, check_free_space, follow_umask
    from plmtool.models import load_model, resolve_model_source
    from plmtool.models.loader import model_info, pick_device, saved_bytes
    from plmtool.prune.oneshot import prune_model
    from plmtool.prune.patterns import check_width
    from plmtool.prune.sds import linear_weights, redense_model, reprune_model

    p = validate(cfg)
    pattern = p.parsed_pattern
    for corpus in dict.fromkeys((cfg.data.calib_corpus or cfg.data.corpus, cfg.eval.corpus)):
        check_corpus(corpus, cfg.data)  # bad inputs fail before the model loads
    resolve_model_source(cfg.model.name_or_path, cfg.model.gguf_file)
    check_widths(cfg, pattern)
    stages_wanted = [s for s in STAGES if s in p.stages]
    torch.manual_seed(cfg.seed)

    model, tokenizer = load_model(cfg.model)
    if p.save_model:  # its size is known now: a full disk fails here, not after minutes of pruning
        check_free_space(run_dir, saved_bytes(model), "the pruned model (prune.save_model=true)")
    exclude = tuple(p.exclude)
    device = str(next(model.parameters()).device) if cfg.model.device_map is None else pick_device(cfg.model.device)
    dense = linear_weights(model, exclude)  # CPU copy: the targets of SDS
    if not dense:
        raise PlmtoolError(f"no linear layers to prune in {cfg.model.name_or_path} (prune.exclude={list(exclude)})")
    for name, w in dense.items():
        check_width(pattern, w.shape[1], name)

    stages = Stages(run_dir)
    report: dict[str, Any] = {
        "model": cfg.model.name_or_path,
        "model_info": model_info(model),
        "method": p.method,
        "pattern": p.pattern if pattern.structured else f"unstructured {pattern.sparsity:g}",
        "target_sparsity": pattern.sparsity,
        "calibration": {"corpus": cfg.data.calib_corpus or cfg.data.corpus, "nsamples": cfg.data.nsamples, "seqlen": cfg.data.seqlen, "seed": cfg.data.seed},
        "stages": {},
        "layers": {},
    }

    calib_cache: dict = {}

    def calib():
        if "ids" not in calib_cache:
            from plmtool.data.calibration import calibration_windows

            calib_cache["ids"] = calibration_windows(tokenizer, cfg.data)
        return calib_cache["ids"]

    def do_eval(stage: str, weights: dict, seconds: float | None, extra: dict | None = None) -> dict:
        result = evaluate(model, tokenizer, cfg.eval, cfg.data, run_dir, label=stage)
        entry = {**result, "sparsity": _sparsity(weights), "seconds": seconds, **(extra or {})}
        entry["histogram"] = _histogram(weights, dense, p.histogram_bins)
        return entry

    # dense weights are what the model holds now; later stages resume from their saved weights
    needed_oneshot = any(s in stages_wanted for s in PRUNED_STAGES)
    oneshot_w = None
    for stage in stages_wanted:
        if stages.done(stage):
            log.info("stage '%s' already done in %s; skipping", stage, run_dir)
            report["stages"][stage] = stages.result(stage)
            if stage in PRUNED_STAGES:
                weights = _load_weights(run_dir, stage)
                _assign(model, weights, exclude)
                if stage == "oneshot":
                    oneshot_w = weights
            continue
        start = time.perf_counter()
        extra: dict[str, Any] = {}
        if stage == "dense":
            weights = dense
        elif stage == "oneshot":
            info = prune_model(model, calib() if p.method != "magnitude" else None, p, device)
            weights = oneshot_w = linear_weights(model, exclude)
            _verify_all(weights, pattern, stage)
            errs = [v["sparsegpt_error"] for v in info.values() if "sparsegpt_error" in v]
            if errs:
                extra["sparsegpt_error_total"] = float(sum(errs))
        elif stage == "redense":
            if oneshot_w is None:
                oneshot_w = _prepare_oneshot(stages, run_dir, model, exclude)
            info = redense_model(model, calib(), dense, p, device)
            weights = linear_weights(model, exclude)
            extra["reconstruction_mean"] = sum(v["reconstruction"] for v in info.values()) / len(info)
            extra["optimizer_retries"] = sum(v["retries"] for v in info.values())
        else:  # sds
            if oneshot_w is None:
                oneshot_w = _prepare_oneshot(stages, run_dir, model, exclude)
            if "redense" not in stages_wanted:
                # re-dense is part of SDS even when its own evaluation is not requested
                redense_model(model, calib(), dense, p, device)
            res = reprune_model(model, calib(), dense, oneshot_w, p, device)
            weights = linear_weights(model, exclude)
            _verify_all(weights, pattern, stage)
            info = res["layers"]
            extra["early_exit"] = res["early_exit"]
            extra["calibration_nll"] = res["nll"]
            choices: dict[str, int] = {}
            for v in info.values():
                choices[v["choice"]] = choices.get(v["choice"], 0) + 1
            extra["layer_choices"] = choices or {"reprune": len(weights)}
            if info:
                extra["calibration_loss"] = {
                    k: sum(v[k] for v in info.values()) / len(info) for k in ("oneshot", "reprune", "final")
                }
            extra["optimizer_retries"] = sum(v["retries"] for v in info.values())
            report["layers_sds"] = info
        seconds = round(time.perf_counter() - start, 2)
        if stage in PRUNED_STAGES:
            _save_weights(run_dir, stage, weights)
        entry = do_eval(stage, weights, seconds, extra)
        stages.mark(stage, entry)
        report["stages"][stage] = entry

    # per-layer sparsity table from the saved stage weights
    for stage in PRUNED_STAGES:
        if stage in report["stages"] and _weights_path(run_dir, stage).is_file():
            for k, w in _load_weights(run_dir, stage).items():
                report["layers"].setdefault(k, {})[stage] = float((w == 0).float().mean())
    hists = {s: e["histogram"] for s, e in report["stages"].items() if e.get("histogram")}
    report["figures"] = _plot(run_dir, hists) if hists else []

    last = next((s for s in reversed(PRUNED_STAGES) if s in stages_wanted), None)
    if p.save_model and last is not None:
        final = linear_weights(model, exclude)
        if last in ("oneshot", "sds"):
            _verify_all(final, pattern, last)
        out = run_dir / "model"
        if not (out / "config.json").is_file() or not stages.done("saved-" + last):
            model.save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
            follow_umask(out)
            stages.mark("saved-" + last, {"stage": last})
        report["model_dir"] = str(out)
        report["model_stage"] = last
    return report


def _prepare_oneshot(stages, run_dir: Path, model, exclude) -> dict:
    """One-shot weights for a later stage; they are saved by the oneshot stage."""
    if not stages.done("oneshot"):
        raise PlmtoolError("prune.stages: 'redense' and 'sds' need the 'oneshot' stage (add it to prune.stages)")
    return _load_weights(run_dir, "oneshot")


def render(report: Report) -> str:
    lines = [f"# plmtool prune sds: {report['model']} — {report['method']} {report['pattern']}", ""]
    from plmtool.eval.report import subset_note

    first = next(iter(report["stages"].values()), {})
    tasks = list(dict.fromkeys(t for e in report["stages"].values() for t in (e.get("zeroshot") or {})))
    rows = []
    for name, e in report["stages"].items():
        accs = [(e.get("zeroshot") or {}).get(t) for t in tasks]
        rows.append([name, e.get("ppl"), e.get("sparsity"), *accs, *([e.get("zeroshot_avg")] if tasks else []), e.get("seconds")])
    ppl_head = f"ppl ({first.get('corpus', '')}, seqlen {first.get('seqlen', '')})"
    lines.append(md_table(["stage", ppl_head, "sparsity (pruned layers)", *tasks, *(["avg acc"] if tasks else []), "seconds"], rows))
    if first.get("zeroshot_tasks"):
        lines += ["", subset_note(first)]
    gone = first.get("zeroshot_unavailable") or {}
    if gone:
        lines += ["", "Unavailable zero-shot tasks: " + "; ".join(f"{t} ({why})" for t, why in gone.items())]
    sds = report["stages"].get("sds")
    if sds and sds.get("early_exit"):
        lines += ["", f"Early exit: the re-pruned model already beat the one-shot model on calibration NLL {sds.get('calibration_nll')}; no adjustment."]
    if sds and sds.get("calibration_loss"):
        cl = sds["calibration_loss"]
        lines += ["", f"Mean per-layer calibration loss (relative output error): one-shot {cl['oneshot']:.4g}, "
                  f"re-pruned {cl['reprune']:.4g}, final {cl['final']:.4g}; layer outcomes {sds.get('layer_choices')}; "
                  f"optimizer step reductions {sds.get('optimizer_retries')}."]
    if report.get("layers"):
        stages = [s for s in PRUNED_STAGES if any(s in v for v in report["layers"].values())]
        lines += ["", "## Sparsity per layer", "", md_table(["layer", *stages], [[k, *[v.get(s) for s in stages]] for k, v in report["layers"].items()])]
    for fig in report.get("figures", []):
        lines += ["", f"![weight distribution]({fig})"]
    if report.get("model_dir"):
        lines += ["", f"Model ({report['model_stage']} stage) saved to `{report['model_dir']}`."]
    return "\n".join(lines) + "\n"


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="prune_sds")
def main(cfg: DictConfig) -> None:
    execute(cfg, run, render)
