"""The patient model: latent parameters, the hourly state transition, and outcome hazards.

Discrete time with a one-hour step, aligned with the spec's bins: ``x[k]`` is the (noise-free)
state of bin k, i.e. of ``[admission + k h, admission + (k+1) h)``; every measurement taken in the
bin observes ``x[k]`` plus observation noise. A dose given in bin k enters its drug's effect
compartment in bin k and first changes the state of bin k+1.

The model deliberately goes beyond what a mechanistic twin (linear relaxation to a set point,
one-compartment PK, saturating PD) can represent, so that learned residuals have something to
learn: an inflammatory state with logistic growth and antibiotic-timed resolution drives MAP down
(vasoplegia, multiplicative in MAP), lactate and glucose up (stress response, with insulin
resistance); lactate clearance depends on MAP through a sigmoid perfusion curve; kidney injury
accumulates only while MAP is below a threshold, and creatinine follows it slowly; heart rate
couples to MAP through a nonlinear baroreflex; fluid responsiveness decays with the cumulative
volume given. docs/synthetic-hospitals.md writes every equation out; the constants are here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from fedtwin.synth.population import Population

# State order = concepts.STATE_NAMES (the spec's order).
HR, MAP, GLU, CR, LAC = range(5)
N_STATE = 5
# Drug order = concepts.DRUG_NAMES.
NE, INS, FURO, FLUID = range(4)
N_DRUG = 4
# Process-noise channels: the five states and inflammation.
N_NOISE = 6

# Effect-compartment elimination rates (per hour): amount[k] = amount[k-1] * exp(-ke) + dose[k].
KE = np.array([3.0, 0.7, 0.5, 0.25])
DECAY = np.exp(-KE)

# Physiological bounds keep every state inside the spec's plausible range.
LOWER = np.array([30.0, 25.0, 40.0, 0.2, 0.3])
UPPER = np.array([220.0, 170.0, 700.0, 15.0, 25.0])
# Process noise: additive s.d. for HR and MAP, relative s.d. for glucose, creatinine, lactate.
PROCESS_SD = np.array([3.0, 2.5, 0.04, 0.015, 0.05])
INFLAMMATION_SD = 0.02


@dataclass
class LatentParams:
    """Per-patient latent parameters, one (N,) float64 array each. Units: mmHg, /min, mg/dL,
    mmol/L, per hour; drug sensitivities per canonical unit (ug, [iU], mg, mL)."""

    map_set: np.ndarray  # MAP set point
    hr_set: np.ndarray
    glu_set: np.ndarray
    cr_base: np.ndarray  # creatinine of the uninjured kidney
    lac_base: np.ndarray
    k_map: np.ndarray  # relaxation rates (1/h)
    k_hr: np.ndarray
    k_glu: np.ndarray
    k_cr: np.ndarray
    k_lac: np.ndarray  # lactate clearance at full perfusion
    ne_emax: np.ndarray  # MAP rise at saturating norepinephrine (mmHg at steady state)
    ne_ec50: np.ndarray  # norepinephrine amount for half effect (ug in the effect compartment)
    ins_sens: np.ndarray  # fractional glucose fall per hour per [iU] in the compartment
    fluid_resp: np.ndarray  # MAP rise per hour per litre in the compartment, fluid-naive
    furo_map: np.ndarray  # MAP fall per hour at saturating furosemide
    furo_cr: np.ndarray  # creatinine rise per hour at saturating furosemide
    baro_gain: np.ndarray  # heart-rate response to MAP below 72
    vasoplegia: np.ndarray  # MAP fall per hour at inflammation 1
    stress: np.ndarray  # glucose rise per hour at inflammation 1 (x 25 mg/dL)
    kidney_susceptibility: np.ndarray
    infl_growth: np.ndarray  # logistic growth rate of inflammation
    infl_resolve: np.ndarray  # extra resolution rate once antibiotics act
    abx_hour: np.ndarray  # hour at which antibiotics take effect
    age: np.ndarray
    severity: np.ndarray
    septic: np.ndarray  # 0/1

    @property
    def n(self) -> int:
        return int(self.map_set.shape[0])

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def matrix(self) -> np.ndarray:
        """(N, K) float64, columns in :meth:`names` order (the ground truth stores this)."""
        return np.stack([getattr(self, f) for f in self.names()], axis=1).astype(np.float64)

    def tile(self, reps: int) -> "LatentParams":
        """The same patients repeated ``reps`` times (one block per counterfactual plan)."""
        return LatentParams(**{f: np.tile(getattr(self, f), reps) for f in self.names()})


@dataclass
class State:
    """What the transition needs at the start of bin k: the state of bin k, inflammation and
    kidney injury of bin k, and the drug amounts / cumulative fluid *before* bin k's doses."""

    x: np.ndarray  # (N, 5)
    infl: np.ndarray  # (N,)
    injury: np.ndarray  # (N,)
    amount: np.ndarray  # (N, 4)
    cum_fluid: np.ndarray  # (N,) mL

    def copy(self) -> "State":
        return State(self.x.copy(), self.infl.copy(), self.injury.copy(), self.amount.copy(), self.cum_fluid.copy())

    def tile(self, reps: int) -> "State":
        return State(
            np.tile(self.x, (reps, 1)), np.tile(self.infl, reps), np.tile(self.injury, reps),
            np.tile(self.amount, (reps, 1)), np.tile(self.cum_fluid, reps),
        )


