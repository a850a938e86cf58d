"""Population-level parameters (shared by all patients) in a DP-SGD-compatible form.

Opacus computes per-patient gradients only for parameters that live in layers it knows
(nn.Linear, nn.Embedding, ...). A bare ``nn.Parameter`` used by many patients would need its
slow functorch fallback. So each population vector is a one-row ``nn.Embedding`` looked up
once per patient: the lookup gives every patient its own copy, and Opacus's embedding grad
sampler yields exact per-patient gradients at negligible cost.
"""

from __future__ import annotations

import torch
from torch import nn


class PopulationVector(nn.Module):
    """A learned vector of ``size`` population values, returned once per patient (B, size)."""

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        init = torch.as_tensor(init, dtype=torch.float32).reshape(1, -1)
        self.table = nn.Embedding(1, init.shape[1])
        with torch.no_grad():
            self.table.weight.copy_(init)

    @property
    def size(self) -> int:
        return int(self.table.weight.shape[1])

    def forward(self, like: torch.Tensor) -> torch.Tensor:
        """One copy per row of ``like`` (any tensor whose first dimension is the batch)."""
        idx = torch.zeros(like.shape[0], dtype=torch.long, device=like.device)
        return self.table(idx)

    def value(self) -> torch.Tensor:
        """The vector itself (for reporting), without a batch dimension."""
        return self.table.weight[0]
