"""Certificates generated for a test: a CA, a server certificate for 127.0.0.1 / localhost, a client certificate,
all as PEM files in one directory (the `cryptography` package; nothing is fetched or kept)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Certs:
    ca: Path  # the CA certificate (clients trust it; as client_ca_file it admits the client certificate)
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_key: Path  # a key that belongs to no certificate here


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _cert(subject: str, key, issuer: x509.Name, issuer_key, *, ca: bool, usage=None, sans=()):
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write_key(path: Path, key) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path


def _write_cert(path: Path, cert) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def make_certs(directory: Path) -> Certs:
    ca_key = _key()
    ca_name = _name("blockserve test CA")
    ca = _cert("blockserve test CA", ca_key, ca_name, ca_key, ca=True)
    server_key, client_key = _key(), _key()
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = _cert(
        "localhost", server_key, ca_name, ca_key, ca=False, usage=ExtendedKeyUsageOID.SERVER_AUTH, sans=sans
    )
    client = _cert(
        "test client", client_key, ca_name, ca_key, ca=False, usage=ExtendedKeyUsageOID.CLIENT_AUTH
    )
    d = Path(directory)
    return Certs(
        ca=_write_cert(d / "ca.crt", ca),
        server_cert=_write_cert(d / "server.crt", server),
        server_key=_write_key(d / "server.key", server_key),
        client_cert=_write_cert(d / "client.crt", client),
        client_key=_write_key(d / "client.key", client_key),
        other_key=_write_key(d / "other.key", _key()),
    )
