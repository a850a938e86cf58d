"""Ed25519 keys for provenance, read from the PEM files ``fedtwin consortium init`` writes.

``consortium init`` writes, for the coordinator and every site, ``keys/signing/<who>.ed25519.pem``
(PKCS#8 PEM, unencrypted, 0600) and ``keys/signing/<who>.ed25519.pub.pem`` (SubjectPublicKeyInfo
PEM); see ``coordinator/consortium/node_keys.py``. This module reads them itself (``fedtwin`` does
not import the coordinator), and explains the usual mix-ups: a public key given where the private
one is needed, the SuperNode's OpenSSH EC key instead of the Ed25519 one, an encrypted key.

A key is named in evidence by its *key id*: the first 16 hex digits of sha256 of the 32-byte raw
public key. Short enough to read in a record, long enough (64 bits) that two keys of one
consortium never collide by chance; a verifier always checks the signature with the full key.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedtwin.provenance.errors import ProvenanceError

KEY_ID_HEX_DIGITS = 16
KEY_ID_RE = re.compile(rf"^[0-9a-f]{{{KEY_ID_HEX_DIGITS}}}$")
PUBLIC_KEY_SUFFIX = ".ed25519.pub.pem"
_FIX_FILES = (
    "use the files `fedtwin consortium init` wrote: keys/signing/<name>.ed25519.pem (private) and "
    "keys/signing/<name>.ed25519.pub.pem (public)"
)


def key_id_of(public_key: ed25519.Ed25519PublicKey) -> str:
    """First 16 hex digits of sha256 of the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:KEY_ID_HEX_DIGITS]


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ProvenanceError(f"{what} {path} does not exist", _FIX_FILES) from None
    except OSError as exc:
        raise ProvenanceError(f"{what} {path} cannot be read: {exc.strerror}", "check the path and its permissions") from None


def _mixup(data: bytes, path: Path, wanted: str) -> ProvenanceError | None:
    """A precise error for the usual wrong files, or None."""
    if b"OPENSSH PRIVATE KEY" in data or data.startswith((b"ecdsa-sha2-", b"ssh-")):
        return ProvenanceError(
            f"{path} is an OpenSSH key (the SuperNode authentication key?), not the Ed25519 {wanted} signing key", _FIX_FILES
        )
    if wanted == "private" and b"PUBLIC KEY" in data:
        return ProvenanceError(f"{path} holds a public key; signing needs the private key", _FIX_FILES)
    if wanted == "public" and b"PRIVATE KEY" in data:
        return ProvenanceError(
            f"{path} holds a PRIVATE key where a public key was expected",
            "give the .ed25519.pub.pem file; a private key must never leave its owner, so move this copy away",
        )
    if b"-----BEGIN" not in data:
        return ProvenanceError(f"{path} is not a PEM file", _FIX_FILES)
    return None


def _kind(key: object) -> str:
    """``an EC secp256r1 key``, ``an RSA key``: what a wrong key file holds, in words."""
    curve = getattr(key, "curve", None)
    if curve is not None:
        return f"an EC {curve.name} key"
    name = type(key).__name__.lstrip("_").replace("PrivateKey", "").replace("PublicKey", "")
    return f"a {name} key"


@dataclass(frozen=True)
class VerifyKey:
    """A trusted Ed25519 public key, with the name of its owner (``coordinator``, ``site_1``...)."""

    public_key: ed25519.Ed25519PublicKey = field(repr=False, compare=False)
    key_id: str
    name: str | None = None
    source: str | None = field(default=None, compare=False)

    @classmethod
    def from_public_key(cls, public_key: ed25519.Ed25519PublicKey, name: str | None = None, source: str | None = None) -> VerifyKey:
        return cls(public_key, key_id_of(public_key), name, source)

    @classmethod
    def from_pem_file(cls, path: str | Path, name: str | None = None) -> VerifyKey:
        """Read a SubjectPublicKeyInfo PEM Ed25519 public key (``<name>.ed25519.pub.pem``)."""
        p = Path(path)
        data = _read(p, "public key")
        if (err := _mixup(data, p, "public")) is not None:
            raise err
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise ProvenanceError(f"{p} is not a readable PEM public key ({exc})", _FIX_FILES) from None
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise ProvenanceError(f"{p} holds {_kind(key)}, not an Ed25519 public key", _FIX_FILES)
        return cls.from_public_key(key, name, str(p))

    def verify(self, data: bytes, signature: bytes) -> bool:
        """True if ``signature`` is this key's Ed25519 signature of ``data``."""
        try:
            self.public_key.verify(signature, data)
        except InvalidSignature:
            return False
        return True

    def public_pem(self) -> str:
        return self.public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")

    def describe(self) -> str:
        """``site_1 (key 1a2b...)``: how error messages name a key."""
        who = self.name or "unnamed key"
        return f"{who} (key {self.key_id}{', ' + self.source if self.source else ''})"


