"""Local training: plain minibatch Adam, or DP-SGD (DP-Adam) with Opacus.

Privacy unit = patient: each CohortTensors row is one patient and one sample, every loss
term of a row depends on that row only (no batch statistics), and under DP each step Poisson
samples rows with ``DPSettings.sample_rate``, clips every patient's gradient to
``max_grad_norm`` and adds Gaussian noise of std ``noise_multiplier * max_grad_norm``.

Opacus's PrivacyEngine derives the sampling rate from ``1 / len(data_loader)``, which cannot
express an arbitrary rate. The rate is the privacy ledger's decision, so the engine is built
with ``poisson_sampling=False`` and then given the exact rate: batches come from Opacus's own
``UniformWithReplacementSampler`` at ``sample_rate``, the accountant hook is re-attached with
that rate, and the optimizer averages over the expected batch size ``sample_rate * N``.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, TensorDataset

from fedtwin.errors import FedTwinError
from fedtwin.extract.tensors import CohortTensors
from fedtwin.twin.batch import TwinBatch, prepare_batch
from fedtwin.twin.config import DPSettings, FitConfig
from fedtwin.twin.model import TwinModel
from fedtwin.twin.parameters import project_parameters


@dataclass
class DPReport:
    """What DP-SGD did, for the privacy ledger and the logs (epsilon for information only:
    the ledger composes over all rounds with its own persistent accountant)."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    accountant: str
    delta: float
    epsilon: float
    expected_batch_size: float


