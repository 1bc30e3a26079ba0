"""TLS certificates (the SuperLink, the split server) and SSH EC keys for SuperNode authentication.

Shared by ``deploy/`` and ``split/``, so it lives beside neither and imports neither Flower nor gRPC.

``make_certs`` writes a private CA and a server certificate signed by it (SANs: the host name,
``localhost``, ``127.0.0.1``, ``::1``); SuperNodes and the ``flwr`` CLI trust ``ca.crt``.
``make_client_cert`` signs a client certificate with that CA (its common name is the client's
identity on the split server, which requires one from each client: mutual TLS).
``make_node_key`` writes an EC P-384 key pair in OpenSSH format, the same as
``ssh-keygen -t ecdsa -b 384``; its public half is registered with ``flwr supernode register``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpeft.errors import FedPeftError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CertPaths:
    """Files written by :func:`make_certs`."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class ClientCert:
    """Files written by :func:`make_client_cert`."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class NodeKey:
    """Files written by :func:`make_node_key`."""

    private: Path
    public: Path


def _write(path: Path, data: bytes, secret: bool = False, force: bool = False) -> None:
    if path.exists() and not force:
        raise FedPeftError(f"{path} exists; refusing to overwrite it (use --force)")
    path.write_bytes(data)
    if secret:
        os.chmod(path, 0o600)


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):  # keep order, drop duplicates
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_certs(host: str, out: Path, days: int = 365, extra_names: list[str] | None = None,
               force: bool = False) -> CertPaths:
    """Write ``ca.crt``/``ca.key`` and ``server.crt``/``server.key`` for ``host`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedpeft CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    names = [host, *(extra_names or []), "localhost", "127.0.0.1", "::1"]
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(_san(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = CertPaths(out / "ca.crt", out / "ca.key", out / "server.crt", out / "server.key")
    _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), force=force)
    _write(paths.ca_key, _key_pem(ca_key), secret=True, force=force)
    _write(paths.server_cert, cert.public_bytes(serialization.Encoding.PEM), force=force)
    _write(paths.server_key, _key_pem(key), secret=True, force=force)
    log.info("wrote CA and server certificate for %s into %s", ", ".join(dict.fromkeys(names)), out)
    return paths


def make_client_cert(ca_dir: Path, name: str, out: Path | None = None, days: int = 365,
                     force: bool = False) -> ClientCert:
    """Sign a client certificate with common name ``name`` by the CA in ``ca_dir`` (``ca.crt`` + ``ca.key``).

    Writes ``<name>.crt`` / ``<name>.key`` into ``out`` (default ``ca_dir``). The split server takes the
    common name as the client's identity, so give every client its own name.
    """
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise FedPeftError(f"client name {name!r}: use letters, digits, '-', '_' and '.' only")
    try:
        ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
        ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise FedPeftError(f"cannot read the CA in {ca_dir} (ca.crt, ca.key from `fedpeft certs`): {exc}") from exc
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise FedPeftError(f"{ca_dir / 'ca.key'} is not an EC key written by `fedpeft certs`")
    out = out or ca_dir
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = ClientCert(out / f"{name}.crt", out / f"{name}.key")
    _write(paths.cert, cert.public_bytes(serialization.Encoding.PEM), force=force)
    _write(paths.key, _key_pem(key), secret=True, force=force)
    log.info("wrote client certificate %s (common name %s)", paths.cert, name)
    return paths


def make_node_key(out: Path, name: str = "node_key", comment: str = "fedpeft-node", force: bool = False) -> NodeKey:
    """Write an EC P-384 OpenSSH key pair ``<name>`` / ``<name>.pub`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    paths = NodeKey(out / name, out / f"{name}.pub")
    _write(paths.private, private, secret=True, force=force)
    _write(paths.public, public + f" {comment}\n".encode(), force=force)
    log.info("wrote node key pair %s (.pub)", paths.private)
    return paths
