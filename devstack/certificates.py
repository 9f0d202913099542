"""TLS for the local stack: a private certificate authority and the broker's certificate.

The stack makes its own CA on first start, so a fresh machine gets an encrypted,
authenticated broker with nothing to configure. Clients trust exactly this CA
(``TUO_KAFKA_SSL_CAFILE``), never the system store. In production the CA is
configuration: point the broker at certificates from a real CA and clients at
its root.

Files under ``<kafka home>/tls`` (the directory is 0700):

    ca.pem          the CA certificate (public; clients' trust anchor)
    ca.key          the CA's private key, kept to sign further brokers' certificates
    broker.p12      the broker's key and certificate chain (PKCS#12, password protected)

The broker certificate's subject is ``CN=broker``; the broker's SSL principal
mapping turns that into ``User:broker``, the super user the brokers and
controllers use between themselves.
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

BROKER_COMMON_NAME = "broker"
VALID_DAYS = 825  # the longest lifetime browsers and most TLS stacks still accept
LOOPBACK = (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")))


@dataclass(frozen=True)
class BrokerTls:
    ca_file: Path
    keystore: Path
    keystore_password: str


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tell Us Once local stack"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_private(path: Path, data: bytes) -> None:
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_bytes(data)


def _subject_alternative_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def new_certificate_authority(now: datetime.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name("Tell Us Once local CA " + secrets.token_hex(4))
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def issue_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_certificate: x509.Certificate,
    common_name: str,
    now: datetime.datetime | None = None,
    hosts: Sequence[str] | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A key and certificate for a server, usable as client certificate too (brokers
    authenticate to the controller with it), valid for ``hosts`` (DNS names or IP
    addresses; by default loopback: localhost and 127.0.0.1)."""
    now = now or datetime.datetime.now(datetime.UTC)
    names = [_subject_alternative_name(host) for host in hosts] if hosts else list(LOOPBACK)
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(names),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_certificate.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, certificate


def ensure_broker_tls(directory: Path, keystore_password: str) -> BrokerTls:
    """Create the CA and the broker's keystore once; later calls reuse them."""
    tls = BrokerTls(directory / "ca.pem", directory / "broker.p12", keystore_password)
    if tls.ca_file.exists() and tls.keystore.exists():
        return tls
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    now = datetime.datetime.now(datetime.UTC)
    ca_key, ca_certificate = new_certificate_authority(now)
    key, certificate = issue_certificate(ca_key, ca_certificate, BROKER_COMMON_NAME, now)
    _write_private(
        directory / "ca.key",
        ca_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    _write_private(
        tls.keystore,
        pkcs12.serialize_key_and_certificates(
            b"broker",
            key,
            certificate,
            [ca_certificate],
            serialization.BestAvailableEncryption(keystore_password.encode()),
        ),
    )
    tls.ca_file.write_bytes(ca_certificate.public_bytes(serialization.Encoding.PEM))
    tls.ca_file.chmod(0o644)
    return tls


@dataclass(frozen=True)
class ServerTls:
    """PEM files for an HTTPS server on loopback, and the CA its clients trust."""

    ca_file: Path
    certificate_file: Path
    key_file: Path


def loopback_server_tls(directory: Path, common_name: str) -> ServerTls:
    """A fresh CA and a certificate it issued for localhost and 127.0.0.1, as PEM files in
    ``directory`` (the key readable by its owner only): for a local HTTPS server, such as
    a webhook receiver in the tests and benchmarks."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, ca_certificate = new_certificate_authority(now)
    key, certificate = issue_certificate(ca_key, ca_certificate, common_name, now)
    tls = ServerTls(
        directory / f"{common_name}-ca.pem",
        directory / f"{common_name}-cert.pem",
        directory / f"{common_name}-key.pem",
    )
    tls.ca_file.write_bytes(ca_certificate.public_bytes(serialization.Encoding.PEM))
    tls.certificate_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    _write_private(
        tls.key_file,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    return tls
