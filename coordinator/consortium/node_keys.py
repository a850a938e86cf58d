"""SuperNode authentication keys, Ed25519 signing keys and SuperExec shared secrets.

SuperNode authentication (checked in flwr 1.41.0's source):

* ``flower-supernode --auth-supernode-private-key KEY`` loads KEY with
  ``cryptography...load_ssh_private_key`` and requires an ``EllipticCurvePrivateKey``
  (flwr/supernode/cli/flower_supernode.py, ``_try_setup_client_authentication``): an OpenSSH
  private key on an EC curve.
* ``flwr supernode register KEY.pub <connection>`` loads an OpenSSH public key and requires an EC
  key on a NIST curve (flwr/cli/supernode/register.py, "P-384 (or any other NIST EC curve)").

So a SuperNode key is an EC **P-384** key pair in OpenSSH format (``ecdsa-sha2-nistp384``), what
``ssh-keygen -t ecdsa -b 384`` produces. The SuperLink (``--enable-supernode-auth``) accepts a
SuperNode only if its public key was registered through the Control API beforehand.

The Ed25519 keys are for FedTwin's own provenance signatures (later issue): PKCS#8 PEM private
key (0600) and SubjectPublicKeyInfo PEM public key.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from coordinator.consortium.pki import write_secret


def generate_supernode_key(private_path: Path, public_path: Path, comment: str = "") -> None:
    """Write an OpenSSH EC P-384 key pair for ``--auth-supernode-private-key`` / ``flwr supernode register``."""
    key = ec.generate_private_key(ec.SECP384R1())
    write_secret(
        private_path,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
    )
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.write_bytes(pub + (f" {comment}".encode() if comment else b"") + b"\n")


def load_supernode_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_ssh_private_key(Path(path).read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} is not an EC private key")
    return key


def load_supernode_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    key = serialization.load_ssh_public_key(Path(path).read_bytes())
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"{path} is not an EC public key")
    return key


def generate_signing_key(private_path: Path, public_path: Path) -> None:
    """Write an Ed25519 key pair (PKCS#8 PEM private, 0600; SubjectPublicKeyInfo PEM public)."""
    key = ed25519.Ed25519PrivateKey.generate()
    write_secret(
        private_path,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    public_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def load_signing_private_key(path: Path) -> ed25519.Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def load_signing_public_key(path: Path) -> ed25519.Ed25519PublicKey:
    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key


def generate_superexec_secret(path: Path) -> None:
    """A random shared secret for ``--superexec-auth-secret-file`` (read as raw bytes by Flower)."""
    write_secret(path, secrets.token_hex(32).encode("ascii"))
