"""Extraction: spec + OMOP database -> per-patient tensors (:class:`CohortTensors`)."""

from fedtwin.extract.tensors import CohortTensors

__all__ = ["CohortTensors"]