@dataclass
class FitReport:
    steps: int
    seconds: float
    n_patients: int
    losses: list[float] = field(default_factory=list)
    dp: DPReport | None = None

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Set torch's intra-op threads for the block (default 1) and restore them afterwards.

    The twin's per-bin operations on (B, V) tensors are too small for intra-op parallelism:
    on the 2-core test machine under load from other processes, 2 threads made a step 5-10x
    slower than 1 (threads spin-waiting for each other). Parallelise across sites/processes.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(n if n else 1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def clip_groups(model: TwinModel, dp: DPSettings) -> list:
    """The outcome (hazard) head apart from everything else, per ``DPSettings.outcome_clip_share``;
    one group (flat clipping) when the share is 0 or the spec has no outcome (list of ClipGroup)."""
    from fedtwin.privacy.group_clipping import ClipGroup  # imports Opacus: see PrivateTrainer

    params = [p for p in model.parameters() if p.requires_grad]
    head = [p for p in model.hazard.parameters() if p.requires_grad] if model.hazard is not None else []
    if not head or dp.outcome_clip_share == 0:
        return [ClipGroup("all", tuple(params), 1.0)]
    ids = {id(p) for p in head}
    return [
        ClipGroup("dynamics", tuple(p for p in params if id(p) not in ids), 1.0 - dp.outcome_clip_share),
        ClipGroup("outcome_head", tuple(head), dp.outcome_clip_share, dp.outcome_grad_scale),
    ]


class PrivateTrainer:
    """Opacus PrivacyEngine around a TwinModel: per-patient clipping, noise, accounting."""

    def __init__(self, model: TwinModel, n_patients: int, dp: DPSettings, lr: float) -> None:
        # Opacus is imported here, not at module level: importing it calls logging.basicConfig,
        # which in the ServerApp (it imports fedtwin.twin) doubled every Flower log line
        from opacus import PrivacyEngine

        from fedtwin.privacy.group_clipping import GroupClippedDPOptimizer

        if n_patients < 1:
            raise FedTwinError("DP training needs at least one patient")
        self.model, self.dp, self.n = model, dp, n_patients
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Secure RNG turned off")  # secure_mode needs torchcsprng
            self.engine = PrivacyEngine(accountant=dp.accountant)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        placeholder = DataLoader(TensorDataset(torch.arange(n_patients)), batch_size=max(1, round(dp.sample_rate * n_patients)))
        # Noise and sampling must be unpredictable: a known seed would let anyone subtract the
        # noise. Fresh OS entropy unless a seed is given (tests only). torch's generator is not
        # a CSPRNG; Opacus's secure_mode would need torchcsprng, which does not install here.
        seed = dp.seed if dp.seed is not None else secrets.randbits(62)
        noise_gen = torch.Generator().manual_seed(seed)
        self._sampling_gen = torch.Generator().manual_seed(seed + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus warns about poisson_sampling=False; sampling is ours
            self.module, flat, _ = self.engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=placeholder,
                noise_multiplier=dp.noise_multiplier,
                max_grad_norm=dp.max_grad_norm,
                poisson_sampling=False,
                grad_sample_mode="hooks",
                noise_generator=noise_gen,
            )
        groups = clip_groups(model, dp)
        # make_private wraps the module (per-sample gradients) and validates it; its flat-clipping
        # optimizer is replaced by the group-clipping one over the same Adam when the model has
        # an outcome head to clip apart (fedtwin.privacy.group_clipping)
        self.optimizer = flat if len(groups) < 2 else GroupClippedDPOptimizer(
            optimizer, groups=groups, noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
            expected_batch_size=flat.expected_batch_size, loss_reduction="mean", generator=noise_gen,
        )
        self.optimizer.expected_batch_size = dp.sample_rate * n_patients
        self.optimizer.attach_step_hook(self.engine.accountant.get_optimizer_hook_fn(sample_rate=dp.sample_rate))
        self.steps = 0

    def batches(self) -> Iterator[torch.Tensor]:
        """Poisson-sampled patient indices, ``dp.steps`` of them (possibly empty)."""
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        sampler = UniformWithReplacementSampler(
            num_samples=self.n, sample_rate=self.dp.sample_rate, generator=self._sampling_gen, steps=self.dp.steps
        )
        for idx in sampler:
            yield torch.as_tensor(idx, dtype=torch.long)

    def step(self, batch: TwinBatch) -> float:
        """One DP-SGD step on the sampled patients; returns their mean loss (before the step)."""
        self.optimizer.zero_grad(set_to_none=True)
        per_patient = self.module(batch)
        # sum / expected batch size = Opacus's "mean" convention; an empty Poisson batch still
        # takes its (noise-only) step, as the accounting assumes
        loss = per_patient.sum() / max(batch.size, 1)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()
        self.optimizer.step()
        project_parameters(self.model)
        self.steps += 1
        return float(loss.detach()) if batch.size else float("nan")

    def epsilon(self) -> float:
        if not self.steps:
            return 0.0
        if self.dp.noise_multiplier == 0:
            return math.inf  # no noise, no privacy (the PRV accountant overflows instead of saying so)
        return float(self.engine.get_epsilon(self.dp.delta))

    def report(self) -> DPReport:
        d = self.dp
        return DPReport(d.noise_multiplier, d.max_grad_norm, d.sample_rate, self.steps, d.accountant, d.delta, self.epsilon(), d.sample_rate * self.n)

    def close(self) -> TwinModel:
        """Remove Opacus's hooks and per-sample attributes; the model is a plain module again."""
        self.module.to_standard_module()
        for p in self.model.parameters():
            p.grad = None
        return self.model


def fit(
    model: TwinModel,
    tensors: CohortTensors,
    config: FitConfig | None = None,
    dp: DPSettings | None = None,
    on_step: Callable[[], None] | None = None,
) -> FitReport:
    """Train ``model`` in place on ``tensors``; DP-SGD when ``dp`` is given.

    ``on_step`` is called after every optimizer step: the privacy ledger counts DP steps as
    they happen (a crash mid-run then records what was really spent), and the CLI's progress
    bar advances.
    """
    config = config or FitConfig()
    batch = prepare_batch(tensors, model.spec, model.norm)
    n = batch.size
    if n == 0:
        raise FedTwinError("cannot train on an empty cohort", "check the extraction and the cohort definition")
    start = time.perf_counter()
    losses: list[float] = []
    model.train()
    with torch_threads(config.num_threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        gen = torch.Generator().manual_seed(config.seed)
        if dp is not None:
            trainer = PrivateTrainer(model, n, dp, config.lr)
            try:
                for idx in trainer.batches():
                    loss = trainer.step(batch.select(idx))
                    if len(idx):  # an empty Poisson batch still takes a (noise-only) step, but has no loss
                        losses.append(loss)
                    if on_step:
                        on_step()
                report = trainer.report()
            finally:
                trainer.close()
                model.eval()
            return FitReport(steps=trainer.steps, seconds=time.perf_counter() - start, n_patients=n, losses=losses, dp=report)
        opt = torch.optim.Adam(model.parameters(), lr=config.lr)
        steps, limit = 0, config.max_steps if config.max_steps is not None else math.inf
        for _ in range(config.epochs):
            order = torch.randperm(n, generator=gen)
            for lo in range(0, n, config.batch_size):
                if steps >= limit:
                    break
                opt.zero_grad(set_to_none=True)
                loss = model(batch.select(order[lo : lo + config.batch_size])).mean()
                loss.backward()
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                opt.step()
                project_parameters(model)
                losses.append(float(loss.detach()))
                steps += 1
                if on_step:
                    on_step()
    model.eval()
    return FitReport(steps=steps, seconds=time.perf_counter() - start, n_patients=n, losses=losses)


@torch.no_grad()
def evaluate(model: TwinModel, tensors: CohortTensors, batch_size: int = 1024) -> dict[str, float]:
    """Mean per-patient objective and terms at the posterior mean (no sampling)."""
    batch = prepare_batch(tensors, model.spec, model.norm)
    sums: dict[str, float] = {}
    for lo in range(0, batch.size, batch_size):
        b = batch.select(slice(lo, lo + batch_size))
        terms = model.loss_terms(b, sample=False)
        terms["loss"] = model.objective(terms)
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.sum())
    return {k: v / max(batch.size, 1) for k, v in sums.items()}
