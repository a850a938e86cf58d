"""Privacy: small-cell suppression now; DP-SGD and the privacy ledger build on it."""