def _lognormal(rng: np.random.Generator, median: float, sd: float, n: int) -> np.ndarray:
    return median * np.exp(rng.normal(0.0, sd, n))


def draw_params(pop: Population, rng: np.random.Generator) -> LatentParams:
    """Latent parameters: set points shaped by comorbidities, age and sex; rates and
    sensitivities log-normal around population medians (patient heterogeneity a twin must
    calibrate per patient)."""
    n = pop.n
    female = pop.gender_concept_id == 8532
    htn, dm = pop.hypertension.astype(float), pop.diabetes.astype(float)
    age = pop.age
    return LatentParams(
        map_set=np.clip(rng.normal(80.0, 7.0, n) + 7.0 * htn, 62.0, 110.0),
        hr_set=np.clip(rng.normal(80.0, 9.0, n) + 0.05 * (60.0 - age), 55.0, 110.0),
        glu_set=np.clip(rng.normal(105.0, 12.0, n) + 45.0 * dm, 75.0, 220.0),
        cr_base=np.clip(_lognormal(rng, 0.9, 0.25, n) * (1.0 + 0.006 * (age - 50.0)) * np.where(female, 0.85, 1.0), 0.4, 3.0),
        lac_base=np.clip(_lognormal(rng, 0.9, 0.2, n), 0.5, 1.8),
        k_map=_lognormal(rng, 0.30, 0.25, n),
        k_hr=_lognormal(rng, 0.35, 0.25, n),
        k_glu=_lognormal(rng, 0.20, 0.25, n),
        k_cr=_lognormal(rng, 0.05, 0.25, n),
        k_lac=_lognormal(rng, 0.35, 0.25, n),
        ne_emax=_lognormal(rng, 30.0, 0.25, n),
        ne_ec50=_lognormal(rng, 500.0, 0.3, n),
        ins_sens=_lognormal(rng, 0.02, 0.35, n),
        fluid_resp=_lognormal(rng, 6.0, 0.4, n),
        furo_map=_lognormal(rng, 3.0, 0.3, n),
        furo_cr=_lognormal(rng, 0.02, 0.3, n),
        baro_gain=_lognormal(rng, 0.8, 0.3, n),
        vasoplegia=_lognormal(rng, 9.0, 0.25, n),
        stress=_lognormal(rng, 1.0, 0.3, n),
        kidney_susceptibility=_lognormal(rng, 0.25, 0.4, n),
        infl_growth=_lognormal(rng, 0.10, 0.3, n),
        infl_resolve=_lognormal(rng, 0.12, 0.6, n),
        abx_hour=rng.uniform(2.0, 36.0, n),
        age=age.astype(np.float64),
        severity=pop.severity.astype(np.float64),
        septic=pop.septic.astype(np.float64),
    )


def initial_state(p: LatentParams, rng: np.random.Generator) -> State:
    """The state at ICU admission: septic patients arrive inflamed, hypotensive and acidotic in
    proportion to their severity; some kidneys are already injured."""
    n, sev, septic = p.n, p.severity, p.septic
    infl = np.where(
        septic > 0,
        np.clip(0.25 + 0.7 * sev + rng.normal(0.0, 0.15, n), 0.05, 1.0),
        0.1 * sev * rng.random(n),
    )
    x = np.empty((n, N_STATE))
    x[:, MAP] = p.map_set - 30.0 * infl**1.5 - 12.0 * sev * rng.random(n) + rng.normal(0.0, 5.0, n)
    x[:, HR] = p.hr_set + 20.0 * infl + 10.0 * sev + rng.normal(0.0, 6.0, n)
    x[:, GLU] = p.glu_set + 50.0 * infl + rng.normal(0.0, 15.0, n)
    injury = sev * rng.uniform(0.0, 0.8, n) * (1.0 + 0.2 * septic)
    x[:, CR] = p.cr_base * (1.0 + injury) * np.exp(rng.normal(0.0, 0.05, n))
    x[:, LAC] = p.lac_base + 3.0 * infl * sev + 0.15 * np.maximum(65.0 - x[:, MAP], 0.0) + np.abs(rng.normal(0.0, 0.3, n))
    np.clip(x, LOWER, UPPER, out=x)
    return State(x=x, infl=infl, injury=injury, amount=np.zeros((n, N_DRUG)), cum_fluid=np.zeros(n))


def perfusion(map_: np.ndarray) -> np.ndarray:
    """Tissue perfusion in (0, 1): a sigmoid of MAP around 60 mmHg (lactate clearance uses it)."""
    return 1.0 / (1.0 + np.exp(-(map_ - 60.0) / 5.0))


