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
from plmtool.runner import Report, execute, md_table


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
    what = {"redistributed": "its cluster's share of the redistributed subset", "cluster": "its whole cluster of the pool"}
    counts = ", ".join(f"{e} {n}" for e, n in report["expert_samples"].items())
    return f"each expert trained on {what[report['expert_data']]} (experts.expert_data={report['expert_data']}); samples: {counts}"


def render(report: Report) -> str:
    if "generation" in report:
        g = report["generation"]
        return f"# plmtool experts: routed generation (expert {g['expert']})\n\n**prompt:** {g['prompt']}\n\n{g['response']}\n"
    if "job" in report:
        s = report["train"].get(report["job"], {})
        return (f"# plmtool experts train: job {report['job']}\n\n"
                + md_table(["adapter", "samples", "steps", "seconds", "final loss", "reused"],
                           [[report["job"], s.get("samples"), s.get("steps"), s.get("seconds"), s.get("final_loss"), s.get("reused")]]) + "\n")
    ev, secs = report["eval"], report.get("train_seconds", {})
    rec = report.get("recovery_of_full_gain", {})
    rows = [[name, _fmt(v), _fmt(rec.get(name)), secs.get(name)] for name, v in ev.items()]
    lines = [f"# plmtool experts train: held-out loss on assistant tokens ({report['heldout']} samples, K={report['k']})", "",
             md_table(["model", "held-out loss", "share of full-data gain", "train seconds"], rows), "",
             _expert_data_line(report)]
    pc = report["eval_per_cluster"]
    groups = sorted({g for v in pc.values() for g in v}, key=int)
    lines += ["", "## per held-out group (routed cluster)", "",
              md_table(["model", *[f"c{g}" for g in groups]], [[m, *[_fmt(pc[m].get(g)) for g in groups]] for m in pc])]
    if report.get("eval_per_task"):
        pt = report["eval_per_task"]
        tasks = sorted({t for v in pt.values() for t in v})
        lines += ["", "## per task", "", md_table(["model", *tasks], [[m, *[_fmt(pt[m].get(t)) for t in tasks]] for m in pt])]
    if report.get("router"):
        r = report["router"]
        lines += ["", f"router vs oracle: group agreement {r['agreement_group']:.2f}, samples {r['agreement_samples']:.2f}, "
                  f"per-sample oracle {r['agreement_per_sample_oracle']:.2f}; oracle expert per group {r['oracle_expert_per_group']}"]
    if report.get("lm_eval"):
        lines += ["", "## lm-eval (routed per example)", "",
                  md_table(["model", "task", "acc"], [[m, t, a] for m, res in report["lm_eval"].items() for t, a in res.items()])]
    return "\n".join(lines) + "\n"


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="experts_train")
def main(cfg: DictConfig) -> None:
    execute(cfg, run, render)
