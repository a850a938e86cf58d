"""FedProx's proximal term at a site, as a separate step that costs no privacy.

FedProx adds ``mu/2 * ||w - w_global||^2`` to every site's local objective so that sites with very
different data do not drift far from the global model. Its gradient ``mu * (w - w_global)``
depends on no patient: so instead of adding it to the per-patient loss (where Opacus would clip
it together with each patient's gradient and distort both), the site applies it after every
DP-SGD step as a decoupled pull towards the global parameters (as AdamW decouples weight
decay): ``w <- w - lr * mu * (w - w_global)``. Being post-processing of DP outputs and public
global parameters, it changes nothing in the privacy accounting.
"""

from __future__ import annotations

import torch


class ProximalPull:
    """Call after every optimizer step; holds a copy of the global parameters it pulls towards."""

    def __init__(self, model: torch.nn.Module, mu: float, lr: float) -> None:
        if mu < 0 or lr <= 0 or mu * lr >= 1:
            raise ValueError(f"need mu >= 0, lr > 0 and mu * lr < 1 (a pull, not an overshoot), got mu={mu}, lr={lr}")
        self.factor = float(mu * lr)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.anchor = [p.detach().clone() for p in self.params]

    def __call__(self) -> None:
        if self.factor == 0.0:
            return
        with torch.no_grad():
            for p, a in zip(self.params, self.anchor):
                p.sub_(self.factor * (p - a))

    def distance(self) -> float:
        """||w - w_global||: how far local training has moved from the global model."""
        with torch.no_grad():
            return float(torch.sqrt(sum(((p - a) ** 2).sum() for p, a in zip(self.params, self.anchor))))
