"""What sites and the coordinator must agree on: site, study and consortium configuration files.

Lives in the shared library so that ``site_agent`` and ``coordinator`` both depend on it and never
on each other.
"""
