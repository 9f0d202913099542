"""The Compose deployment's secrets, made on its first start and never again.

The ``secrets`` service (docker-compose.yml) runs this as root with each of these
directories a named volume of the same name under ``--into``; each container mounts only
the volumes it needs, so it can read no one else's password:

    kafka-ca/ca.pem              the CA certificate: every client's trust anchor (public)
    kafka-tls/                   the brokers' TLS, owned by --broker-uid; a deployment with
                                 its own CA mounts a directory like it instead
        ca.pem                   their truststore (they verify each other's certificates)
        <broker>.p12             a broker's key and certificate, PKCS#12: subject CN=broker
                                 (the principal mapping makes that User:broker), valid for
                                 the broker's DNS name
        keystore-password
    broker-credentials/          the brokers' SCRAM secrets, owned by --broker-uid
        broker-password          User:broker's SCRAM password (the super user)
        scram-credentials        one salted SCRAM-SHA-512 record per line (``--add-scram``
                                 at storage format): broker and every component
    setup-credentials/           for the one-shot setup (and operators' commands)
        broker-password          the super user, to grant the components' ACLs
        operator-password        tuo-operator, for everything else
    relay-credentials/credentials.json     {"tuo-relay": password} and nothing else;
    router-credentials/, tracker-credentials/   likewise for tuo-router and tuo-tracker
    replay-credentials/, dead-letters-credentials/   likewise for tuo-replay and tuo-dead-letters
    agencies-credentials/credentials.json  {} until the setup onboards the reference agencies

Every file holding a secret is mode 0600 and every such directory 0700, owned by the
user of the container that reads it (--bus-uid for the project's image). The CA's
private key is not kept: nothing can later issue a certificate these brokers trust.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from devstack.certificates import BROKER_COMMON_NAME, issue_certificate, new_certificate_authority
from devstack.kafka import SUPER_USER
from runtime.access import CredentialsFile, Principal
from runtime.kafka_admin import new_password, scram_record

CA_FILE = "ca.pem"
CREDENTIALS_FILE = "credentials.json"
# File names, not passwords:
KEYSTORE_PASSWORD_FILE = "keystore-password"  # noqa: S105
BROKER_PASSWORD_FILE = "broker-password"  # noqa: S105
OPERATOR_PASSWORD_FILE = "operator-password"  # noqa: S105
SCRAM_CREDENTIALS_FILE = "scram-credentials"

# The directory (one volume each) where a component's own credentials file goes.
COMPONENT_DIRECTORIES = {
    "relay-credentials": Principal.RELAY,
    "router-credentials": Principal.ROUTER,
    "tracker-credentials": Principal.TRACKER,
    # For operators' one-off containers: `tuo replay` and `tuo dlq` (see compose/README.md).
    "replay-credentials": Principal.REPLAY,
    "dead-letters-credentials": Principal.DEAD_LETTERS,
}
AGENCIES_DIRECTORY = "agencies-credentials"  # the reference agencies' passwords, from the setup
SETUP_DIRECTORY = "setup-credentials"
BROKERS_DIRECTORY = "broker-credentials"
TLS_DIRECTORY = "kafka-tls"
CA_DIRECTORY = "kafka-ca"

# Whose passwords each directory holds (kept next to the layout so the compose tests can
# check that no container mounts another's); "agency-*" stands for every agency.
PASSWORDS_HELD = {
    CA_DIRECTORY: frozenset[str](),
    TLS_DIRECTORY: frozenset[str](),
    BROKERS_DIRECTORY: frozenset({SUPER_USER}),  # the other records are salted, not passwords
    SETUP_DIRECTORY: frozenset({SUPER_USER, Principal.OPERATOR.value}),
    AGENCIES_DIRECTORY: frozenset({"agency-*"}),
    **{directory: frozenset({principal.value}) for directory, principal in COMPONENT_DIRECTORIES.items()},
}


class PartialSecrets(RuntimeError):
    """Some of the secrets exist and some do not: making new ones would lock the bus out
    of brokers formatted with the old ones."""

    def __init__(self, missing: list[Path]) -> None:
        super().__init__(
            "some of the deployment's secrets are missing: "
            + ", ".join(str(path) for path in missing)
            + ". Restore those volumes, or start afresh with `docker compose down -v` "
            "(which deletes all data, the brokers' too)."
        )


@dataclass(frozen=True)
class SecretsLayout:
    root: Path
    brokers: tuple[str, ...]

    def directory(self, name: str) -> Path:
        return self.root / name

    def keystore(self, broker: str) -> Path:
        return self.directory(TLS_DIRECTORY) / f"{broker}.p12"

    def credentials(self, directory: str) -> Path:
        return self.directory(directory) / CREDENTIALS_FILE

    def files(self) -> Iterator[Path]:
        yield self.directory(CA_DIRECTORY) / CA_FILE
        tls = self.directory(TLS_DIRECTORY)
        yield from (tls / CA_FILE, tls / KEYSTORE_PASSWORD_FILE)
        yield from (self.keystore(broker) for broker in self.brokers)
        brokers = self.directory(BROKERS_DIRECTORY)
        yield from (brokers / BROKER_PASSWORD_FILE, brokers / SCRAM_CREDENTIALS_FILE)
        setup = self.directory(SETUP_DIRECTORY)
        yield from (setup / BROKER_PASSWORD_FILE, setup / OPERATOR_PASSWORD_FILE)
        yield from (self.credentials(directory) for directory in COMPONENT_DIRECTORIES)
        yield self.credentials(AGENCIES_DIRECTORY)


def generate(layout: SecretsLayout, broker_uid: int, bus_uid: int) -> bool:
    """Make every secret once; False when they all exist already (nothing is touched)."""
    files = list(layout.files())
    missing = [path for path in files if not path.exists()]
    if not missing:
        return False
    if len(missing) < len(files):
        raise PartialSecrets(missing)

    now = datetime.datetime.now(datetime.UTC)
    ca_key, ca_certificate = new_certificate_authority(now)
    ca_pem = ca_certificate.public_bytes(serialization.Encoding.PEM)
    passwords = {SUPER_USER: new_password(), **{p.value: new_password() for p in Principal}}

    public = _directory(layout.directory(CA_DIRECTORY), owner=None, mode=0o755)
    (public / CA_FILE).write_bytes(ca_pem)
    (public / CA_FILE).chmod(0o644)

    tls = _directory(layout.directory(TLS_DIRECTORY), owner=broker_uid)
    keystore_password = new_password()
    for broker in layout.brokers:
        key, certificate = issue_certificate(ca_key, ca_certificate, BROKER_COMMON_NAME, now, hosts=[broker])
        keystore = pkcs12.serialize_key_and_certificates(
            broker.encode(),
            key,
            certificate,
            [ca_certificate],
            serialization.BestAvailableEncryption(keystore_password.encode()),
        )
        _write_private(layout.keystore(broker), keystore, broker_uid)
    _write_private(tls / CA_FILE, ca_pem, broker_uid)
    _write_private(tls / KEYSTORE_PASSWORD_FILE, keystore_password.encode(), broker_uid)

    brokers = _directory(layout.directory(BROKERS_DIRECTORY), owner=broker_uid)
    _write_private(brokers / BROKER_PASSWORD_FILE, passwords[SUPER_USER].encode(), broker_uid)
    records = "".join(scram_record(user, password) + "\n" for user, password in passwords.items())
    _write_private(brokers / SCRAM_CREDENTIALS_FILE, records.encode(), broker_uid)

    setup = _directory(layout.directory(SETUP_DIRECTORY), owner=bus_uid)
    _write_private(setup / BROKER_PASSWORD_FILE, passwords[SUPER_USER].encode(), bus_uid)
    _write_private(setup / OPERATOR_PASSWORD_FILE, passwords[Principal.OPERATOR].encode(), bus_uid)

    for directory, principal in COMPONENT_DIRECTORIES.items():
        _directory(layout.directory(directory), owner=bus_uid)
        _write_credentials(layout.credentials(directory), {principal.value: passwords[principal]}, bus_uid)
    _directory(layout.directory(AGENCIES_DIRECTORY), owner=bus_uid)
    _write_credentials(layout.credentials(AGENCIES_DIRECTORY), {}, bus_uid)
    return True


def _directory(path: Path, owner: int | None, mode: int = 0o700) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    _chown(path, owner)
    return path


def _write_private(path: Path, data: bytes, owner: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as stream:
        stream.write(data)
    _chown(path, owner)


def _write_credentials(path: Path, passwords: dict[str, str], owner: int) -> None:
    CredentialsFile(path).update(dict(passwords))  # mode 0600, in CredentialsFile's own format
    _chown(path, owner)


def _chown(path: Path, owner: int | None) -> None:
    # Only root can give files away; anyone else keeps them (and runs the readers as itself).
    if owner is not None and os.geteuid() == 0:
        os.chown(path, owner, -1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--into", type=Path, required=True, help="where the volumes are mounted")
    parser.add_argument("--brokers", nargs="+", required=True, help="the brokers' DNS names")
    parser.add_argument("--broker-uid", type=int, required=True, help="the user the brokers run as")
    parser.add_argument("--bus-uid", type=int, required=True, help="the user the bus's containers run as")
    args = parser.parse_args(argv)
    layout = SecretsLayout(args.into, tuple(args.brokers))
    try:
        made = generate(layout, args.broker_uid, args.bus_uid)
    except PartialSecrets as exc:
        print(f"secrets: {exc}", file=sys.stderr)
        return 1
    print("secrets: generated" if made else "secrets: already generated; nothing changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
