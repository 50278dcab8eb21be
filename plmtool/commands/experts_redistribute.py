"""plmtool experts redistribute: embed, cluster and redistribute instruction data to a budget.

    plmtool experts redistribute experiment=smoke
    plmtool experts redistribute experts.data=my_tasks.jsonl experts.k=null experts.budget=0.1
    plmtool experts redistribute experts/redistribute=minilm experts.need=ifd
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

import plmtool.config  # noqa: F401  (registers the shared schemas)
import plmtool.experts.config  # noqa: F401  (registers experts_redistribute_schema)
from plmtool.data.chat import skipped_line
from plmtool.paths import CONF_DIR, cache_dir
from plmtool.markdown import md_table
from plmtool.runner import Report, execute


def run(cfg: DictConfig, run_dir: Path) -> Report:
    from plmtool.experts import run_redistribute

    o = cfg.experts
    run_redistribute.check_options(o)  # before any data or model is loaded

    def load():
        from plmtool.models import load_model

        return load_model(cfg.model)

    cache = Path(o.cache_dir).expanduser() if o.cache_dir else cache_dir(cfg.model.get("cache_dir")) / "experts" / "embeddings"
    return run_redistribute.run(o, run_dir, int(cfg.seed), load, str(cfg.model.name_or_path), cache)


def render(report: Report) -> str:
    lines = [
        f"# plmtool experts redistribute: {report['selected']} of {report['total']} samples "
        f"(budget {report['budget']:.0%}, K={report['k']})",
        "",
        md_table(
            ["cluster", "size before", "size after", "random", "held-out", "dense modes", "tail (sel.)", "eps", "example"],
            [[c["cluster"], c["size_before"], c["size_after"], c["size_random"], c["heldout"], c["dense_modes"],
              f"{c['tail']} ({c['tail_selected']})", c["eps"], (c["examples"] or [""])[0].replace("|", "/").replace("\n", " ")[:50]]
             for c in report["clusters"]],
        ),
    ]
    if report.get("task_cluster"):
        k = report["k"]
        rows = [[t, *[row.get(str(c), 0) for c in range(k)], report.get("task_selected", {}).get(t, 0)]
                for t, row in sorted(report["task_cluster"].items())]
        lines += ["", "## task x cluster", "", md_table(["task", *[f"c{c}" for c in range(k)], "selected"], rows)]
    if report.get("k_scores"):
        lines += ["", "K search: " + ", ".join(f"K={k}: {v:.3f}" for k, v in report["k_scores"].items())]
    lines += ["", f"embedder: {report['embedder']['encoder']} (cached: {report['embedder']['cached']}); need: {report['need']}; "
              f"seconds: {report['seconds']}"]
    data = report.get("data", {})
    skipped = skipped_line(data.get("skipped", {}))
    drawn = f" ({data['limit_rule']} of {data['read']})" if data.get("limit_rule") else ""
    lines += ["", f"data: {data.get('conversations')} samples from {data.get('source')}{drawn}" + (f"; {skipped}" if skipped else "")]
    if report.get("tasks"):
        lines += ["", f"## tasks (floor {report['task_floor']} selected per task)", "",
                  md_table(["task", "pool", "selected", "random", "task-balanced random", "held-out", "added by the floor"],
                           [[t, v["size_before"], v["size_after"], v["size_random"], v["size_random_balanced"], v["heldout"],
                             v["floor_added"]] for t, v in report["tasks"].items()])]
    if report.get("plot"):
        lines += ["", f"![semantic space]({report['plot']})"]
    return "\n".join(lines) + "\n"


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="experts_redistribute")
def main(cfg: DictConfig) -> None:
    execute(cfg, run, render)
