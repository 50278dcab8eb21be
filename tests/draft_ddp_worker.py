"""Run under torchrun by tests/test_draft_train.py: DDP drafter training on a tiny target (gloo, CPU)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import build_tiny_tokenizer  # noqa: E402
from conftest_draft import tiny_conversations, tiny_target  # noqa: E402

from plmtool.draft.config import DraftDataConfig, DrafterConfig, DraftTrainerConfig  # noqa: E402
from plmtool.draft.drafter import build_drafter  # noqa: E402
from plmtool.draft.train import train_drafter  # noqa: E402


def main(out: str) -> None:
    torch.set_num_threads(1)
    tok = build_tiny_tokenizer()
    target = tiny_target(len(tok))
    trainer = DraftTrainerConfig(max_steps=6, batch_size=4, lr=3e-3, warmup_steps=1, log_every=2, eval_every=3, save_every=3)
    drafter = build_drafter(DrafterConfig(kind="amphista", num_heads=2), target)
    metrics = train_drafter(target, tok, None, trainer, tiny_conversations(16), out, DraftDataConfig(heldout=4, max_seq_len=96),
                            drafter=drafter)
    rank = int(os.environ["RANK"])
    # every replica must hold the same weights after DDP's gradient averaging
    torch.save({"world_size": metrics["world_size"], "top1": metrics["heads"]["top1"], "state": drafter.state_dict()},
               Path(out) / f"rank{rank}.pt")

if __name__ == "__main__":
    main(sys.argv[1])
