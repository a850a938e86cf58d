"""The learned residual: what the mechanism misses, as a diagonal linear state-space network.

Per bin t the residual reads the mechanism's prediction for the bin, the previous
(teacher-forced) state, which variables were observed in the previous bin, the time since the
last observation, the previous bin's PD activations and doses, the phase (history or horizon,
position) and a patient context (static covariates and the calibrated parameters)::

    u[t] = tanh(W_in f[t] + W_ctx context)                       (one call over all bins)
    h[t] = lam * h[t-1] + (1 - lam) * u[t],  lam = sigmoid(population vector)
    z[t] = tanh(W_mix [h[t], u[t]])                               (one call over all bins)
    correction[t], g[t] = W_out z[t]                               (one call over all bins)

The hybrid forecast is ``mechanism[t] + correction[t]`` and the predictive variance is
multiplied by ``e^g[t]`` (heteroscedastic noise); optionally ``z`` also feeds a Bernoulli model
of which variables get measured. Only past doses are read (dose of bin t-1 for bin t), like the
mechanism, so a dose given in reaction to a value in the same bin cannot be learned as its cause.

Why this shape: under Opacus, every call of a trainable layer inside a time loop costs a
Python hook and a per-sample gradient accumulation (a per-step MLP made DP-SGD ~4x slower than
the plain step in our measurement), and nn.GRU/LSTM need Opacus's ~6x slower DPGRU/DPLSTM. Here
each nn.Linear runs once over the whole (B, T, .) tensor, so its per-sample gradient is one
einsum, and the recurrence is parameter-free element-wise arithmetic except for the decay
rates, looked up once per patient from a one-row embedding.
"""

from __future__ import annotations


import torch
from torch import nn

from fedtwin.twin.population import PopulationVector

LOGVAR_ADJUST_MAX = 3.0  # the residual can scale the predictive variance by e^-3 .. e^3
INIT_OUT_GAIN = 0.1
DECAY_INIT = (0.5, 0.9)  # initial per-channel memory (retention per bin), spread over channels


def feature_size(n_vars: int, n_drugs: int) -> int:
    """[mechanism mean, previous state, previous observed flags, time since observed] (4V),
    [previous PD activation, previous dose] (2D), [is horizon, position] (2)."""
    return 4 * n_vars + 2 * n_drugs + 2


class ResidualNetwork(nn.Module):
    def __init__(self, n_vars: int, n_drugs: int, n_context: int, hidden: int, mask_model: bool) -> None:
        super().__init__()
        self.n_vars = n_vars
        self.inp = nn.Linear(feature_size(n_vars, n_drugs), hidden)
        self.ctx = nn.Linear(max(n_context, 1), hidden, bias=False)
        lam = torch.linspace(DECAY_INIT[0], DECAY_INIT[1], hidden)
        self.decay = PopulationVector(torch.log(lam / (1 - lam)))
        self.mix = nn.Linear(2 * hidden, hidden)
        self.out = nn.Linear(hidden, 2 * n_vars)
        self.mask_head = nn.Linear(hidden, n_vars) if mask_model else None
        with torch.no_grad():
            self.out.weight.mul_(INIT_OUT_GAIN)
            self.out.bias.zero_()

    def forward(
        self, feats: torch.Tensor, context: torch.Tensor, h0: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Features (B, T, F) and context (B, C) -> correction (B,T,V), log-variance adjustment
        (B,T,V), mixed hidden state z (B,T,H) and the recurrence's memory h (B,T,H).

        ``h0`` (B, H): the memory before the first bin (zeros by default); lets a rollout
        continue from the memory of another one at a given bin (fedtwin.twin.model.TwinModel.branch).
        """
        if context.shape[1] == 0:
            context = context.new_zeros(context.shape[0], 1)
        u = torch.tanh(self.inp(feats) + self.ctx(context).unsqueeze(1))
        lam = torch.sigmoid(self.decay(feats))
        keep = 1.0 - lam
        h = torch.zeros_like(lam) if h0 is None else h0
        states = []
        for u_t in u.unbind(dim=1):
            h = lam * h + keep * u_t
            states.append(h)
        memory = torch.stack(states, dim=1)
        z = torch.tanh(self.mix(torch.cat([memory, u], dim=-1)))
        o = self.out(z)
        corr, lv = o[..., : self.n_vars], o[..., self.n_vars :]
        return corr, LOGVAR_ADJUST_MAX * torch.tanh(lv / LOGVAR_ADJUST_MAX), z, memory

    def mask_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        assert self.mask_head is not None
        return self.mask_head(hidden)


