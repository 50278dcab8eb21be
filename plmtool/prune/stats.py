"""Statistics of a linear layer's inputs, accumulated over calibration samples.

Both follow the reference code's running means over *samples* (sequences), kept in fp32:
  * `sq_norm`  (Wanda's `scaler_row`): mean over samples of sum over tokens of x_j^2,
  * `gram`     (SparseGPT's `H`): 2/n * sum over samples of X X^T.
The running-mean update (rescale, then add) is the references' own, so per-column rankings match.
"""

from __future__ import annotations

import math

import torch


class InputStats:
    def __init__(self, columns: int, device: torch.device | str, gram: bool, norms: bool = True):
        self.columns = columns
        self.nsamples = 0
        self.sq_norm = torch.zeros(columns, device=device) if norms else None
        self.gram = torch.zeros(columns, columns, device=device) if gram else None

    @torch.no_grad()
    def add(self, x: torch.Tensor, batch: int | None = None) -> None:
        """`x`: the layer input for one forward call, [batch, tokens, columns] or [tokens, columns].
        `batch`: samples in the call, when the model flattened them (OPT's MLP sees [tokens, cols])."""
        if x.dim() == 2:
            x = x.unsqueeze(0)
        batch = batch or x.shape[0]
        flat = x.reshape(-1, x.shape[-1])
        scale_old = self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        if self.sq_norm is not None:
            self.sq_norm *= scale_old
            self.sq_norm += torch.norm(flat.float(), p=2, dim=0) ** 2 / self.nsamples
        if self.gram is not None:
            self.gram *= scale_old
            xs = math.sqrt(2 / self.nsamples) * flat.float()
            self.gram += xs.t() @ xs

    def free(self) -> None:
        self.gram = None
        self.sq_norm = None
