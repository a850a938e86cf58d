"""The card's prose: fixed, honest statements, filled in with facts from the spec and the study.

Nothing here is typed per run: every sentence is a template whose blanks are the spec's variables,
drugs, outcomes, horizon and step, or the study's settings. What the text claims is what
docs/twin-model.md, docs/evaluation.md and docs/privacy.md establish about FedTwin; where the
evidence cannot tell (e.g. whether the sites' data were synthetic), the text says so instead of
guessing.
"""

from __future__ import annotations

from typing import Any


def _names(items: list[dict[str, Any]]) -> list[str]:
    return [str(i.get("name")) for i in items]


def _join(words: list[str]) -> str:
    if not words:
        return "none"
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def spec_facts(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec facts the prose is templated with (plain JSON, also stored in the card)."""
    time = spec.get("time", {}) or {}
    return {
        "name": spec.get("name"),
        "description": " ".join(str(spec.get("description", "")).split()),
        "step": time.get("step"),
        "history_steps": time.get("history_steps"),
        "horizon_steps": time.get("horizon_steps"),
        "variables": _names(spec.get("state_variables", [])),
        "interventions": _names(spec.get("interventions", [])),
        "outcomes": _names(spec.get("outcomes", [])),
        "links": sorted(
            f"{iv.get('name')} -> {v}" for iv in spec.get("interventions", []) for v in iv.get("affects", [])
        ),
    }


def model_description(spec: dict[str, Any]) -> str:
    f = spec_facts(spec)
    return (
        f"Hybrid patient digital twin '{f['name']}': from {f['history_steps']} bins of {f['step']} of a patient's history it "
        f"forecasts {_join(f['variables'])} over the next {f['horizon_steps']} bins of {f['step']}, under the recorded or a "
        f"planned course of {_join(f['interventions'])}, with prediction intervals, and scores the risk of "
        f"{_join(f['outcomes'])}. A mechanistic core (per-variable relaxation towards a patient-specific set point; "
        "one-compartment pharmacokinetics and Emax/linear pharmacodynamics on the links the spec declares) is calibrated per "
        "patient by an amortised Gaussian posterior and corrected by a penalised learned residual; outcomes come from a "
        "discrete-time hazard head read under the prospective default plan. Trained by federated averaging of DP-SGD "
        "updates, aggregated under SecAgg+."
    )


def intended_use(spec: dict[str, Any], study: dict[str, Any]) -> dict[str, Any]:
    f = spec_facts(spec)
    return {
        "primary_uses": [
            "Research use only: studying how hybrid mechanistic/learned twins trained across hospitals under differential "
            "privacy forecast physiology and treatment response, and how they compare with simpler baselines.",
            f"Retrospective, model-based what-if exploration of {_join(f['interventions'])} on {_join(f['variables'])} "
            f"over {f['horizon_steps']} bins of {f['step']}, by researchers who understand the assumptions stated below.",
            "Method development and auditing of federated, privacy-preserving training (provenance, privacy accounting, "
            "suppressed federated evaluation).",
        ],
        "primary_users": [
            "Researchers and data scientists of the participating consortium.",
            "Auditors and data-governance staff reviewing privacy spend, provenance and fairness.",
        ],
        "out_of_scope_uses": [
            "Any clinical decision about an individual patient (diagnosis, treatment choice, dosing, triage, prognosis "
            "disclosed to patients). The twin is not a medical device and has not been validated prospectively.",
            f"Risk scores of {_join(f['outcomes'])} as alarms or screening tools: discrimination and calibration were "
            "measured only retrospectively on the participating sites' held-out patients.",
            "Use on populations, care settings, OMOP mappings or time periods unlike the participating sites' (see "
            "training data), or on interventions, variables or outcomes outside the spec.",
            "Causal claims about treatments: what-if answers are model-based counterfactuals that assume no unmeasured "
            "confounding given the history.",
            "Re-identifying or characterising individual patients: the card and its evidence hold only suppressed "
            "aggregates by design; the twin itself must not be used to probe training patients.",
        ],
    }


def factors(spec: dict[str, Any]) -> list[str]:
    fair = spec.get("fairness", {}) or {}
    attrs = [a for a in ("sex", "race") if fair.get(a)]
    if fair.get("age_bands"):
        attrs.append("age band")
    return [
        f"Evaluation factors: {_join(attrs)}" + (" and their pairwise intersections" if fair.get("intersections") else "")
        + "; every metric is reported per subgroup where the suppression rule allows.",
        "Relevant factors not disaggregated here: site (site-level metrics are never released; only sums over sites), "
        "admission type, severity of illness, comorbidities, data-capture practice (measurement frequency, OMOP mapping).",
        "A patient whose sex, race or age is missing or outside the listed levels is in the overall cohort but in no "
        "subgroup of that attribute.",
    ]


def missing_data_handling() -> list[str]:
    return [
        "Missing measurements are modelled, not imputed: only observed entries enter the likelihood; unobserved entries "
        "are replaced by the model's own mean before any arithmetic, so their placeholder never changes the loss.",
        "The forecast variance grows with the time since the last observation (variance propagated by the mechanism).",
        "Measurement patterns enter only through history features (counts, time since last measurement); horizon "
        "measurements and masks are never inputs. Informative missingness is described, not corrected.",
        "Without a recorded end of follow-up, no event means no event through the outcome window (administrative "
        "censoring); a death censors the other outcomes.",
    ]


def uncertainty_method() -> list[str]:
    return [
        "Monte Carlo over the patient's amortised Gaussian posterior (one rollout per draw); the mixture is summarised "
        "as a Gaussian in model units and intervals are exact quantiles under each variable's transform (asymmetric "
        "for log-scaled variables).",
        "Measured coverage of the nominal 50 % and 90 % intervals on held-out patients is reported below; the evidence "
        "does not record whether split-conformal interval calibration was applied (FedTwin's federated training does "
        "not apply it; a DP model's calibration factors would be a further, unaccounted release).",
        "Confidence intervals of metrics come from additive sufficient statistics summed over sites: Wald with "
        "cluster-robust (patient-level) SEs for forecast errors and NLL, Wilson for coverage, Hanley-McNeil for AUROC, "
        "logit (Boyd) for AUPRC, Wald for Brier/ECE/slope/intercept, Poisson-log for O:E. No bootstrap (it would need "
        "patient rows).",
    ]


def metric_definitions() -> dict[str, str]:
    return {
        "rmse": "root mean squared error of the predictive mean, canonical units, pooled over the horizon",
        "mae": "mean absolute error of the predictive mean, canonical units",
        "bias": "mean error (observed - predicted mean), canonical units",
        "nll": "mean negative log-likelihood of the observations under the model's own predictive density (nats)",
        "coverage50": "share of held-out observations inside the central 50 % prediction interval",
        "coverage90": "share of held-out observations inside the central 90 % prediction interval",
        "auroc": "area under the ROC curve of the risk under the prospective default plan (binned, 200 bins)",
        "auprc": "average precision of the same risk",
        "brier": "mean squared difference of risk and outcome",
        "ece": "expected calibration error over 10 equal-width risk bins (biased upwards near 0)",
        "oe_ratio": "observed / expected events",
        "calibration_slope": "slope b of logit P(y) = a + b logit(p) (1 = ideal)",
        "calibration_intercept": "intercept a of logit P(y) = a + logit(p), calibration-in-the-large (0 = ideal)",
        "tpr": "true-positive rate at the report's decision threshold (risk >= threshold is predicted positive)",
        "fpr": "false-positive rate at the same threshold",
        "effect_rmse": "RMSE of predicted minus true what-if effect (synthetic sites with ground truth only)",
    }


def calibration_curve_note() -> str:
    return (
        "No reliability diagram: the federated evaluation report publishes calibration as ECE, O:E, calibration slope "
        "and intercept (each with its CI), not the per-bin sums of predicted and observed risk, so a binned calibration "
        "curve cannot be drawn from the evidence without inventing data. The figure shows the published calibration "
        "summaries with their CIs instead."
    )


def ethical_considerations(spec: dict[str, Any], study: dict[str, Any]) -> list[str]:
    return [
        "Patient data never left the sites: each site trained locally with DP-SGD (the privacy unit is the "
        f"{study.get('privacy_unit')}), and only securely aggregated updates and summed evaluation statistics were released.",
        "The evaluation statistics are released as suppressed sums (cells resting on fewer than "
        f"{study.get('suppression_threshold')} patients are withheld, with complementary suppression) WITHOUT differential "
        "privacy accounting: they are not covered by the epsilon reported below.",
        "DP noise comes from torch's default pseudo-random generator (Opacus secure_mode off, torchcsprng unavailable): "
        "the guarantee assumes an attacker who cannot reconstruct the generator's state."
        if not study.get("secure_rng")
        else "DP noise is drawn with Opacus secure_mode (a cryptographically secure generator).",
        "Subgroups small enough to be suppressed are exactly those where the model's performance is least known; "
        "fairness gaps are computed over shown groups only and can hide the worst group.",
        "Treatment patterns in the training data reflect past clinical decisions (confounding by indication); a what-if "
        "can reproduce historical biases in who received which treatment.",
    ]


def caveats(spec: dict[str, Any], study: dict[str, Any]) -> list[str]:
    f = spec_facts(spec)
    return [
        "Not validated prospectively, and not externally validated beyond the held-out patients of the participating "
        "sites.",
        "If the sites' databases were synthetic (fedtwin synth, as in the demo), every figure here describes the "
        "simulator, not patients; the evidence records the OMOP data sources but not whether they were synthetic.",
        f"DP twins are weak at small epsilon: in FedTwin's benchmark (4 sites of 300-720 patients, docs/results.md) "
        f"the federated DP twins' risk scores ranked deaths no better than chance, often backwards (AUROC 0.36-0.42 "
        f"at epsilon 1-8; the DP noise on the outcome head), while forecasts degraded gracefully; this study's "
        f"allowance was epsilon {study.get('epsilon_per_site')} per site.",
        "Under DP the prediction intervals were not recalibrated and tend to over-cover (conservative).",
        f"What-if answers for {_join(f['interventions'])} are limited to the declared links ({_join(f['links'])}); "
        "effects on other variables can only appear as associations learned by the residual.",
        "Risks are read under the prospective default plan (last history doses held), not under the doses actually "
        "given after the prediction time.",
        "Metrics are pooled over sites; a site whose case mix differs can see different performance, which this card "
        "cannot show (site-level metrics are never released).",
    ]


def mechanistic_limitations(spec: dict[str, Any]) -> list[str]:
    f = spec_facts(spec)
    return [
        f"Interactions beyond the declared links ({_join(f['links'])}) enter only through the penalised residual, and only "
        "as associations.",
        f"No coupling between state variables ({_join(f['variables'])}): each relaxes on its own; physiological coupling is "
        "left to the residual.",
        f"Set points and rates are constant over the {f['history_steps']} + {f['horizon_steps']} bin window: drifts can be "
        "absorbed by the residual, regime changes cannot.",
        "Pharmacokinetics are one compartment in transformed dose units with population elimination rates: no weight-based "
        "dosing, tolerance or delayed onset, and doses before the window are unknown (amounts start at 0).",
        "Confounding by indication: what-ifs assume that, given the history and the twin's state, the recorded doses are "
        "as good as random.",
        "Uncertainty is approximate: the posterior mixture is summarised as a Gaussian and amortised inference can be over- "
        "or under-confident.",
    ]


def update_plan(spec: dict[str, Any], study: dict[str, Any]) -> list[str]:
    return [
        "Any retraining is a new study with a new chain of signed round records and a new card; this card describes only "
        "the model whose aggregate hash it cites.",
        "Each retraining spends further privacy budget at every site: the ledger composes it with everything spent before "
        "and refuses plans that exceed the site's budget.",
        "Drift monitoring: re-run the federated evaluation round on newer held-out patients of each site and compare the "
        "suppressed report with this card's figures (forecast RMSE, interval coverage, AUROC, O:E and calibration slope); "
        "a confidence interval that no longer overlaps, a coverage outside the nominal level or an O:E away from 1 calls "
        "for retraining or withdrawal.",
        "A change of the spec (variables, drugs, outcomes, horizon, cohort), of the OMOP CDM version or vocabulary "
        "mapping at a site, or of the code version requires a new study and card.",
    ]


def privacy_notes(study: dict[str, Any]) -> list[str]:
    return [
        "Epsilon is each site's composed spend after the last round as its ledger reports it (one accountant run over all "
        "DP-SGD steps on the site's patients, earlier trainings included), not a sum of per-round epsilons.",
        f"epsilon_per_site ({study.get('epsilon_per_site')}) is what this training was allowed to add on top of each site's "
        "earlier spend; the noise multiplier was calibrated once for all rounds.",
        "Evaluation statistics (suppressed sums) and any interval-calibration factors are not covered by the DP "
        "accounting.",
    ]
