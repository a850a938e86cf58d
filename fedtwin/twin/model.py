"""The hybrid twin: calibration encoder + mechanistic core + residual + observation + hazard.

Generative story for one patient (model units, see docs/twin-model.md):

1. theta ~ q(theta | history) (training: one reparameterised sample; KL to the learned
   population prior N(mu_pop, e^lv_pop)).
2. Mechanism over all T bins: m[t+1] = relax(x~[t], a, target[t]), where x~ is the
   teacher-forced state (the observation where one exists in the history, the mechanism's
   prediction otherwise); over the horizon it runs free on the recorded (or planned) doses.
3. Residual: x[t] = m[t] + correction[t], from a network reading the mechanism's trajectory.
4. y[t] ~ N(x[t], (P[t] + R) * e^{g[t]}) wherever observed, with P the state variance
   propagated by the linear mechanism (process noise Q per bin, reset to R at anchoring
   observations) and g the residual's heteroscedastic adjustment.
5. Outcome hazards from the forecast states, the static covariates and theta.

Every trainable tensor sits in an nn.Linear or a one-row nn.Embedding, each called once per
forward pass, so the model runs under Opacus DP-SGD with closed-form per-patient gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fedtwin.errors import FedTwinError
from fedtwin.extract.extractor import static_names
from fedtwin.spec import TwinSpec, spec_hash
from fedtwin.twin import mechanistic as mech
from fedtwin.twin.batch import TwinBatch
from fedtwin.twin.config import TwinConfig
from fedtwin.twin.encoder import CalibrationEncoder, tau_feature
from fedtwin.twin.hazard import HazardHead, hazard_nll
from fedtwin.twin.normalization import Normalizer
from fedtwin.twin.observation import gaussian_nll, kl_gaussians, mask_nll
from fedtwin.twin.population import PopulationVector
from fedtwin.twin.residual import ResidualNetwork

LOG_STD0 = math.log(0.03)  # initial observation / process noise std in model units (range = [-1, 1])
MAX_STATE_VAR = 4.0


@dataclass
class Posterior:
    """q(theta) per patient: mean and log-variance (B, P), and the population prior."""

    mu: torch.Tensor
    logvar: torch.Tensor
    prior_mu: torch.Tensor
    prior_logvar: torch.Tensor

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(self.mu.shape, generator=generator, dtype=self.mu.dtype)
        return self.mu + torch.exp(0.5 * self.logvar) * eps

    def repeat(self, times: int) -> "Posterior":
        r = lambda t: t.repeat_interleave(times, dim=0)  # noqa: E731
        return Posterior(r(self.mu), r(self.logvar), r(self.prior_mu), r(self.prior_logvar))


@dataclass
class Rollout:
    """Predicted mean and variance of every bin (B, T, V), in model units."""

    mean: torch.Tensor
    var: torch.Tensor
    mask_logits: torch.Tensor | None = None
    corrections: torch.Tensor | None = None  # the residual's corrections (B, T, V)


class TwinModel(nn.Module):
    """A hybrid digital twin for one spec."""

    def __init__(self, spec: TwinSpec, config: TwinConfig | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.config = config or TwinConfig()
        self.spec_hash = spec_hash(spec)
        cfg = self.config
        self.norm = Normalizer.from_spec(spec, cfg.dose_log_scale)
        self.layout = mech.ParameterLayout.from_spec(spec, cfg.mechanism, cfg.latent_dim)
        if self.layout.size == 0:
            raise FedTwinError(
                "the twin has no patient-specific parameters (mechanism off and latent_dim=0)",
                "set latent_dim >= 1 for a residual-only twin",
            )
        v, d = self.n_vars, self.n_drugs
        self.n_static = len(static_names(spec))
        self.history, self.horizon = spec.time.history_steps, spec.time.horizon_steps
        self.window = self.history + self.horizon
        prior_mean, prior_logvar = self.layout.prior_init()
        self.prior = PopulationVector(torch.cat([prior_mean, prior_logvar]))
        self.pk = PopulationVector(mech.pk_init(d)) if (cfg.mechanism and d > 0) else None
        self.noise = PopulationVector(torch.zeros(2 * v))
        self.encoder = CalibrationEncoder(
            self.layout, self.n_static, self.history, self.window, cfg.encoder_hidden, cfg.pooling_timescales
        )
        n_context = self.n_static + self.layout.size
        self.residual = ResidualNetwork(v, d, n_context, cfg.hidden_size, cfg.mask_model) if cfg.residual else None
        self.hazard = HazardHead(v, n_context, len(spec.outcomes), self.horizon, cfg.hidden_size) if spec.outcomes else None
        self.windows = torch.tensor([o.within_steps for o in spec.outcomes], dtype=torch.float32)

    # ---- sizes -------------------------------------------------------------------------
    @property
    def n_vars(self) -> int:
        return len(self.spec.state_variables)

    @property
    def n_drugs(self) -> int:
        return len(self.spec.interventions)

    # ---- calibration -------------------------------------------------------------------
    def posterior(self, batch: TwinBatch) -> Posterior:
        """q(theta | history) for every patient of the batch (reads history bins only)."""
        h, p = self.history, self.layout.size
        delta_mu, delta_lv, obs_mean, has = self.encoder(
            batch.y[:, :h], batch.m[:, :h], batch.logcount[:, :h], batch.dose[:, :h], batch.static
        )
        prior = self.prior(batch.y)
        mu_p, lv_p = prior[:, :p], prior[:, p:]
        mu = mu_p + delta_mu
        if self.config.mechanism:
            v = self.n_vars
            anchor = has * (obs_mean - mu_p[:, :v])  # set points start at the observed mean
            mu = torch.cat([mu[:, :v] + anchor, mu[:, v:]], dim=1)
        return Posterior(mu=mu, logvar=lv_p + delta_lv, prior_mu=mu_p, prior_logvar=lv_p)

    def context(self, batch: TwinBatch, theta: torch.Tensor) -> torch.Tensor:
        return torch.cat([batch.static, theta], dim=1)

    # ---- dynamics ----------------------------------------------------------------------
    def noise_variances(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Observation variance R and process variance Q per bin (B, V)."""
        raw = self.noise(like)
        v = self.n_vars
        return torch.exp(2 * (raw[:, :v] + LOG_STD0)), torch.exp(2 * (raw[:, v:] + LOG_STD0))

    def drug_activation(self, batch: TwinBatch) -> torch.Tensor:
        """PD activations (B, T, D): Emax/linear of the PK amounts, or raw doses without the mechanism."""
        if self.pk is None:
            return batch.dose
        retention, ec50 = mech.pk_unpack(self.pk(batch.y), self.n_drugs)
        return mech.pd_activation(mech.concentrations(batch.dose, retention), ec50, self.config.pd)

    def rollout(self, batch: TwinBatch, theta: torch.Tensor, use_residual: bool = True) -> Rollout:
        """Teacher-forced over the history, free-running over the horizon, in one pass.

        The time loop holds only the mechanism's element-wise arithmetic on activations
        (theta, noise, PK/PD), no trainable layer: the residual then runs over all bins at
        once on the mechanism's trajectory (see fedtwin.twin.residual for why).
        """
        b, t_total, v = batch.y.shape
        y, m = batch.y, batch.m
        in_history = (torch.arange(t_total) < self.history).to(y.dtype)
        anchor = m * in_history.view(1, -1, 1)  # observations the rollout may read
        r_var, q_var = self.noise_variances(y)
        act = self.drug_activation(batch)
        if self.config.mechanism:
            mp = mech.unpack(theta, self.layout)
            targets = (mp.set_point.unsqueeze(1) + mech.set_point_shift(mp.sensitivity, act)).unbind(dim=1)
            a = mp.retention
            x_hat = mp.set_point
            p_state = (q_var / (1 - a * a)).clamp(max=MAX_STATE_VAR)
        else:
            targets, a = (), None
            x_hat = y.new_zeros(b, v)
            p_state = y.new_ones(b, v)
        ys, anchors = y.unbind(dim=1), anchor.unbind(dim=1)
        tau = y.new_full((b, v), float(t_total))
        means, pvars, prev_state, prev_obs, taus = [x_hat], [p_state], [x_hat], [torch.zeros_like(x_hat)], [tau]
        for t in range(t_total - 1):
            seen = anchors[t] > 0
            x_til = torch.where(seen, ys[t], x_hat)
            p_til = torch.where(seen, r_var, p_state)
            tau = torch.where(seen, torch.zeros_like(tau), tau)
            if self.config.mechanism:
                x_hat = mech.relax(x_til, a, targets[t])
                p_state = (a * a * p_til + q_var).clamp(max=MAX_STATE_VAR)
            else:
                x_hat = x_til  # without the mechanism the state carries over
                p_state = (p_til + q_var).clamp(max=MAX_STATE_VAR)
            tau = (tau + 1).clamp(max=float(t_total))
            means.append(x_hat)
            pvars.append(p_state)
            prev_state.append(x_til)
            prev_obs.append(anchors[t])
            taus.append(tau)
        mech_mean = torch.stack(means, dim=1)
        var = torch.stack(pvars, dim=1) + r_var.unsqueeze(1)
        res = self.residual if (use_residual and self.residual is not None) else None
        if res is None:
            return Rollout(mech_mean, var)
        shift = lambda x: torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)  # noqa: E731 - previous bin
        phase = torch.stack([1 - in_history, torch.arange(t_total, dtype=y.dtype) / t_total], dim=1).expand(b, -1, -1)
        feats = torch.cat(
            [
                mech_mean,
                torch.stack(prev_state, dim=1),
                torch.stack(prev_obs, dim=1),
                tau_feature(torch.stack(taus, dim=1), t_total),
                shift(act),
                shift(batch.dose),
                phase,
            ],
            dim=-1,
        )
        corr, g, hidden = res(feats, self.context(batch, theta))
        mask_logits = res.mask_logits(hidden) if res.mask_head is not None else None
        return Rollout(mech_mean + corr, var * torch.exp(g), mask_logits, corr)

    def hazard_logits(self, batch: TwinBatch, theta: torch.Tensor, rollout: Rollout) -> torch.Tensor | None:
        if self.hazard is None:
            return None
        return self.hazard(rollout.mean[:, self.history :], self.context(batch, theta))

    # ---- objective ---------------------------------------------------------------------
    def loss_terms(self, batch: TwinBatch, sample: bool = True) -> dict[str, torch.Tensor]:
        """Per-patient terms (B,): forecast NLL (horizon), history NLL, KL, hazard NLL, mask NLL."""
        post = self.posterior(batch)
        theta = post.sample() if sample else post.mu
        roll = self.rollout(batch, theta)
        t_total = batch.y.shape[1]
        hist = (torch.arange(t_total) < self.history).to(batch.y.dtype)
        zero = batch.y.new_zeros(batch.size)
        terms = {
            "forecast_nll": gaussian_nll(batch.y, roll.mean, roll.var, batch.m, 1 - hist),
            "history_nll": gaussian_nll(batch.y, roll.mean, roll.var, batch.m, hist),
            "kl": kl_gaussians(post.mu, post.logvar, post.prior_mu, post.prior_logvar),
            "hazard_nll": zero,
            "mask_nll": zero,
            "residual_penalty": zero,
        }
        logits = self.hazard_logits(batch, theta, roll)
        if logits is not None:
            terms["hazard_nll"] = hazard_nll(logits, batch.haz_surv, batch.haz_event)
        if roll.corrections is not None:
            terms["residual_penalty"] = 0.5 * (roll.corrections / self.config.residual_prior_std).pow(2).sum(dim=(1, 2))
        if roll.mask_logits is not None:
            terms["mask_nll"] = mask_nll(roll.mask_logits, batch.m)
        return terms

    def objective(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-patient loss (B,), scaled by 1/(T*V) so magnitudes do not depend on the spec."""
        c = self.config
        total = (
            terms["forecast_nll"]
            + c.history_weight * terms["history_nll"]
            + c.kl_weight * terms["kl"]
            + c.hazard_weight * terms["hazard_nll"]
            + (terms["residual_penalty"] if c.mechanism else 0.0)
            + (c.mask_weight * terms["mask_nll"] if c.mask_model else 0.0)
        )
        return total / (self.window * self.n_vars)

    def forward(self, batch: TwinBatch) -> torch.Tensor:
        """Per-patient loss (B,); training minimises its mean."""
        return self.objective(self.loss_terms(batch))
