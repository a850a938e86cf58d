"""Amortised Bayesian calibration: history window -> Gaussian posterior over patient parameters.

Instead of fitting each patient's set points, rates and sensitivities by optimisation, one
network maps the patient's own history (values only where observed, masks, measurement
counts, time since the last measurement, doses, static covariates) to the mean and
log-variance of a diagonal Gaussian over the parameter vector theta. The posterior is
expressed relative to the population prior (mean = prior mean + correction, log-variance =
prior log-variance + correction), so an untrained encoder returns the prior and the learned
population prior is what a new site starts from. Set points are additionally anchored on the
patient's mean observed value, the natural first guess, which the encoder then corrects.

Only ``nn.Linear`` layers with batch-first inputs: Opacus computes their per-patient
gradients in closed form, whatever the number of history bins.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fedtwin.twin.mechanistic import ParameterLayout

INIT_POSTERIOR_LOGVAR_SHIFT = -2.0  # start with posteriors ~e^-1 times narrower than the prior


def time_since_observed(m: torch.Tensor) -> torch.Tensor:
    """Bins since the last observation per (B, T, V); T (the window length) if never observed."""
    b, t, v = m.shape
    steps = torch.arange(t, dtype=m.dtype).view(1, t, 1).expand(b, t, v)
    last = torch.where(m > 0, steps, torch.full_like(steps, -1.0)).cummax(dim=1).values
    return torch.where(last >= 0, steps - last, torch.full_like(steps, float(t)))


def tau_feature(tau: torch.Tensor, window: int) -> torch.Tensor:
    """Time since observed, squashed to [0, 1] on a log scale."""
    return torch.log1p(tau) / math.log1p(window)


def pooling_weights(history: int, timescales: tuple[float, ...]) -> torch.Tensor:
    """(H, K) normalised recency kernels: uniform (timescale 0) or exponential decay."""
    age = torch.arange(history - 1, -1, -1, dtype=torch.float32)  # bins before the prediction time
    cols = [torch.ones(history) if ts <= 0 else torch.exp(-age / ts) for ts in timescales]
    w = torch.stack(cols, dim=1)
    return w / w.sum(dim=0, keepdim=True)


class CalibrationEncoder(nn.Module):
    """Posterior q(theta | history) = N(mu, diag(exp(logvar)))."""

    def __init__(self, layout: ParameterLayout, n_static: int, history: int, window: int, hidden: int, timescales: tuple[float, ...]) -> None:
        super().__init__()
        v, d = layout.n_vars, layout.n_drugs
        self.layout = layout
        self.history = history
        self.window = window
        self.timescales = tuple(timescales)
        self._pool = pooling_weights(history, self.timescales)
        self.step = nn.Linear(4 * v + d + 1, hidden)
        self.mix = nn.Linear(len(self.timescales) * hidden + 4 * v + n_static, hidden)
        self.out = nn.Linear(hidden, 2 * layout.size)
        with torch.no_grad():
            self.out.weight.mul_(0.1)
            self.out.bias.zero_()
            self.out.bias[layout.size :] = INIT_POSTERIOR_LOGVAR_SHIFT

    def summaries(self, y: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per variable over the history: mean observed value, last observed value, fraction
        of bins observed and whether it was observed at all (all 0 when never observed)."""
        cnt = m.sum(dim=1)
        has = (cnt > 0).to(y.dtype)
        mean = (y * m).sum(dim=1) / cnt.clamp(min=1.0)
        h = m.shape[1]
        steps = torch.arange(h, dtype=y.dtype).view(1, h, 1)
        last_idx = torch.where(m > 0, steps, torch.full_like(m, -1.0)).amax(dim=1).clamp(min=0).long()
        last = torch.gather(y, 1, last_idx.unsqueeze(1)).squeeze(1) * has
        return mean, last, cnt / h, has

    def forward(
        self, y: torch.Tensor, m: torch.Tensor, logcount: torch.Tensor, dose: torch.Tensor, static: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """History tensors (B, H, .) -> (delta_mu, delta_logvar, obs_mean, has_obs).

        ``y`` must be 0 where ``m`` is 0; only ``y * m`` is ever read.
        """
        b, h, _ = y.shape
        y = y * m
        tau = tau_feature(time_since_observed(m), self.window)
        pos = torch.linspace(0.0, 1.0, h).view(1, h, 1).expand(b, h, 1)
        feats = torch.cat([y, m, logcount * m, tau, dose, pos], dim=-1)
        per_bin = torch.tanh(self.step(feats))  # (B, H, hidden)
        pooled = torch.einsum("bhc,hk->bkc", per_bin, self._pool).reshape(b, per_bin.shape[2] * self._pool.shape[1])
        mean, last, frac, has = self.summaries(y, m)
        hidden = torch.tanh(self.mix(torch.cat([pooled, mean, last, frac, has, static], dim=-1)))
        out = self.out(hidden)
        k = self.layout.size
        return out[:, :k], out[:, k:], mean, has
