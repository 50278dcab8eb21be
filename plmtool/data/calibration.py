"""Seeded calibration windows (`nsamples` x `seqlen` tokens), as the pruning references draw them."""

from __future__ import annotations

import random
from typing import Any

from plmtool.data.corpora import joined_text, load_documents
from plmtool.errors import PlmtoolError


def calibration_windows(tokenizer, data_cfg: Any):
    """LongTensor [nsamples, seqlen] from the calibration split of `calib_corpus` (or `corpus`).

    C4 follows the SparseGPT/Wanda loader: pick a random document longer than `seqlen` tokens, then a
    random window inside it. Other corpora: random windows of the joined, once-tokenized text.
    """
    import torch

    name = data_cfg.calib_corpus or data_cfg.corpus
    nsamples, seqlen = int(data_cfg.nsamples), int(data_cfg.seqlen)
    if nsamples <= 0 or seqlen <= 1:
        raise PlmtoolError(f"calibration needs nsamples > 0 and seqlen > 1 (got {nsamples} x {seqlen})")
    rng = random.Random(data_cfg.seed)
    if name == "c4":
        docs = load_documents(name, "calib", data_cfg)
        windows = []
        while len(windows) < nsamples:
            ids = tokenizer(docs[rng.randint(0, len(docs) - 1)], add_special_tokens=False)["input_ids"]
            if len(ids) > seqlen:
                start = rng.randint(0, len(ids) - seqlen - 1)
                windows.append(ids[start : start + seqlen])
        return torch.tensor(windows, dtype=torch.long)
    ids = tokenizer(joined_text(name, "calib", data_cfg), add_special_tokens=False)["input_ids"]
    if len(ids) <= seqlen:
        raise PlmtoolError(f"calibration corpus '{name}' has {len(ids)} tokens: fewer than one window of {seqlen}")
    starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(nsamples)]
    return torch.tensor([ids[s : s + seqlen] for s in starts], dtype=torch.long)
