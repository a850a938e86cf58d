"""Configuration of the twin model, of its training and of DP-SGD.

The model configuration is saved with the weights and must be identical at every site of a
federation (it fixes the parameter layout that Flower averages), so it holds only structural
choices and fixed constants, never anything derived from a site's data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from fedtwin.errors import FedTwinError


@dataclass(frozen=True)
class TwinConfig:
    """Structure and objective weights of the hybrid twin.

    - ``mechanism``: the relaxation + PK/PD core is on (False gives the residual-only baseline).
    - ``residual``: the learned residual network is on (False gives a purely mechanistic twin).
    - ``pd``: ``"emax"`` (saturating, E = S * c / (EC50 + c)) or ``"linear"`` (E = S * c).
    - ``hidden_size``: width of the residual network; ``encoder_hidden``: width of the encoder.
    - ``latent_dim``: unstructured per-patient latent dimensions given to the residual and the
      hazard head, on top of the mechanistic parameters.
    - ``dose_log_scale``: doses of kind bolus/infusion enter as ``log1p(dose) / dose_log_scale``
      (canonical units per bin); exposure fractions enter as they are. The same constant at
      every site, so no site reveals its dose distribution.
    - ``pooling_timescales``: fixed recency kernels (in bins, ``0`` = uniform over the history)
      with which the encoder pools its per-bin features; they let it weigh recent bins more.
    - ``history_weight``, ``hazard_weight``, ``kl_weight``: weights of the objective's terms.
    - ``mask_model``: also fit a Bernoulli model of which variables get measured.
    - ``mask_weight``: weight of that term (ignored without ``mask_model``).
    - ``residual_prior_std``: in the hybrid, the residual's correction of each transition gets
      a N(0, residual_prior_std^2) prior (model units): the network pays for every correction,
      so it explains only what the mechanism cannot and the mechanistic parameters keep their
      meaning. Not applied to the residual-only twin, where the network is the whole dynamics.
    - ``hazard_plan``: the prospective default plan whose rollout the outcome hazard reads, in
      training and for the risk a forecast reports: ``"hold"`` (each intervention's dose of the
      last history bin continued over the horizon) or ``"zero"`` (no further treatment). The
      recorded doses after the prediction time are never used for risk: they are unknown at
      prediction time and leak the outcome (treatment stops when a patient dies). A what-if's
      risk reads the rollout under the what-if's own plan.
    """

    mechanism: bool = True
    residual: bool = True
    pd: Literal["emax", "linear"] = "emax"
    hidden_size: int = 32
    encoder_hidden: int = 32
    latent_dim: int = 4
    dose_log_scale: float = 5.0
    pooling_timescales: tuple[float, ...] = (0.0, 6.0, 2.0)
    history_weight: float = 1.0
    hazard_weight: float = 1.0
    kl_weight: float = 1.0
    mask_model: bool = False
    mask_weight: float = 0.1
    residual_prior_std: float = 0.05
    hazard_plan: Literal["hold", "zero"] = "hold"

    def __post_init__(self) -> None:
        if not (self.mechanism or self.residual):
            raise FedTwinError(
                "TwinConfig with mechanism=False and residual=False has no dynamics at all",
                "switch on the mechanism, the residual network, or both (the default)",
            )
        if self.pd not in ("emax", "linear"):
            raise FedTwinError(f"TwinConfig.pd must be 'emax' or 'linear', got {self.pd!r}", "use pd='emax'")
        for name in ("hidden_size", "encoder_hidden"):
            if getattr(self, name) < 1:
                raise FedTwinError(f"TwinConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.latent_dim < 0:
            raise FedTwinError(f"TwinConfig.latent_dim must be >= 0, got {self.latent_dim}")
        if not self.dose_log_scale > 0:
            raise FedTwinError(f"TwinConfig.dose_log_scale must be positive, got {self.dose_log_scale}")
        if not self.pooling_timescales or any(t < 0 for t in self.pooling_timescales):
            raise FedTwinError(
                f"TwinConfig.pooling_timescales must be non-empty and >= 0, got {self.pooling_timescales}"
            )
        if self.hazard_plan not in ("hold", "zero"):
            raise FedTwinError(
                f"TwinConfig.hazard_plan must be 'hold' or 'zero', got {self.hazard_plan!r}",
                "use hazard_plan='hold' (recorded future doses would leak the outcome into the risk)",
            )
        if not self.residual_prior_std > 0:
            raise FedTwinError(f"TwinConfig.residual_prior_std must be positive, got {self.residual_prior_std}")
        for name in ("history_weight", "hazard_weight", "kl_weight", "mask_weight"):
            if getattr(self, name) < 0:
                raise FedTwinError(f"TwinConfig.{name} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pooling_timescales"] = list(self.pooling_timescales)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TwinConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise FedTwinError(
                f"model config has unknown fields {unknown}",
                "the model file was written by a newer FedTwin; upgrade FedTwin to load it",
            )
        d = dict(data)
        if "pooling_timescales" in d:
            d["pooling_timescales"] = tuple(float(x) for x in d["pooling_timescales"])
        return cls(**d)


@dataclass(frozen=True)
class FitConfig:
    """Local optimisation settings (not part of the model file).

    ``epochs`` applies to non-private training (shuffled minibatches of ``batch_size``);
    private training takes its number of steps and its sampling from :class:`DPSettings`.
    ``num_threads``: torch intra-op threads during training (``None``: 1); the per-bin
    operations are too small to gain from more threads (measured: 2 threads were 5-10x slower
    on a loaded 2-core machine), and sites share their machines.
    ``grad_clip``: global gradient-norm clipping for non-private training (stability only;
    DP training clips per patient instead).
    """

    epochs: int = 1
    batch_size: int = 256
    lr: float = 3e-3
    seed: int = 0
    num_threads: int | None = None
    max_steps: int | None = None
    grad_clip: float | None = 5.0

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or not self.lr > 0:
            raise FedTwinError(
                f"FitConfig needs epochs >= 0, batch_size >= 1 and lr > 0, got "
                f"epochs={self.epochs}, batch_size={self.batch_size}, lr={self.lr}"
            )


@dataclass(frozen=True)
class DPSettings:
    """DP-SGD settings handed over by the privacy ledger (fedtwin.privacy calibrates them).

    One sample is one patient (one CohortTensors row); batches are Poisson-sampled with
    ``sample_rate``; each of ``steps`` optimizer steps clips every patient's gradient to
    ``max_grad_norm`` and adds Gaussian noise of std ``noise_multiplier * max_grad_norm``.
    ``accountant`` and ``delta`` only serve the epsilon reported for information. ``seed``
    fixes the noise and the Poisson sampling and is for tests only: the default (None) draws
    fresh OS entropy, as privacy requires.

    The outcome head is clipped apart from the rest (fedtwin.privacy.group_clipping): it gets
    ``outcome_clip_share`` of the squared clipping norm and its gradient is scaled by
    ``outcome_grad_scale`` first, i.e. raw clip ``sqrt(share) * C / scale`` and noise std
    ``sigma * C / scale``, the rest ``sqrt(1 - share) * C`` and ``sigma * C``. One patient still
    moves the (scaled) sum by at most ``C``: the privacy accounting is unchanged. The constants
    were chosen on synthetic hospitals (docs/privacy.md), never from a site's data;
    ``outcome_clip_share = 0`` is Opacus's flat clipping of the whole gradient.
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    accountant: Literal["prv", "rdp"] = "prv"
    delta: float = 1e-5
    seed: int | None = None
    outcome_clip_share: float = 0.3
    outcome_grad_scale: float = 20.0

    def __post_init__(self) -> None:
        problems = []
        if not self.noise_multiplier >= 0:
            problems.append(f"noise_multiplier={self.noise_multiplier} (must be >= 0)")
        if not self.max_grad_norm > 0:
            problems.append(f"max_grad_norm={self.max_grad_norm} (must be > 0)")
        if not 0 < self.sample_rate <= 1:
            problems.append(f"sample_rate={self.sample_rate} (must be in (0, 1])")
        if self.steps < 1:
            problems.append(f"steps={self.steps} (must be >= 1)")
        if not 0 <= self.outcome_clip_share < 1:
            problems.append(f"outcome_clip_share={self.outcome_clip_share} (must be in [0, 1))")
        if not self.outcome_grad_scale > 0:
            problems.append(f"outcome_grad_scale={self.outcome_grad_scale} (must be > 0)")
        if self.accountant not in ("prv", "rdp"):
            problems.append(f"accountant={self.accountant!r} (must be 'prv' or 'rdp')")
        if not 0 < self.delta < 1:
            problems.append(f"delta={self.delta} (must be in (0, 1))")
        if problems:
            raise FedTwinError("invalid DP settings: " + "; ".join(problems), "take the settings from the privacy ledger")


__all__ = ["DPSettings", "FitConfig", "TwinConfig"]
