"""Run under torchrun by tests/draft/test_draft_train.py: DDP drafter training on a tiny target (gloo, CPU)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from plmtool.draft.config import DraftDataConfig, DrafterConfig, DraftTrainerConfig
from plmtool.draft.drafter import build_drafter
from plmtool.draft.train import train_drafter
from tests.conftest import build_tiny_llama, build_tiny_tokenizer
from tests.draft.train_helpers import tiny_conversations


def main(out: str) -> None:
    torch.set_num_threads(1)
    tok = build_tiny_tokenizer()
    target = build_tiny_llama(len(tok))
    trainer = DraftTrainerConfig(max_steps=6, batch_size=4, lr=3e-3, warmup_steps=1, log_every=2, eval_every=3, save_every=3)
    drafter = build_drafter(DrafterConfig(kind="amphista", num_heads=2), target)
    metrics = train_drafter(target, tok, None, trainer, tiny_conversations(16), out, DraftDataConfig(heldout=4, max_seq_len=96),
                            drafter=drafter)
    rank = int(os.environ["RANK"])
    # every replica must hold the same weights after DDP's gradient averaging
    # a time limit: rank 0's clock decides for every rank (here the limits differ on purpose: a
    # rank stopping alone would leave the other waiting in its next collective)
    stops = {}
    for name, limit_on_rank0 in (("rank0_in_time", 1e9), ("rank0_out_of_time", 1e-9)):
        limited = DraftTrainerConfig(**{**vars(trainer), "max_time_s": limit_on_rank0 if rank == 0 else (1e-9 if limit_on_rank0 > 1 else 1e9)})
        m = train_drafter(target, tok, DrafterConfig(kind="amphista", num_heads=2), limited, tiny_conversations(16),
                          Path(out) / name, DraftDataConfig(heldout=4, max_seq_len=96))
        stops[name] = (m["finished"], m.get("steps_done", m.get("steps")))
    torch.save({"world_size": metrics["world_size"], "top1": metrics["heads"]["top1"], "state": drafter.state_dict(),
                "stops": stops}, Path(out) / f"rank{rank}.pt")

if __name__ == "__main__":
    main(sys.argv[1])
