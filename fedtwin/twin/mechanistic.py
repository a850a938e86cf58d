"""The mechanistic core: set-point relaxation driven by one-compartment PK and Emax/linear PD.

Per patient and state variable ``v`` (model units, one step = one bin)::

    c[t, d]   = exp(-ke_d) * c[t-1, d] + u[t, d]                (PK: amount in the compartment)
    A[t, d]   = c / (EC50_d + c)      (emax)   or   c   (linear) (PD activation)
    target[v] = s_v + sum_{d links v} S_vd * A[t, d]             (drugs shift the set point)
    x[t+1, v] = a_v * x[t, v] + (1 - a_v) * target[t, v],  a_v = exp(-k_v)

``s`` (set points), ``k`` (relaxation rates) and ``S`` (sensitivities, only for the
drug -> variable links the spec declares in ``InterventionSpec.affects``) are patient-specific
and inferred by the encoder; ``ke`` (elimination rates) and ``EC50`` are population values.
A drug's effect is expressed as the shift of the equilibrium at full effect, which keeps the
parameters interpretable and bounded whatever the time step. This is a generic family
configured by the spec (names, counts, links); it copies no particular simulator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedtwin.spec import TwinSpec

MIN_RATE = 1e-3
MIN_EC50 = 1e-3


def softplus_inverse(y: float) -> float:
    return math.log(math.expm1(y))


# Population prior initialisation (model units): mean and standard deviation per parameter kind.
PRIOR_INIT = {
    "set_point": (0.0, 0.3),
    "rate": (softplus_inverse(0.3), 0.7),
    "sensitivity": (0.0, 0.3),
    "latent": (0.0, 1.0),
}
PK_INIT_RETENTION = 0.5  # exp(-ke) per bin
PK_INIT_EC50 = 0.5


@dataclass(frozen=True)
class ParameterLayout:
    """Where each patient-specific parameter sits in the vector theta the encoder calibrates.

    Order: set points (V), rates (V), sensitivities (one per declared link), then the
    ``latent_dim`` unstructured latents. Without the mechanism only the latents remain.
    """

    state_names: tuple[str, ...]
    intervention_names: tuple[str, ...]
    links: tuple[tuple[int, int], ...]  # (variable index, intervention index)
    mechanism: bool
    latent_dim: int

    @classmethod
    def from_spec(cls, spec: TwinSpec, mechanism: bool, latent_dim: int) -> "ParameterLayout":
        names = spec.state_names
        links = []
        for d, iv in enumerate(spec.interventions):
            for a in iv.affects:
                links.append((names.index(a), d))
        return cls(tuple(names), tuple(spec.intervention_names), tuple(links), mechanism, latent_dim)

    @property
    def n_vars(self) -> int:
        return len(self.state_names)

    @property
    def n_drugs(self) -> int:
        return len(self.intervention_names)

    @property
    def n_mech(self) -> int:
        return (2 * self.n_vars + len(self.links)) if self.mechanism else 0

    @property
    def size(self) -> int:
        return self.n_mech + self.latent_dim

    def kinds(self) -> list[str]:
        """The kind of each entry of theta (keys of PRIOR_INIT)."""
        k = (["set_point"] * self.n_vars + ["rate"] * self.n_vars + ["sensitivity"] * len(self.links)) if self.mechanism else []
        return k + ["latent"] * self.latent_dim

    def names(self) -> list[str]:
        out: list[str] = []
        if self.mechanism:
            out += [f"{v}.set_point" for v in self.state_names]
            out += [f"{v}.rate" for v in self.state_names]
            out += [f"{self.intervention_names[d]}->{self.state_names[v]}.sensitivity" for v, d in self.links]
        return out + [f"latent_{i}" for i in range(self.latent_dim)]

    def prior_init(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Initial population prior (mean, log-variance) of theta."""
        mean = torch.tensor([PRIOR_INIT[k][0] for k in self.kinds()], dtype=torch.float32)
        logvar = torch.tensor([2 * math.log(PRIOR_INIT[k][1]) for k in self.kinds()], dtype=torch.float32)
        return mean, logvar


@dataclass
class MechParams:
    """Patient parameters in usable form: set points (B,V), rates and retentions (B,V),
    sensitivities scattered onto a (B,V,D) matrix that is zero where the spec has no link."""

    set_point: torch.Tensor
    rate: torch.Tensor
    retention: torch.Tensor
    sensitivity: torch.Tensor


def unpack(theta: torch.Tensor, layout: ParameterLayout) -> MechParams:
    v, d = layout.n_vars, layout.n_drugs
    b = theta.shape[0]
    s = theta[:, :v]
    k = F.softplus(theta[:, v : 2 * v]) + MIN_RATE
    if layout.links:
        onehot = theta.new_zeros(len(layout.links), v * d)
        for i, (vi, di) in enumerate(layout.links):
            onehot[i, vi * d + di] = 1.0
        sens = (theta[:, 2 * v : 2 * v + len(layout.links)] @ onehot).reshape(b, v, d)
    else:
        sens = theta.new_zeros(b, v, d)
    return MechParams(set_point=s, rate=k, retention=torch.exp(-k), sensitivity=sens)


def pk_init(n_drugs: int) -> torch.Tensor:
    """Initial raw population PK vector: [elimination rate raw (D), EC50 raw (D)]."""
    ke = softplus_inverse(-math.log(PK_INIT_RETENTION))
    return torch.tensor([ke] * n_drugs + [softplus_inverse(PK_INIT_EC50)] * n_drugs, dtype=torch.float32)


def pk_unpack(raw: torch.Tensor, n_drugs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2D) raw -> per-bin retention exp(-ke) (B, D) and EC50 (B, D)."""
    ke = F.softplus(raw[:, :n_drugs]) + MIN_RATE
    ec50 = F.softplus(raw[:, n_drugs:]) + MIN_EC50
    return torch.exp(-ke), ec50


def concentrations(dose: torch.Tensor, retention: torch.Tensor) -> torch.Tensor:
    """One-compartment amounts (B, T, D) from doses per bin (B, T, D); empty before the window."""
    out = []
    c = dose.new_zeros(dose.shape[0], dose.shape[2])
    r = retention
    for t in range(dose.shape[1]):
        c = r * c + dose[:, t]
        out.append(c)
    return torch.stack(out, dim=1)


def pd_activation(conc: torch.Tensor, ec50: torch.Tensor, kind: str) -> torch.Tensor:
    """Emax activation c/(EC50+c) in [0, 1), or the amount itself for linear PD."""
    if kind == "linear":
        return conc
    return conc / (ec50[:, None, :] + conc)


def set_point_shift(sensitivity: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
    """Shift of each variable's equilibrium (B, T, V) = sum over linked drugs of S_vd * A_d."""
    return torch.einsum("bvd,btd->btv", sensitivity, activation)


def relax(x: torch.Tensor, retention: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One exact step of dx/dt = -k (x - target) with the target held over the bin."""
    return retention * x + (1.0 - retention) * target
