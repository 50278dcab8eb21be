"""Statistics of a linear layer's inputs, accumulated over calibration samples.

Both follow the reference code's running means over *samples* (sequences), kept in fp32:
  * `sq_norm`  (Wanda's `scaler_row`): mean over samples of sum over tokens of x_j^2,
  * `gram`     (SparseGPT's `H`): 2/n * sum over samples of X X^T.
The running-mean update (rescale, then add) is the references' own, so per-column rankings match.

Speed without approximation: the references compute the Gram matrix in fp32 with TF32 off. When the
activations are fp16 / bf16 (the usual GPU case), every input value is exactly representable in
TF32 (10 mantissa bits, fp32's exponent range) and tensor cores accumulate the exact products in
fp32, so the TF32 matmul gives the fp32 result up to summation order at several times the speed.
The 2/n scale is applied after the product (scaling the inputs first would make them inexact).
"""

from __future__ import annotations

import torch

from plmtool.prune.precision import tf32_matmuls


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
            xf = flat.float()
            exact_tf32 = xf.is_cuda and flat.dtype in (torch.float16, torch.bfloat16)
            # a caller may allow TF32 anyway (the SDS walks)
            with tf32_matmuls(torch.backends.cuda.matmul.allow_tf32 or exact_tf32):
                # gram = scale_old * gram + (2 / n) * X^T X, in place
                self.gram.addmm_(xf.t(), xf, beta=scale_old, alpha=2 / self.nsamples)

    def free(self) -> None:
        self.gram = None
        self.sq_norm = None
