"""Model parameters as a flat list of numpy arrays, in a stable order, for Flower.

Order = ``TwinModel.named_parameters()`` order, which is fixed by the spec and the
TwinConfig (module definition order); every site with the same spec and config gets the same
list of names and shapes, and :func:`set_parameters` refuses anything else.

Magnitudes: Flower's SecAgg+ clips every value to +-8 after scaling by
num_examples / max_weight (<= 1). The model keeps its parameters well inside that range by
construction: normalised units (plausible ranges -> [-1, 1]), fixed offsets for quantities
with large natural values (log noise std -3, hazard logit -4, posterior log-variance shift),
and small-gain initialisation of output layers. That is not enough on its own: Adam moves a
parameter by ~lr per step whenever its gradient keeps one sign, however small (e.g. the prior
log-variance of a parameter that does not vary between patients heads to -infinity), so
training projects every parameter into [-PARAMETER_BOUND, PARAMETER_BOUND] after each step
(:func:`project_parameters`; post-processing, so it costs no privacy).
:func:`max_abs_parameter` lets a site check.
"""

from __future__ import annotations

import numpy as np
import torch

from fedtwin.errors import FedTwinError
from fedtwin.twin.model import TwinModel

SECAGG_CLIP = 8.0
PARAMETER_BOUND = 6.0


def parameter_names(model: TwinModel) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def get_parameters(model: TwinModel) -> list[np.ndarray]:
    """Copies of all trainable parameters (float32), in :func:`parameter_names` order."""
    return [p.detach().cpu().numpy().astype(np.float32, copy=True) for _, p in model.named_parameters()]


def set_parameters(model: TwinModel, params: list[np.ndarray]) -> None:
    """Load a list from :func:`get_parameters` (e.g. the federated average) into ``model``."""
    named = list(model.named_parameters())
    if len(params) != len(named):
        raise FedTwinError(
            f"got {len(params)} parameter arrays, the twin has {len(named)}",
            "the sender and receiver must use the same spec and TwinConfig",
        )
    bad = [f"{n}: expected {tuple(p.shape)}, got {tuple(np.shape(a))}" for (n, p), a in zip(named, params) if tuple(p.shape) != tuple(np.shape(a))]
    if bad:
        raise FedTwinError("parameter shapes do not match the twin:\n  " + "\n  ".join(bad), "use the same spec and TwinConfig at every site")
    nonfinite = [n for (n, _), a in zip(named, params) if not np.all(np.isfinite(a))]
    if nonfinite:
        raise FedTwinError(f"non-finite parameter values in {nonfinite}", "do not load a diverged aggregate")
    with torch.no_grad():
        for (_, p), a in zip(named, params):
            p.copy_(torch.as_tensor(np.asarray(a), dtype=p.dtype))


def max_abs_parameter(model: TwinModel) -> tuple[str, float]:
    """The largest absolute parameter value and its name (keep well below SECAGG_CLIP)."""
    best = ("", 0.0)
    for n, p in model.named_parameters():
        v = float(p.detach().abs().max()) if p.numel() else 0.0
        if v > best[1]:
            best = (n, v)
    return best


@torch.no_grad()
def project_parameters(model: TwinModel, bound: float = PARAMETER_BOUND) -> None:
    """Clamp every parameter into [-bound, bound] in place (keeps SecAgg+'s range safe)."""
    for p in model.parameters():
        p.clamp_(-bound, bound)
