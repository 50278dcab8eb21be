"""plmtool experts train: one LoRA expert per cluster + router, baselines, evaluation, routed generation.

    plmtool experts train experts.redistribution=outputs/experts/<date>/<time>
    # one job per expert (Hydra multirun / Slurm array), then the baselines, then assemble:
    plmtool experts train -m experts.redistribution=D experts.expert_index=0,1,2,3,4,5,6,7
    plmtool experts train -m experts.redistribution=D experts.baseline=full,random,redistributed
    plmtool experts train experts.redistribution=D experts.mode=assemble
    # experts on their whole clusters of the pool (together the full-data unit's data)
    plmtool experts train experts.redistribution=D experts.expert_data=cluster
    # routed generation for one prompt
    plmtool experts train experts.redistribution=D experts.mode=generate experts.prompt="Write a haiku"
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

import plmtool.config  # noqa: F401  (registers the shared schemas)
import plmtool.experts.config  # noqa: F401  (registers experts_train_schema)
from plmtool.paths import CONF_DIR
from plmtool.markdown import md_table
from plmtool.runner import Report, execute


def run(cfg: DictConfig, run_dir: Path) -> Report:
    from plmtool.experts import run_train

    run_train.check_options(cfg.experts, cfg.trainer)  # before the model is loaded

    def load():
        from plmtool.models import load_model

        return load_model(cfg.model)

    return run_train.run(cfg.experts, cfg.trainer, run_dir, int(cfg.seed), load, str(cfg.model.name_or_path))


def _fmt(v):
    return None if v is None else round(v, 4)


def _expert_data_line(report: Report) -> str:
    what = {"redistributed": "its cluster's share of the redistributed subset", "cluster": "its whole cluster of the pool",
            "both": "its cluster's share of the redistributed subset (expert_<k>) and, side by side, its whole cluster "
                    "(expert_<k>_cluster)"}
    counts = ", ".join(f"{e} {n}" for e, n in report["expert_samples"].items() if not e.startswith("shared_"))
    return f"each expert trained on {what[report['expert_data']]} (experts.expert_data={report['expert_data']}); samples: {counts}"


def _pct(v):
    return None if v is None else round(100 * v, 2)


def _accuracy_table(report: Report) -> list[str]:
    ev = report["eval"]
    names = [n for n, e in ev.items() if "macro" in e]
    if not names:
        return []
    tasks = list(next(ev[n] for n in names)["tasks"])
    share = report.get("share_of_full_accuracy_gain", {})
    rows = []
    for n in names:
        e = ev[n]
        spread = f"{_pct(e['macro_sd'])} ({_pct(e['macro_min'])}-{_pct(e['macro_max'])})" if "macro_sd" in e else ""
        rows.append([n, report.get("unit_samples", {}).get(n), _pct(e["macro"]), spread, f"{_pct(e['worst'])} ({e['worst_task']})",
                     _fmt(share.get(n)), *[_pct(e["tasks"][t]) for t in tasks]])
    acc = report["accuracy"]
    docs = ", ".join(f"{t} {n}/{acc['total_docs'][t]}" for t, n in acc["docs"].items())
    return [f"## accuracy per task (%; {acc['source']}; documents: {docs})", "",
            md_table(["model", "train samples", "macro", "sd (min-max) over replicates", "worst task", "share of full gain", *tasks],
                     rows), ""]


def render(report: Report) -> str:
    if "generation" in report:
        g = report["generation"]
        return f"# plmtool experts: routed generation (expert {g['expert']})\n\n**prompt:** {g['prompt']}\n\n{g['response']}\n"
    if "job" in report:
        rows = [[u, s.get("samples"), s.get("steps"), s.get("seconds"), s.get("final_loss"), s.get("reused")]
                for u, s in report["train"].items() if u in report["jobs"]]
        return (f"# plmtool experts train: job {report['job']}\n\n"
                + md_table(["adapter", "samples", "steps", "seconds", "final loss", "reused"], rows) + "\n")
    ev, secs = report["eval"], report.get("train_seconds", {})
    lines = [f"# plmtool experts train (K={report['k']}, {report['replicates']} replicate(s) of the 10% units)", ""]
    lines += _accuracy_table(report)
    rec = report.get("recovery_of_full_gain", {})
    if any("loss" in e for e in ev.values()):
        rows = [[name, _fmt(e.get("loss")), _fmt(rec.get(name)), secs.get(name)] for name, e in ev.items() if "loss" in e]
        lines += [f"## held-out loss on assistant tokens ({report['heldout']} samples)", "",
                  md_table(["model", "held-out loss", "share of full-data gain", "train seconds"], rows), ""]
    lines.append(_expert_data_line(report))
    for unit, why in report.get("not_applicable", {}).items():
        lines.append(f"\n{unit}: not trained ({why})")
    if report.get("loss_per_cluster"):
        pc = report["loss_per_cluster"]
        groups = sorted({g for v in pc.values() for g in v}, key=int)
        lines += ["", "## held-out loss per routed group (cluster)", "",
                  md_table(["model", *[f"c{g}" for g in groups]], [[m, *[_fmt(pc[m].get(g)) for g in groups]] for m in pc])]
    if report.get("accuracy", {}).get("routes_per_task"):
        rt = report["accuracy"]["routes_per_task"]
        lines += ["", "## evaluation documents per task x routed cluster", "",
                  md_table(["task", *[f"c{c}" for c in range(report["k"])]], [[t, *row] for t, row in rt.items()])]
    for name, r in report.get("router", {}).items():
        lines += ["", f"{name} (held-out loss): group agreement {r['agreement_group']:.2f}, samples {r['agreement_samples']:.2f}, "
                  f"per-sample oracle {r['agreement_per_sample_oracle']:.2f}; oracle expert per group {r['oracle_expert_per_group']}"]
    for name, r in report.get("accuracy", {}).get("router", {}).items():
        lines += ["", f"{name} (accuracy): group agreement {r['agreement_group']:.2f}; oracle expert per group {r['oracle_expert_per_group']}"]
    if report.get("lm_eval"):
        lines += ["", "## lm-eval (routed per example)", "",
                  md_table(["model", "task", "acc"], [[m, t, a] for m, res in report["lm_eval"].items() for t, a in res.items()])]
    return "\n".join(lines) + "\n"


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="experts_train")
def main(cfg: DictConfig) -> None:
    execute(cfg, run, render)
