"""Observation model: heteroscedastic Gaussian with a masked likelihood, optional mask model.

Missing values are modelled, not imputed: a bin/variable contributes to the likelihood only
where it was observed. The 0 placeholders of unobserved entries are replaced by the model's
own mean before any arithmetic (``torch.where``), so they influence neither the loss nor its
gradient, whatever value they hold.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)
MIN_VAR = 1e-5


def gaussian_nll(y: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, m: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Sum over bins and variables of ``weight * m * -log N(y; mean, var)``: one value per patient.

    ``weight`` (T,) weighs history against horizon bins.
    """
    var = var.clamp(min=MIN_VAR)
    obs = m > 0
    y_safe = torch.where(obs, y, mean.detach())
    nll = 0.5 * (LOG_2PI + torch.log(var) + (y_safe - mean) ** 2 / var)
    nll = torch.where(obs, nll, torch.zeros_like(nll))
    return (nll * weight.view(1, -1, 1)).sum(dim=(1, 2))


def mask_nll(logits: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Bernoulli NLL of which variables were measured, one value per patient."""
    return F.binary_cross_entropy_with_logits(logits, m, reduction="none").sum(dim=(1, 2))


def kl_gaussians(mu_q: torch.Tensor, lv_q: torch.Tensor, mu_p: torch.Tensor, lv_p: torch.Tensor) -> torch.Tensor:
    """KL(N(mu_q, e^lv_q) || N(mu_p, e^lv_p)) summed over dimensions, one value per patient."""
    return 0.5 * (lv_p - lv_q + (torch.exp(lv_q) + (mu_q - mu_p) ** 2) * torch.exp(-lv_p) - 1.0).sum(dim=-1)
