"""FedProx's proximal pull: towards the global model, data-independent, off when mu = 0."""

from __future__ import annotations

import pytest
import torch

from fedtwin.training.proximal import ProximalPull


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3)


def test_pull_shrinks_the_distance_to_the_global_model_by_exactly_lr_times_mu() -> None:
    model = _model()
    pull = ProximalPull(model, mu=0.5, lr=0.1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # "local training" moved every parameter by 1
    before = pull.distance()
    pull()
    assert pull.distance() == pytest.approx(before * (1 - 0.05), rel=1e-6)


def test_mu_zero_is_fedavg_and_nonsense_settings_are_refused() -> None:
    model = _model()
    pull = ProximalPull(model, mu=0.0, lr=0.1)
    with torch.no_grad():
        model.weight.add_(2.0)
    snapshot = model.weight.detach().clone()
    pull()
    assert torch.equal(model.weight, snapshot)
    for mu, lr in ((-1.0, 0.1), (1.0, 0.0), (20.0, 0.1)):
        with pytest.raises(ValueError):
            ProximalPull(model, mu=mu, lr=lr)
