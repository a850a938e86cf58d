"""FedTwin: federated training of hybrid patient digital twins on OMOP CDM data.

The shared library. ``site_agent`` and ``coordinator`` build on it; it never imports them.
"""

__version__ = "0.1.0"
