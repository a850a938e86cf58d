"""Synthetic hospitals: OMOP CDM 5.4 sites of simulated ICU stays, with the ground truth to score twins.

``fedtwin synth`` (:mod:`fedtwin.cli.synth_cmd`) calls :func:`synthesize`. The modules, one
concept each: :mod:`.concepts` (OMOP vocabulary), :mod:`.profiles` (site heterogeneity),
:mod:`.population` (who is admitted), :mod:`.physiology` (the patient model), :mod:`.care`
(what staff measure and give), :mod:`.simulation` (the factual run), :mod:`.plans`
(counterfactual drug plans), :mod:`.records` (OMOP rows), :mod:`.defects` (injected data
defects), :mod:`.omop_writer` (one transaction per site), :mod:`.ground_truth` (npz + manifest),
:mod:`.hospitals` (the federation). docs/synthetic-hospitals.md documents the model.
"""

from fedtwin.synth.hospitals import SiteSummary, SynthRequest, synthesize
from fedtwin.synth.profiles import SiteProfile, make_profiles

__all__ = ["SiteProfile", "SiteSummary", "SynthRequest", "make_profiles", "synthesize"]
