"""Site, study and consortium configuration files (TOML), validated with pydantic.

Three kinds of file, all written by ``fedtwin consortium init`` and meant to be read (and
edited) by people:

* ``sites/site_<k>.toml`` (:class:`SiteConfig`): what one hospital's SuperNode and ClientApp need:
  the site's name, its OMOP database, the twin spec, its privacy budget and ledger, its allow-list
  of approved studies (optional ``[approval]``, :mod:`site_agent.approval`), its keys,
  the suppression threshold, and whom to trust (the consortium CA, the coordinator's signing key,
  the SuperLink address). The ClientApp finds it through the SuperNode's node config
  ``site-config="<path>"``.
* ``study.toml`` (:class:`StudyConfig`): what the coordinator's ServerApp needs: study id, spec,
  rounds, strategy (FedAvg or FedProx with its proximal mu), minimum sites per round, local
  training (per-site epsilon for the whole training, epochs, batch, clipping, learning rate), the
  SecAgg+ parameters, the MLflow tracking URI and the checkpoint folder.
* ``consortium.toml`` (:class:`ConsortiumManifest`): the local deployment itself (ports chosen at
  init, the site list, runtime tuning). Read by ``up``/``down``/``status``/``run_app``.

Relative paths in a file are relative to the folder holding that file, so a consortium folder
(or one site's share of it) can be moved or mounted into a container unchanged. This module
depends on pydantic and the standard library only, so that a site agent can import it without
pulling in the coordinator.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError, field_validator, model_validator

from fedtwin.federation.errors import ConsortiumError
from fedtwin.validation_errors import error_rows

NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
SITE_CONFIG_NODE_KEY = "site-config"  # the SuperNode --node-config key naming the site config file

M = TypeVar("M", bound=BaseModel)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_name(value: str) -> str:
    if not NAME_RE.match(value):
        raise ValueError("must start with a lowercase letter and use only a-z, 0-9, '_' and '-' (at most 63 characters)")
    return value


def _check_address(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:9092 or coordinator.example.org:9092")
    return value


# --------------------------------------------------------------------------------------- site


class SiteInfo(_Strict):
    name: str = Field(description="the site's short name; also its SuperNode's name")
    index: int = Field(ge=1, description="1-based position of the site in the consortium")
    consortium: str = Field(description="name of the consortium the site belongs to")

    _name = field_validator("name", "consortium")(_check_name)


class SiteData(_Strict):
    database: str = Field(description="OMOP CDM database: SQLite path or postgresql+psycopg:// URL")
    cdm_schema: str | None = Field(default=None, description="PostgreSQL schema holding the CDM")
    spec: Path = Field(description="YAML twin spec the site trains")


class SitePrivacy(_Strict):
    epsilon: float = Field(gt=0, description="total (epsilon, delta)-DP budget of the site's dataset")
    delta: float = Field(gt=0, lt=1)
    ledger: Path = Field(description="the site's privacy ledger (SQLite), append-only")
    suppression_threshold: int = Field(default=10, ge=1, le=1000, description="counts below it are shown as <N")


class SiteKeys(_Strict):
    supernode_private_key: Path = Field(description="OpenSSH EC (NIST P-384) key: flower-supernode --auth-supernode-private-key")
    supernode_public_key: Path = Field(description="its public half, registered with the SuperLink")
    signing_private_key: Path = Field(description="Ed25519 (PKCS#8 PEM) key for provenance signatures")
    signing_public_key: Path


class SiteTrust(_Strict):
    superlink_address: str = Field(description="the coordinator's SuperLink, HOST:PORT")
    ca_certificate: Path = Field(description="the consortium CA that signed the SuperLink's TLS certificate")
    coordinator_signing_public_key: Path = Field(description="Ed25519 public key of the coordinator (provenance)")
    coordinator_name: str = "coordinator"

    _addr = field_validator("superlink_address")(_check_address)


class SiteSuperNode(_Strict):
    runtime_api_port: int = Field(ge=1, le=65535, description="the SuperNode's Runtime API port (127.0.0.1 only)")


class SiteAudit(_Strict):
    outbox: Path | None = Field(
        default=None,
        description=(
            "folder where the site keeps a copy of what it sent each round (parameters, the reported count, its evaluation "
            "statistics before encoding): the site's own record, never sent anywhere; unset = no copy"
        ),
    )
    provenance_log: Path | None = Field(
        default=None,
        description=(
            "the site's append-only provenance log (its signed manifests and the coordinator's records of the rounds it "
            "took part in); unset = <site name>.provenance-log.jsonl beside the privacy ledger"
        ),
    )


class SiteApproval(_Strict):
    allow_list: Path | None = Field(
        default=None,
        description=(
            "the site's allow-list of approved (twin spec hash, FedTwin code version) pairs, JSON written by "
            "`fedtwin site approve`; unset = <site name>.approvals.json beside the privacy ledger"
        ),
    )


class SiteConfig(_Strict):
    site: SiteInfo
    data: SiteData
    privacy: SitePrivacy
    keys: SiteKeys
    trust: SiteTrust
    supernode: SiteSuperNode
    audit: SiteAudit = SiteAudit()
    approval: SiteApproval | None = None  # None (no [approval] table): the default allow-list path

    def allow_list_path(self) -> Path:
        """The site's allow-list file: ``[approval] allow_list``, else ``<site name>.approvals.json`` beside the ledger.

        Named after the site because a local consortium keeps every site's ledger in one ``privacy/`` folder.
        """
        if self.approval is not None and self.approval.allow_list is not None:
            return self.approval.allow_list
        return self.privacy.ledger.parent / f"{self.site.name}.approvals.json"


# -------------------------------------------------------------------------------------- study


class StudyInfo(_Strict):
    id: str
    spec: Path
    rounds: int = Field(ge=1, le=100_000)
    min_sites: int = Field(ge=1, description="minimum number of sites per round (fit and available)")

    _id = field_validator("id")(_check_name)


class StrategyConfig(_Strict):
    name: Literal["fedavg", "fedprox"] = "fedavg"
    proximal_mu: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _mu(self) -> StrategyConfig:
        if self.name == "fedprox" and self.proximal_mu <= 0:
            raise ValueError("FedProx needs proximal_mu > 0 (with proximal_mu = 0 it is FedAvg: use name = \"fedavg\")")
        if self.name == "fedavg" and self.proximal_mu != 0:
            raise ValueError("proximal_mu is only used by FedProx: set name = \"fedprox\" or proximal_mu = 0")
        return self


class TrainingConfig(_Strict):
    """What each round of local training does at every site (the site's own budget still caps it)."""

    epsilon_per_site: float = Field(
        default=3.0, gt=0,
        description="DP epsilon the whole training (all rounds, composed) may add at each site; noise is calibrated once for it",
    )
    local_epochs: float = Field(default=1.0, gt=0, description="passes over the site's training patients per round (in expectation)")
    batch_size: int = Field(default=64, ge=1, description="expected Poisson batch (sample rate = batch_size / patients)")
    max_grad_norm: float = Field(default=1.0, gt=0, description="per-patient gradient clipping norm (DP-SGD)")
    learning_rate: float = Field(default=3e-3, gt=0)
    federated_evaluation: bool = Field(
        default=True,
        description="SecAgg+ only: sites add evaluation sums to their masked vectors and a last round scores the final model",
    )


class SecAggConfig(_Strict):
    """Parameters of Flower's ``SecAggPlusWorkflow`` (checked as Flower 1.41 checks them, but earlier)."""

    enabled: bool = True
    num_shares: StrictInt | StrictFloat = Field(default=1.0, description="int > 2, or a fraction (0, 1] of the sampled sites")
    reconstruction_threshold: StrictInt | StrictFloat = Field(default=0.67, description="int < num_shares, or a fraction (0, 1] of num_shares")
    clipping_range: float = Field(default=8.0, gt=0)
    quantization_range: StrictInt = Field(default=2**22, gt=0)
    modulus_range: StrictInt = Field(default=2**32, gt=0, le=2**32)
    max_weight: float = Field(default=1000.0, gt=0, description="largest num_examples a site may report; larger overflows")
    timeout: float = Field(default=300.0, gt=0, description="seconds to wait for replies at each SecAgg+ stage")

    @model_validator(mode="after")
    def _flower_rules(self) -> SecAggConfig:
        ns, th = self.num_shares, self.reconstruction_threshold
        if isinstance(ns, int) and ns != 1 and ns <= 2:
            raise ValueError(f"num_shares = {ns}: an integer num_shares must be greater than 2 (or give a fraction such as 1.0)")
        if isinstance(ns, int) and ns != 1 and ns % 2 == 0:
            raise ValueError(f"num_shares = {ns}: an integer num_shares must be odd (Flower's SecAgg+ key sharing fails on an even one)")
        if isinstance(ns, float) and not 0 < ns <= 1:
            raise ValueError(f"num_shares = {ns}: a fractional num_shares must be in (0, 1]")
        if isinstance(th, int) and th != 1:
            if th < 2:
                raise ValueError(f"reconstruction_threshold = {th}: must be at least 2 (or a fraction in (0, 1])")
            if isinstance(ns, int) and th >= ns:
                raise ValueError(f"reconstruction_threshold = {th} must be less than num_shares = {ns}")
        if isinstance(th, float) and not 0 < th <= 1:
            raise ValueError(f"reconstruction_threshold = {th}: a fractional threshold must be in (0, 1]")
        if self.modulus_range <= self.quantization_range:
            raise ValueError("modulus_range must be greater than quantization_range")
        if bin(self.modulus_range).count("1") != 1:
            raise ValueError(f"modulus_range = {self.modulus_range} must be a power of 2")
        return self


class TrackingConfig(_Strict):
    mlflow_tracking_uri: str = Field(description="MLflow tracking URI (the MLFLOW_TRACKING_URI environment variable may override it)")
    experiment: str = "fedtwin"


class CheckpointConfig(_Strict):
    dir: Path


class StudyConfig(_Strict):
    study: StudyInfo
    strategy: StrategyConfig = StrategyConfig()
    training: TrainingConfig = TrainingConfig()
    secagg: SecAggConfig = SecAggConfig()
    tracking: TrackingConfig
    checkpoints: CheckpointConfig

    def check_against_sites(self, n_sites: int) -> None:
        """Raise :class:`ConsortiumError` if the study cannot run on ``n_sites`` sites."""
        if self.study.min_sites > n_sites:
            raise ConsortiumError(
                f"study.min_sites = {self.study.min_sites} but the consortium has {n_sites} site(s)",
                f"set min_sites to at most {n_sites} in study.toml",
            )
        ns = self.secagg.num_shares
        if self.secagg.enabled and isinstance(ns, int) and ns != 1 and ns > n_sites:
            raise ConsortiumError(
                f"secagg.num_shares = {ns} but the consortium has {n_sites} site(s)",
                f"use num_shares <= {n_sites} or a fraction such as 1.0",
            )
        if self.secagg.enabled and n_sites < 2:
            raise ConsortiumError("SecAgg+ needs at least 2 sites", "add sites or set secagg.enabled = false")


# --------------------------------------------------------------------------------- consortium


class ManifestInfo(_Strict):
    name: str
    created: str
    flower_version: str
    federation: str = Field(description="name of the SuperLink connection in FLWR_HOME/config.toml")
    host: str = "127.0.0.1"
    study: Path = Path("study.toml")

    _name = field_validator("name", "federation")(_check_name)


class ManifestSuperLink(_Strict):
    port: int = Field(ge=1, le=65535, description="one port: Fleet, Control and Runtime HTTP APIs")
    server_names: list[str] = Field(description="SANs of the SuperLink TLS certificate (DNS names and IPs)")
    database: str = Field(
        default=":memory:",
        description=(
            "SuperLink state: \":memory:\" (lost at down; the sites' keys are registered again at up) or an SQLite file "
            "relative to the consortium folder, e.g. \"state/superlink.db\" (survives restarts, but costs the SuperLink "
            "~2x the CPU per message: measured in bench/round_overhead.py)"
        ),
    )


class ManifestRuntime(_Strict):
    """How ServerApp/ClientApp processes are started and how often things poll."""

    executor: Literal["fork", "flower"] = Field(
        default="fork",
        description=(
            "fork: Flower's --isolation process with FedTwin's fork executor (a warm process with Flower "
            "imported forks one fresh child per message); flower: Flower's default --isolation subprocess"
        ),
    )
    poll_interval: float = Field(
        default=0.2, ge=0, le=3.0,
        description="cap (s) on polls of the SuperLink (SuperNode Fleet poll while active, ServerApp grid poll); Flower: 3 s; 0 = Flower's",
    )
    local_poll_interval: float = Field(default=0.05, gt=0, le=1.0, description="cap (s) on local waits and the first object-pull retry")
    active_window: float = Field(default=30.0, gt=0, description="seconds after the last message before SuperNodes and executors poll slowly")
    task_poll_interval: float = Field(
        default=0.1, ge=0.01, le=60, description="SuperNode-side executor AcquireTask poll while active (s); 1 s when idle; Flower: 1 s"
    )
    serverapp_task_poll_interval: float = Field(
        default=0.5, ge=0.01, le=60, description="SuperLink-side executor AcquireTask poll (s): only delays the start of a run"
    )
    heartbeat_interval: float = Field(
        default=10.0, ge=0, le=1800,
        description="SuperNode heartbeat (s; Flower: 30, the SuperLink's minimum 10; 0 = Flower's): a dead site is offline after 2 intervals",
    )
    preload: list[str] = Field(
        default_factory=list,
        description="extra modules the fork executor imports once (installed modules only, never a FAB's own)",
    )


class ManifestSite(_Strict):
    name: str
    config: Path
    runtime_api_port: int = Field(ge=1, le=65535)

    _name = field_validator("name")(_check_name)


class ConsortiumManifest(_Strict):
    consortium: ManifestInfo
    superlink: ManifestSuperLink
    runtime: ManifestRuntime = ManifestRuntime()
    sites: list[ManifestSite]

    @model_validator(mode="after")
    def _unique(self) -> ConsortiumManifest:
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise ValueError(f"site names must be unique, got {names}")
        ports = [self.superlink.port] + [s.runtime_api_port for s in self.sites]
        if len(set(ports)) != len(ports):
            raise ValueError(f"ports must be distinct, got {ports}")
        return self


# ------------------------------------------------------------------------------------ reading


def validate_toml_data(model: type[M], data: Any, source: str) -> M:
    """Validate parsed TOML; every problem names its table.field, the value found and the rule."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = [f"  - {where} = {shown}: {msg}" for where, shown, msg in error_rows(exc, data)]
        raise ConsortiumError(
            f"{source}: invalid {model.__name__} ({len(lines)} problem{'s' if len(lines) != 1 else ''}):\n" + "\n".join(lines),
            "correct the fields named above (docs/deployment.md documents every field)",
        ) from None


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConsortiumError(f"{path} does not exist", "run `fedtwin consortium init` or give the right folder") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConsortiumError(f"{path} is not valid TOML: {exc}", "fix the syntax error (line and column are given)") from None


def _resolve_paths(model: BaseModel, base: Path) -> BaseModel:
    """Return ``model`` with every relative Path field made absolute against ``base``."""
    updates: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, Path) and not value.is_absolute():
            updates[name] = (base / value).resolve()
        elif isinstance(value, BaseModel):
            updates[name] = _resolve_paths(value, base)
        elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
            updates[name] = [_resolve_paths(v, base) for v in value]
    return model.model_copy(update=updates) if updates else model


def _resolve_database(cfg: SiteConfig, base: Path) -> SiteConfig:
    db = cfg.data.database
    if "://" in db or Path(db).is_absolute():
        return cfg
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"database": str((base / db).resolve())})})


def load_site_config(path: str | Path, *, resolve: bool = True) -> SiteConfig:
    """Read ``site_<k>.toml``; relative paths (and a relative SQLite database) become absolute."""
    p = Path(path)
    cfg = validate_toml_data(SiteConfig, read_toml(p), str(p))
    if resolve:
        base = p.resolve().parent
        cfg = _resolve_database(_resolve_paths(cfg, base), base)  # type: ignore[arg-type]
    return cfg


def load_study_config(path: str | Path, *, resolve: bool = True) -> StudyConfig:
    """Read ``study.toml``; relative paths become absolute (relative to the file's folder)."""
    p = Path(path)
    cfg = validate_toml_data(StudyConfig, read_toml(p), str(p))
    return _resolve_paths(cfg, p.resolve().parent) if resolve else cfg  # type: ignore[return-value]


def load_manifest(path: str | Path) -> ConsortiumManifest:
    p = Path(path)
    return validate_toml_data(ConsortiumManifest, read_toml(p), str(p))


def to_toml_dict(model: BaseModel) -> dict[str, Any]:
    """A model as a TOML-ready dict: Paths as POSIX strings, None fields left out."""
    return _clean(model.model_dump(mode="python", exclude_none=True))


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return value.as_posix()
    return value


def write_toml(path: Path, model: BaseModel, header: str = "") -> None:
    import tomli_w  # a dependency of flwr 1.41

    data = to_toml_dict(model)
    tables = {k: data.pop(k) for k in list(data) if isinstance(data[k], list) and data[k] and isinstance(data[k][0], dict)}
    text = tomli_w.dumps(data)
    for key, items in tables.items():  # arrays of tables as [[key]] blocks (tomli_w would inline them)
        for item in items:
            text += f"\n[[{key}]]\n" + tomli_w.dumps(item)
    if header:
        text = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + "\n" + text
    path.write_text(text, encoding="utf-8")
