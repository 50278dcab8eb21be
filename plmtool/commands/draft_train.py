"""plmtool draft train: train Medusa / Amphista drafting heads on a frozen target.

    plmtool draft train                                     # Amphista on SmolLM2-135M, embedded ShareGPT
    plmtool draft train draft=medusa                        # the Medusa baseline
    plmtool draft train data.source=my_chats.jsonl data.self_distill=true
    plmtool draft train draft.use_auto_embedding=false      # an ablation
    torchrun --nproc_per_node 4 -m plmtool.commands.draft_train experiment=paper hydra.run.dir=DIR

Writes DIR/drafter/ (drafter.safetensors + drafter_config.json naming the base model),
DIR/checkpoints/last.pt (resumable), DIR/metrics.jsonl and DIR/report.json (`heads.top1`, ...).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

import plmtool.config  # noqa: F401  (registers the shared schemas)
import plmtool.draft.config  # noqa: F401  (registers draft_train_schema)
from plmtool.paths import CONF_DIR
from plmtool.markdown import md_table
from plmtool.runner import Report, execute

log = logging.getLogger("plmtool")


def validate(cfg: DictConfig) -> None:
    """Config checks that need no model (run before anything heavy loads)."""
    from plmtool.draft.config import DraftTrainerConfig, DrafterConfig
    from plmtool.draft.drafter import validate_drafter_config
    from plmtool.draft.train import _as_dataclass, validate_trainer_config
    from plmtool.errors import PlmtoolError

    validate_drafter_config(_as_dataclass(cfg.draft, DrafterConfig))
    validate_trainer_config(_as_dataclass(cfg.trainer, DraftTrainerConfig))
    if cfg.data.source != "sharegpt" and not Path(cfg.data.source).expanduser().is_file():
        raise PlmtoolError(f"data.source: {cfg.data.source} is neither 'sharegpt' nor an existing chat JSONL/JSON file")
    if cfg.data.max_seq_len < 8:
        raise PlmtoolError(f"data.max_seq_len must be >= 8, got {cfg.data.max_seq_len}")


def load_training_conversations(data_cfg):
    """The chat data (plmtool.data.chat.ChatData): `data.source`, or with source=sharegpt a
    ShareGPT file at `data.path` instead of the embedded one."""
    from plmtool.data.chat import load_chat

    source = data_cfg.path if data_cfg.source == "sharegpt" and data_cfg.path else data_cfg.source
    return load_chat(source if source == "sharegpt" else str(Path(source).expanduser()), limit=data_cfg.limit)


def _rank_device(device: str) -> str | None:
    """Under torchrun each rank holds its own GPU (cuda:LOCAL_RANK); otherwise the config decides."""
    import os

    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return None


def run(cfg: DictConfig, run_dir: Path) -> Report:
    from plmtool.data.chat import skipped_line
    from plmtool.draft.data import self_distill
    from plmtool.draft.train import train_drafter
    from plmtool.io import Stages
    from plmtool.models import load_model
    from plmtool.models.loader import model_info

    validate(cfg)
    if cfg.trainer.cpu_threads > 0:  # also for the target's passes before training
        import torch

        torch.set_num_threads(cfg.trainer.cpu_threads)
    stages = Stages(run_dir)
    data = load_training_conversations(cfg.data)  # malformed data stops here, before the model loads
    if data.skipped:
        log.warning("%s: %s", data.source, skipped_line(data.skipped))
    conversations = data.conversations
    model, tokenizer = load_model(cfg.model, device=_rank_device(cfg.model.device))
    no_reply = 0
    if cfg.data.self_distill:
        read = len(conversations)
        conversations = self_distill(
            model, tokenizer, conversations, run_dir / "distill",
            max_new_tokens=cfg.data.distill_max_new_tokens, max_turns=cfg.data.distill_max_turns,
            batch_size=cfg.data.distill_batch_size, max_prompt_tokens=cfg.data.distill_prompt_tokens,
        )
        no_reply = read - len(conversations)  # the target answered none of the replayed turns
        if no_reply:
            log.warning("self-distillation: %d conversations left out, the target generated no reply", no_reply)
    if stages.done("train"):
        metrics = stages.result("train")
    else:
        metrics = train_drafter(model, tokenizer, cfg.draft, cfg.trainer, conversations, run_dir, cfg.data,
                                base_model_info={"name_or_path": cfg.model.name_or_path})
        if not metrics["finished"]:  # stopped by trainer.max_time_s: the same command resumes
            return {"model": cfg.model.name_or_path, "drafter": metrics["kind"], **metrics}
        stages.mark("train", metrics)
    exported = None
    if cfg.draft.kind == "medusa" and cfg.export_medusa and not (run_dir / "medusa_export" / "config.json").is_file():
        from plmtool.draft.drafter import load_drafter
        from plmtool.draft.medusa import export_medusa

        exported = str(export_medusa(load_drafter(run_dir / "drafter"), run_dir / "medusa_export", cfg.model.name_or_path))
    elif (run_dir / "medusa_export" / "config.json").is_file():
        exported = str(run_dir / "medusa_export")
    return {
        "medusa_export": exported,
        "model": cfg.model.name_or_path,
        "model_info": model_info(model),
        "drafter": metrics["kind"],
        "data": {**data.summary(), "conversations": len(conversations), "self_distill": bool(cfg.data.self_distill),
                 "distilled_without_reply": no_reply},
        **{k: v for k, v in metrics.items() if k != "eval_history"},
    }


def render(report: Report) -> str:
    if not report.get("finished", True):
        return (f"# plmtool draft train: {report['drafter']} on {report['model']}\n\n"
                f"Stopped by trainer.max_time_s after {report['steps_done']} of {report['steps']} steps "
                f"({report['wall_time_s']} s); state in `{report['checkpoint']}`. Rerun the same command to resume.\n")
    heads = report["heads"]
    rows = [[k, heads["top1"][k], heads["top5"][k], heads["loss"][k], heads["tokens"][k]] for k in range(len(heads["top1"]))]
    loss = report["loss"]
    return (
        f"# plmtool draft train: {report['drafter']} on {report['model']}\n\n"
        f"{report['steps']} steps in {report['wall_time_s']} s ({report['precision']}, {report['device']}); "
        f"{report['trainable_parameters']:,} trainable of {report['parameters']:,} drafter parameters; "
        f"loss {loss['first']} -> {loss['last']}.\n\n"
        + _data_line(report)
        + "Held-out accuracy per head (head k predicts the token t+2+k):\n\n"
        + md_table(["head", "top-1", "top-5", "loss", "tokens"], rows)
        + f"\n\nCheckpoint: `{report['checkpoint']}`\n"
    )


def _data_line(report: Report) -> str:
    from plmtool.data.chat import skipped_line

    data = report["data"]
    skipped = skipped_line(data.get("skipped", {}))
    left_out = [f"{n} {why}" for n, why in ((data.get("distilled_without_reply", 0), "without a reply from the target"),
                                            (report.get("short_conversations", 0), "with fewer than data.min_assistant_tokens supervised tokens"))
                if n]
    return (f"Data: {data['conversations']} conversations from {data['source']}" + (f" ({skipped})" if skipped else "")
            + (f"; left out: {', '.join(left_out)}" if left_out else "") + ".\n\n")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="draft_train")
def main(cfg: DictConfig) -> None:
    execute(cfg, run, render)


if __name__ == "__main__":
    main()