def advance(p: LatentParams, s: State, dose: np.ndarray, hour: int, noise: np.ndarray) -> State:
    """One hour: bin k's doses enter the compartments, then the state of bin k+1 is computed.

    ``dose`` (N, 4) in canonical units; ``noise`` (N, 6) standard normal process noise.
    """
    amount = s.amount * DECAY + dose
    cum_fluid = s.cum_fluid + dose[:, FLUID]
    x, infl, inj = s.x, s.infl, s.injury
    hr, map_, glu, cr, lac = x[:, HR], x[:, MAP], x[:, GLU], x[:, CR], x[:, LAC]

    e_ne = amount[:, NE] / (amount[:, NE] + p.ne_ec50)
    e_furo = amount[:, FURO] / (amount[:, FURO] + 40.0)
    litres = amount[:, FLUID] / 1000.0
    responsiveness = p.fluid_resp * np.exp(-cum_fluid / 3000.0)
    low_map = np.maximum(72.0 - map_, 0.0)

    d_map = (
        p.k_map * (p.map_set - map_)
        - p.vasoplegia * infl**1.5 * (map_ / 80.0)
        + p.ne_emax * p.k_map * e_ne
        + responsiveness * litres / (1.0 + 0.5 * infl)
        - p.furo_map * e_furo
        + PROCESS_SD[MAP] * noise[:, MAP]
    )
    d_hr = (
        p.k_hr * (p.hr_set - hr)
        + 0.3 * p.baro_gain * low_map**1.3
        + 6.0 * infl
        + 5.0 * e_ne
        - 2.0 * litres * low_map / 10.0
        + PROCESS_SD[HR] * noise[:, HR]
    )
    perf = perfusion(map_)
    d_lac = (
        p.k_lac * p.lac_base
        + 0.6 * infl
        + 0.05 * np.maximum(65.0 - map_, 0.0)
        - p.k_lac * lac * (0.2 + 0.8 * perf) * (1.0 + 0.4 * np.minimum(litres, 1.0) * infl)
        + PROCESS_SD[LAC] * lac * noise[:, LAC]
    )
    d_inj = (
        0.01 * p.kidney_susceptibility * np.maximum(68.0 - map_, 0.0) ** 1.2 * (1.0 + infl)
        + 0.08 * p.kidney_susceptibility * infl**2
        - 0.01 * inj
    )
    d_cr = p.k_cr * (p.cr_base * (1.0 + inj) - cr) + p.furo_cr * e_furo + PROCESS_SD[CR] * cr * noise[:, CR]
    d_glu = (
        p.k_glu * (p.glu_set - glu)
        + 25.0 * p.stress * infl
        + 8.0 * e_ne
        - p.ins_sens * amount[:, INS] * glu / (1.0 + 1.5 * infl)
        + PROCESS_SD[GLU] * glu * noise[:, GLU]
    )
    resolve = 0.02 + p.infl_resolve / (1.0 + np.exp(-(hour - p.abx_hour) / 3.0))
    d_infl = p.infl_growth * infl * (1.0 - infl) - resolve * infl + INFLAMMATION_SD * noise[:, 5]

    nx = np.empty_like(x)
    nx[:, HR] = hr + d_hr
    nx[:, MAP] = map_ + d_map
    nx[:, GLU] = glu + d_glu
    nx[:, CR] = cr + d_cr
    nx[:, LAC] = lac + d_lac
    np.clip(nx, LOWER, UPPER, out=nx)
    return State(
        x=nx,
        infl=np.clip(infl + d_infl, 0.0, 1.2),
        injury=np.clip(inj + d_inj, 0.0, 5.0),
        amount=amount,
        cum_fluid=cum_fluid,
    )


# Log-hazard intercepts (per hour), tuned so that, across the presets, about 11-15% of the cohort
# die and 9-13% develop AKI within 48 h of the prediction time.
DEATH_INTERCEPT = -6.8
AKI_INTERCEPT = -6.9


def hazards(p: LatentParams, s: State, hour: int) -> np.ndarray:
    """(N, 2) hourly hazards of death and of AKI in bin ``hour``, from the latent state of that bin.

    The death hazard ramps (quadratically) from 15% to its full value over the first 24 h:
    resuscitation protects early on, and ICU deaths come mostly from organ failure that persists."""
    x = s.x
    map_, lac, hr = x[:, MAP], x[:, LAC], x[:, HR]
    low = np.maximum(65.0 - map_, 0.0)
    death = (
        DEATH_INTERCEPT
        + 0.04 * (p.age - 65.0)
        + 0.10 * low
        + 1.0 * np.log(lac)
        + 3.0 * s.infl
        + 0.6 * np.maximum(s.injury - 0.5, 0.0)
        + 0.02 * np.maximum(hr - 110.0, 0.0)
    )
    aki = AKI_INTERCEPT + 3.5 * np.minimum(s.injury, 3.0) + 0.06 * low + 2.0 * s.infl + 0.02 * (p.age - 65.0)
    ramp = 0.15 + 0.85 * min(hour / 24.0, 1.0) ** 2
    return np.stack([ramp * np.exp(death), np.exp(aki)], axis=1)


def event_probability(h: np.ndarray) -> np.ndarray:
    """Probability that an event with hourly hazard ``h`` happens within the hour."""
    return -np.expm1(-h)
