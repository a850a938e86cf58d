"""Group clipping (fedtwin.privacy.group_clipping): the privacy claim is that one patient moves the
scaled, clipped sum by at most ``max_grad_norm`` and that the noise is ``sigma * C`` in scaled
units, so the accountant's epsilon for (sigma, q, steps) holds. These tests check both on real
Opacus per-sample gradients, and that the twin's DP training uses it."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule

from fedtwin.errors import FedTwinError
from fedtwin.privacy.group_clipping import ClipGroup, GroupClippedDPOptimizer

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

C = 2.0
SHARE = 0.3
SCALE = 40.0


class TwoParts(torch.nn.Module):
    """A "dynamics" part with large gradients and a "head" with small ones, like the twin."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(6, 3)
        self.head = torch.nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.body(x) ** 2).sum(dim=1) + 0.01 * self.head(x).squeeze(1)


def _optimizer(model: TwoParts, sigma: float, generator: torch.Generator | None = None):  # noqa: ANN202
    wrapped = GradSampleModule(model)
    groups = [ClipGroup("body", tuple(model.body.parameters()), 1 - SHARE), ClipGroup("head", tuple(model.head.parameters()), SHARE, SCALE)]
    opt = GroupClippedDPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), groups=groups, noise_multiplier=sigma,
                                  max_grad_norm=C, expected_batch_size=4, generator=generator)
    return wrapped, opt


def _scaled_sum(model: TwoParts, x: torch.Tensor) -> torch.Tensor:
    """The clipped per-patient gradients summed, with the head multiplied by its scale."""
    wrapped, opt = _optimizer(model, 0.0)
    opt.zero_grad(set_to_none=True)
    wrapped(x).sum().backward()
    opt.clip_and_accumulate()
    flat = [p.summed_grad.reshape(-1) * (SCALE if any(p is q for q in model.head.parameters()) else 1.0) for p in model.parameters()]
    wrapped.to_standard_module()
    return torch.cat(flat)


def test_one_patient_moves_the_scaled_clipped_sum_by_at_most_max_grad_norm() -> None:
    torch.manual_seed(0)
    model = TwoParts()
    others = torch.randn(5, 6)
    for outlier in (torch.full((1, 6), 50.0), torch.randn(1, 6) * 1e-3, torch.randn(1, 6)):
        with_it = _scaled_sum(model, torch.cat([others, outlier]))
        without = _scaled_sum(model, others)
        moved = float((with_it - without).norm())
        assert moved <= C * (1 + 1e-5), moved
    # the bound is reached by a patient whose gradients exceed both group bounds: the head's
    # clip is sqrt(share) C / scale in raw units, not sqrt(share) C (which would be 40x the sensitivity)
    huge = float((_scaled_sum(model, torch.cat([others, torch.full((1, 6), 50.0)])) - _scaled_sum(model, others)).norm())
    assert huge == pytest.approx(C, rel=1e-3)


def test_noise_is_sigma_c_in_scaled_units_per_group() -> None:
    big = torch.nn.Linear(200, 50)  # enough coordinates to measure a std
    body = torch.nn.Linear(200, 50)
    wrapped = GradSampleModule(torch.nn.ModuleDict({"a": body, "b": big}))
    groups = [ClipGroup("body", tuple(body.parameters()), 1 - SHARE), ClipGroup("head", tuple(big.parameters()), SHARE, SCALE)]
    sigma = 1.5
    opt = GroupClippedDPOptimizer(torch.optim.SGD(list(body.parameters()) + list(big.parameters()), lr=0.1), groups=groups,
                                  noise_multiplier=sigma, max_grad_norm=C, expected_batch_size=1, loss_reduction="sum",
                                  generator=torch.Generator().manual_seed(1))
    x = torch.zeros(3, 200)
    opt.zero_grad(set_to_none=True)
    (0.0 * (wrapped._module["a"](x).sum() + wrapped._module["b"](x).sum())).backward()  # zero gradients: what remains is noise
    opt.pre_step()
    assert float(body.weight.grad.std()) == pytest.approx(sigma * C, rel=0.03)
    assert float(big.weight.grad.std()) == pytest.approx(sigma * C / SCALE, rel=0.03)
    assert opt.noise_stds() == pytest.approx([sigma * C, sigma * C / SCALE])
    assert opt.clip_bounds() == pytest.approx([(1 - SHARE) ** 0.5 * C, SHARE**0.5 * C / SCALE])


def test_groups_must_cover_every_parameter_once_with_shares_summing_to_one() -> None:
    model = TwoParts()
    with pytest.raises(FedTwinError, match="in no group"):
        _ = GroupClippedDPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                    groups=[ClipGroup("body", tuple(model.body.parameters()), 1.0)],
                                    noise_multiplier=1.0, max_grad_norm=C, expected_batch_size=4)
    with pytest.raises(FedTwinError, match="sum to 1.2"):
        _ = GroupClippedDPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                    groups=[ClipGroup("body", tuple(model.body.parameters()), 0.9), ClipGroup("head", tuple(model.head.parameters()), 0.3)],
                                    noise_multiplier=1.0, max_grad_norm=C, expected_batch_size=4)
    with pytest.raises(FedTwinError, match="clip groups 'body' and 'all'"):
        _ = GroupClippedDPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                    groups=[ClipGroup("body", tuple(model.body.parameters()), 0.5), ClipGroup("all", tuple(model.parameters()), 0.5)],
                                    noise_multiplier=1.0, max_grad_norm=C, expected_batch_size=4)


def test_the_twin_trains_its_outcome_head_as_its_own_clip_group() -> None:
    """DP training of a twin with outcomes uses the group optimizer with the head apart;
    ``outcome_clip_share = 0`` is Opacus's flat clipping."""
    from test_twin_model import SPEC

    from fedtwin.twin import DPSettings, TwinModel
    from fedtwin.twin.training import PrivateTrainer

    model = TwinModel(SPEC)
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, steps=1, seed=0)
    trainer = PrivateTrainer(model, 100, dp, 1e-3)
    try:
        assert isinstance(trainer.optimizer, GroupClippedDPOptimizer)
        head = {id(p) for p in model.hazard.parameters()}
        assert [g.name for g in trainer.optimizer.groups] == ["dynamics", "outcome_head"]
        assert {id(p) for p in trainer.optimizer.groups[1].params} == head
        assert trainer.optimizer.noise_stds() == pytest.approx([1.0, 1.0 / dp.outcome_grad_scale])
    finally:
        trainer.close()
    flat = PrivateTrainer(TwinModel(SPEC), 100, DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, steps=1, seed=0,
                                                           outcome_clip_share=0.0), 1e-3)
    try:
        assert not isinstance(flat.optimizer, GroupClippedDPOptimizer)
    finally:
        flat.close()


def test_the_serverapp_and_the_twin_modules_import_without_opacus() -> None:
    """Importing Opacus calls logging.basicConfig: in the ServerApp (which imports fedtwin.twin)
    that doubled every Flower log line and pushed the coordinator's refusal reasons out of the
    log tail that `fedtwin coordinator launch` prints (tests/reliability/test_misuse.py caught it).
    Opacus is imported where DP-SGD runs, not by these modules."""
    import subprocess
    import sys

    code = ("import logging, sys; import coordinator.server_app, fedtwin.twin, fedtwin.twin.training, fedtwin.evaluation; "
            "print('opacus' in sys.modules, len(logging.getLogger().handlers))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "0"], out
