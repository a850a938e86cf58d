"""Outcome head: a discrete-time hazard per outcome over its ``within_steps`` window.

For outcome ``o`` and bin ``j`` after the prediction time the hazard is
``h[o, j] = sigmoid(g_o(x_hat[j], static, theta, basis(j)) + HAZARD_OFFSET)``, where
``x_hat[j]`` is the twin's forecast state in that bin, so the risk responds to the forecast
trajectory and hence to the intervention plan of a what-if. Beyond the forecast horizon the
hazard is constant per outcome (the "tail", computed from the last forecast state), so a
window of any length costs one extra row:

    risk_o = 1 - prod_{j < min(W, F)} (1 - h[o, j]) * (1 - h_tail[o]) ** max(0, W - F)

The likelihood (targets from :func:`fedtwin.twin.batch.hazard_targets`) is
``sum_j surv[o, j] * log(1 - h[o, j]) + event[o, j] * log h[o, j]``, with the survived-bin
counts of the tail in the last column.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HAZARD_OFFSET = -4.0  # a fixed prior logit (hazard ~2% per bin) so learned values stay small


def time_basis(horizon: int) -> torch.Tensor:
    """(F+1, 3) features of the row: [inside horizon, relative position, tail]."""
    j = torch.arange(horizon, dtype=torch.float32)
    rows = torch.stack([torch.ones(horizon), (j + 1) / horizon, torch.zeros(horizon)], dim=1)
    tail = torch.tensor([[0.0, 1.0, 1.0]])
    return torch.cat([rows, tail], dim=0)


class HazardHead(nn.Module):
    def __init__(self, n_vars: int, n_context: int, n_outcomes: int, horizon: int, hidden: int) -> None:
        super().__init__()
        self.horizon = horizon
        self._basis = time_basis(horizon)
        self.hidden = nn.Linear(n_vars + n_context + 3, hidden)
        self.out = nn.Linear(hidden, n_outcomes)
        with torch.no_grad():
            self.out.weight.mul_(0.1)
            self.out.bias.zero_()

    def forward(self, x_horizon: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Forecast states (B, F, V) and context (B, C) -> hazard logits (B, O, F+1)."""
        b = x_horizon.shape[0]
        states = torch.cat([x_horizon, x_horizon[:, -1:]], dim=1)  # the tail sees the last state
        feats = torch.cat(
            [states, context.unsqueeze(1).expand(b, self.horizon + 1, context.shape[1]), self._basis.expand(b, -1, -1)],
            dim=-1,
        )
        logits = self.out(torch.tanh(self.hidden(feats))) + HAZARD_OFFSET
        return logits.transpose(1, 2)


def hazard_nll(logits: torch.Tensor, surv: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood per patient (B,)."""
    log_surv = -F.softplus(logits)  # log(1 - h)
    log_h = -F.softplus(-logits)  # log h
    return -(surv * log_surv + event * log_h).sum(dim=(1, 2))


def risk(logits: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """P(event within each outcome's window) (B, O); ``windows`` (O,) = within_steps."""
    f = logits.shape[2] - 1
    j = torch.arange(f, dtype=logits.dtype)
    inside = (j.view(1, -1) < windows.view(-1, 1)).to(logits.dtype)  # (O, F)
    tail = (windows - f).clamp(min=0).to(logits.dtype)  # (O,)
    log_surv = -F.softplus(logits)
    total = (log_surv[:, :, :f] * inside).sum(dim=2) + log_surv[:, :, f] * tail
    return -torch.expm1(total)
