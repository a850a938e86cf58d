"""Training orchestration at a site: split, privacy planning with the ledger, fit, write."""
