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
5. Outcome hazards from the static covariates, theta and the forecast states of a rollout
   under an explicit plan: in training and for a forecast's risk the prospective default plan
   (``TwinConfig.hazard_plan``, by default each dose of the last history bin held), never the
   recorded doses after the prediction time, which are unknown then and leak the outcome
   (treatment stops when a patient dies); in a what-if, the what-if's plan.

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
class Trace:
    """What a rollout computed per bin (B, T, .), kept so that another rollout with the same
    history and the same doses before some bin can continue from it (:meth:`TwinModel.branch`):
    the mechanism's mean, the state variance P, the residual's inputs that do not depend on the
    doses (previous teacher-forced state, previous observed flags, time since observed), and the
    residual's memory (None without the residual)."""

    mech_mean: torch.Tensor
    state_var: torch.Tensor
    prev_state: torch.Tensor
    prev_obs: torch.Tensor
    tau: torch.Tensor
    memory: torch.Tensor | None


@dataclass
class Rollout:
    """Predicted mean and variance of every bin (B, T, V), in model units."""

    mean: torch.Tensor
    var: torch.Tensor
    mask_logits: torch.Tensor | None = None
    corrections: torch.Tensor | None = None  # the residual's corrections (B, T, V)
    trace: Trace | None = None


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
        # Post-hoc calibration of the predictive std per variable (model units), fitted on
        # patients the model did not train on (fedtwin.evaluation.calibrate_intervals). A plain
        # attribute, not a parameter or buffer: Flower and Opacus never see it; save_model keeps it.
        self.interval_scale: torch.Tensor | None = None

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
        once on the mechanism's trajectory (see fedtwin.twin.residual for why). The returned
        rollout carries its :class:`Trace`, from which :meth:`branch` continues under other doses.
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
        state_var = torch.stack(pvars, dim=1)
        trace = Trace(mech_mean, state_var, torch.stack(prev_state, dim=1), torch.stack(prev_obs, dim=1), torch.stack(taus, dim=1), None)
        var = state_var + r_var.unsqueeze(1)
        res = self.residual if (use_residual and self.residual is not None) else None
        if res is None:
            return Rollout(mech_mean, var, trace=trace)
        feats = self._residual_features(trace, act, batch.dose, 0, t_total)
        corr, g, hidden, memory = res(feats, self.context(batch, theta))
        trace.memory = memory
        mask_logits = res.mask_logits(hidden) if res.mask_head is not None else None
        return Rollout(mech_mean + corr, var * torch.exp(g), mask_logits, corr, trace)

    def _residual_features(self, trace: Trace, act: torch.Tensor, dose: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """The residual's inputs for bins ``lo..hi-1`` (the previous bin's activations and doses)."""
        b, t_total = act.shape[0], trace.mech_mean.shape[1]
        prev = lambda x: torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)[:, lo:hi]  # noqa: E731 - previous bin
        pos = torch.arange(t_total, dtype=act.dtype)
        phase = torch.stack([(pos >= self.history).to(act.dtype), pos / t_total], dim=1)[lo:hi].expand(b, -1, -1)
        return torch.cat(
            [
                trace.mech_mean[:, lo:hi],
                trace.prev_state[:, lo:hi],
                trace.prev_obs[:, lo:hi],
                tau_feature(trace.tau, t_total)[:, lo:hi],
                prev(act),
                prev(dose),
                phase,
            ],
            dim=-1,
        )

    def branch(self, base: Rollout, batch: TwinBatch, theta: torch.Tensor, use_residual: bool = True) -> Rollout:
        """The rollout under ``batch``'s doses, continuing ``base`` from the prediction time.

        ``batch`` must hold the same patients, history and history doses as the batch ``base``
        was rolled out on, with ``theta`` the same parameters; only horizon doses may differ.
        Bins up to the prediction time are then identical, so only the horizon is recomputed:
        the mechanism from the base's state at the first horizon bin (no observation is read
        there; the state variance P does not depend on doses) and the residual from its memory
        at the last history bin. Equal to a full :meth:`rollout` up to float rounding (tested),
        at about a third of its cost for the ICU spec.
        """
        tr = base.trace
        if tr is None or (use_residual and self.residual is not None and tr.memory is None):
            raise ValueError("branch needs a base rollout with its trace (and the residual's memory)")
        h, t_total = self.history, batch.y.shape[1]
        act = self.drug_activation(batch)
        r_var, _ = self.noise_variances(batch.y)
        x_hat = tr.mech_mean[:, h]
        means = [x_hat]
        if self.config.mechanism:
            mp = mech.unpack(theta, self.layout)
            target = mp.set_point.unsqueeze(1) + mech.set_point_shift(mp.sensitivity, act[:, h : t_total - 1])
            for target_t in target.unbind(dim=1):
                x_hat = mech.relax(x_hat, mp.retention, target_t)  # horizon: x~ = the prediction
                means.append(x_hat)
        else:
            means += [x_hat] * (t_total - 1 - h)
        horizon_mech = torch.stack(means, dim=1)
        mech_mean = torch.cat([tr.mech_mean[:, :h], horizon_mech], dim=1)
        prev_state = torch.cat([tr.prev_state[:, : h + 1], horizon_mech[:, :-1]], dim=1)
        trace = Trace(mech_mean, tr.state_var, prev_state, tr.prev_obs, tr.tau, None)
        var = tr.state_var + r_var.unsqueeze(1)
        res = self.residual if (use_residual and self.residual is not None) else None
        if res is None:
            return Rollout(mech_mean, var, trace=trace)
        assert tr.memory is not None
        feats = self._residual_features(trace, act, batch.dose, h, t_total)
        corr, g, hidden, memory = res(feats, self.context(batch, theta), h0=tr.memory[:, h - 1])
        trace.memory = torch.cat([tr.memory[:, :h], memory], dim=1)
        mask_logits = res.mask_logits(hidden) if res.mask_head is not None else None
        if mask_logits is not None and base.mask_logits is not None:
            mask_logits = torch.cat([base.mask_logits[:, :h], mask_logits], dim=1)
        mean = torch.cat([base.mean[:, :h], horizon_mech + corr], dim=1)
        full_var = torch.cat([base.var[:, :h], var[:, h:] * torch.exp(g)], dim=1)
        corrections = torch.cat([base.corrections[:, :h], corr], dim=1) if base.corrections is not None else corr
        return Rollout(mean, full_var, mask_logits, corrections, trace)

    def hazard_logits(self, batch: TwinBatch, theta: torch.Tensor, rollout: Rollout) -> torch.Tensor | None:
        """Hazard logits (B, O, F+1) read from ``rollout``'s horizon states; the rollout must be
        one under an explicit plan (see :meth:`risk_rollout`), never under recorded future doses."""
        if self.hazard is None:
            return None
        return self.hazard(rollout.mean[:, self.history :], self.context(batch, theta))

    def prospective_doses(self, dose: torch.Tensor) -> torch.Tensor:
        """Model-unit doses (B, T, D) with the horizon replaced by the default prospective plan
        (``TwinConfig.hazard_plan``): ``hold`` continues each intervention's last history-bin dose,
        ``zero`` stops treatment. Only history doses are read."""
        h, f = self.history, self.horizon
        if self.config.hazard_plan == "hold":
            future = dose[:, h - 1 : h].expand(-1, f, -1)
        else:
            future = torch.zeros_like(dose[:, h:])
        return torch.cat([dose[:, :h], future], dim=1)

    def risk_rollout(self, batch: TwinBatch, theta: torch.Tensor, base: Rollout | None = None) -> Rollout:
        """The rollout the hazard is trained on and a forecast's risk reads: the twin under the
        prospective default plan, without gradient; continued from ``base`` (a rollout of the
        same batch and theta) when given, so only the horizon is recomputed.

        Without gradient because the hazard should read the dynamics the likelihood taught, not
        bend an unobserved counterfactual trajectory into a risk score; the hazard still trains
        its own weights and, through the context, the encoder. Under Opacus a no-grad pass
        records no activations, so this adds forward compute only.
        """
        plan = batch.with_doses(self.prospective_doses(batch.dose))
        with torch.no_grad():
            return self.branch(base, plan, theta) if base is not None else self.rollout(plan, theta)

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
        if self.hazard is not None:
            # the hazard reads the rollout under the prospective default plan, NOT `roll`: the
            # recorded horizon doses are unknown at prediction time and leak the outcome
            logits = self.hazard_logits(batch, theta, self.risk_rollout(batch, theta, base=roll))
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