@dataclass(frozen=True, repr=False)
class SigningKey:
    """An Ed25519 private key and its key id. Its repr never shows key material."""

    private_key: ed25519.Ed25519PrivateKey = field(compare=False)
    key_id: str
    source: str | None = field(default=None, compare=False)

    @classmethod
    def from_private_key(cls, private_key: ed25519.Ed25519PrivateKey, source: str | None = None) -> SigningKey:
        return cls(private_key, key_id_of(private_key.public_key()), source)

    @classmethod
    def from_pem_file(cls, path: str | Path) -> SigningKey:
        """Read an unencrypted PKCS#8 PEM Ed25519 private key (``<name>.ed25519.pem``)."""
        p = Path(path)
        data = _read(p, "signing key")
        if (err := _mixup(data, p, "private")) is not None:
            raise err
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError:
            raise ProvenanceError(f"{p} is encrypted with a password", "use the unencrypted key consortium init wrote") from None
        except ValueError as exc:
            raise ProvenanceError(f"{p} is not a readable PEM private key ({exc})", _FIX_FILES) from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ProvenanceError(f"{p} holds {_kind(key)}, not an Ed25519 private key", _FIX_FILES)
        return cls.from_private_key(key, str(p))

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    def verify_key(self, name: str | None = None) -> VerifyKey:
        """The matching public key (e.g. to check one's own signature before sending)."""
        return VerifyKey.from_public_key(self.private_key.public_key(), name, self.source)

    def __repr__(self) -> str:
        return f"SigningKey(key_id={self.key_id!r}, source={self.source!r})"


def load_signing_key(path: str | Path) -> SigningKey:
    """The private key at ``path`` (a site's ``keys.signing_private_key``)."""
    return SigningKey.from_pem_file(path)


def load_verify_key(path: str | Path, name: str | None = None) -> VerifyKey:
    """The public key at ``path``, named ``name`` (who owns it)."""
    return VerifyKey.from_pem_file(path, name)


class KeyRing:
    """The public keys a verifier trusts, each named by its owner; looked up by key id or name."""

    def __init__(self, keys: Iterable[VerifyKey]) -> None:
        self._by_id: dict[str, VerifyKey] = {}
        self._by_name: dict[str, VerifyKey] = {}
        for k in keys:
            if not k.name:
                raise ProvenanceError(f"key {k.key_id} has no owner name", "give every trusted key the name of its owner")
            if k.name in self._by_name:
                raise ProvenanceError(f"two keys are named {k.name!r}", "give each owner exactly one key")
            if k.key_id in self._by_id:
                other = self._by_id[k.key_id]
                raise ProvenanceError(
                    f"{k.name} and {other.name} have the same key ({k.key_id})",
                    "every site and the coordinator need their own key: run `fedtwin consortium init` again",
                )
            self._by_id[k.key_id] = k
            self._by_name[k.name] = k

    @classmethod
    def from_files(cls, paths: Mapping[str, str | Path]) -> KeyRing:
        """``{"coordinator": ".../coordinator.ed25519.pub.pem", "site_1": ...}``."""
        return cls(VerifyKey.from_pem_file(p, name) for name, p in paths.items())

    @classmethod
    def from_dir(cls, folder: str | Path) -> KeyRing:
        """Every ``<name>.ed25519.pub.pem`` in ``folder`` (consortium init's ``keys/signing``)."""
        d = Path(folder)
        if not d.is_dir():
            raise ProvenanceError(f"key folder {d} does not exist", "give the consortium's keys/signing folder")
        files = sorted(p for p in d.iterdir() if p.name.endswith(PUBLIC_KEY_SUFFIX))
        if not files:
            raise ProvenanceError(f"{d} holds no *{PUBLIC_KEY_SUFFIX} file", "give the consortium's keys/signing folder")
        return cls(VerifyKey.from_pem_file(p, p.name[: -len(PUBLIC_KEY_SUFFIX)]) for p in files)

    def by_id(self, key_id: str | None) -> VerifyKey | None:
        return self._by_id.get(key_id) if key_id else None

    def by_name(self, name: str) -> VerifyKey | None:
        return self._by_name.get(name)

    @property
    def names(self) -> list[str]:
        return sorted(self._by_name)

    def __iter__(self) -> Iterator[VerifyKey]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def __repr__(self) -> str:
        return "KeyRing(" + ", ".join(f"{n}={self._by_name[n].key_id}" for n in self.names) + ")"
