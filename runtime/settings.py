"""The one settings object. Nothing else in the project reads the environment.

Every field can be set with an environment variable named ``TUO_<FIELD>``
(for example ``TUO_KAFKA_BOOTSTRAP_SERVERS``). When the local stack is running,
it writes the addresses it chose to ``<state_dir>/stack.env``; that file fills in
whatever the environment leaves unset, so pointing the bus at a real cluster is
a matter of setting the variables.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "TUO_"
STACK_ENV_FILE = "stack.env"


class MissingSetting(RuntimeError):
    """A setting the caller needs has no value."""

    def __init__(self, field: str, hint: str) -> None:
        super().__init__(f"{ENV_PREFIX}{field.upper()} is not set: {hint}")
        self.field = field


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    state_dir: Path = Field(
        default=Path(".tuo/state"),
        description="Where the local stack keeps its data, logs and chosen ports.",
    )
    cache_dir: Path = Field(
        default=Path(".tuo/cache"),
        description="Downloaded Kafka jars; survives `tuo stack purge`.",
    )

    # Kafka
    kafka_bootstrap_servers: str = ""
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = Field(
        default=None, description="The CA that signed the brokers' certificates; unset: the system's CAs."
    )
    kafka_credentials_file: Path | None = Field(
        default=None,
        description="The local stack's file of Kafka passwords, one per principal (mode 0600); "
        "a component connects as its own principal when the file names it, else as kafka_sasl_username.",
    )
    topic_prefix: str = Field(default="tuo", pattern=r"^[a-zA-Z0-9._-]{1,40}$")
    life_events_partitions: int = Field(default=3, ge=1, le=1000)
    router_processes: int = Field(
        default=1,
        ge=1,
        le=64,
        description="How many router processes `tuo run` runs in the router's consumer group"
        " (one in itself, the rest as child processes). More than there are life-events"
        " partitions leaves some idle.",
    )
    agency_partitions: int = Field(
        default=1,
        ge=1,
        le=1000,
        description="Partitions of each agency's topic when it is created: an agency runs as"
        " many consumer processes as it has partitions, in one consumer group, to go faster"
        " (one person's events stay on one partition, in order).",
    )
    process_per_component: bool = Field(
        default=False,
        description="`tuo run` of several components keeps intake in its own process and runs"
        " every other one in a child process of its own. Off by default: on a 2-core machine"
        " that also runs Kafka and PostgreSQL it cut intake to 77 registrations/s at a 100/s"
        " load (receipts came sooner); worth it where there are cores to spare.",
    )
    intake_processes: int = Field(
        default=1,
        ge=1,
        le=64,
        description="How many intake processes `tuo run` runs on the one HTTP port (one in"
        " itself, the rest as child processes; the kernel spreads connections among them).",
    )
    topic_replication_factor: int = Field(default=1, ge=1, le=10)

    # PostgreSQL
    database_url: SecretStr | None = None
    # Per process. Under `tuo run` every component shares one pool, and each agency holds
    # a connection for a whole batch's transaction: 10 left intake waiting for one.
    database_pool_size: int = Field(default=30, ge=1, le=200)

    # Intake HTTP service
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)
    http_reuse_port: bool = Field(
        default=False,
        description="Set by `tuo run` for the intake processes it adds (TUO_INTAKE_PROCESSES):"
        " they listen on the first one's port beside it, and leave the development identity"
        " provider to it.",
    )
    max_request_bytes: int = Field(default=64 * 1024, ge=1024)
    # Requests a minute per client (a signed-in registrar, else an address; API tokens'
    # holders have api_rate_limit_per_minute), a minute's worth at once at most, in each
    # intake process; and sign-in attempts a minute per address,
    # far fewer, against password guessing across usernames.
    http_rate_limit_per_minute: int = Field(default=3000, ge=1, le=1_000_000)
    api_rate_limit_per_minute: int = Field(
        default=30_000,
        ge=1,
        le=10_000_000,
        description="Requests a minute per API token's holder (a system submitting events), a"
        " minute's worth at once at most, in each intake process. The default, 500/s, is about"
        " what intake takes on a 2-core machine: one system may submit a backlog as fast as"
        " intake can record it, and cannot run unbounded.",
    )
    sign_in_attempts_per_minute: int = Field(default=20, ge=1, le=10_000)
    # Addresses of reverse proxies whose X-Forwarded-For is believed (comma-separated, "*"
    # for any). Unset: none, so no client can choose the address its rate limit counts.
    http_forwarded_allow_ips: str = ""
    # Registrars' web forms: server-side sessions. Cookies are Secure (HTTPS only) unless
    # this is turned off for plain-http development and tests on localhost.
    session_cookie_secure: bool = True
    session_idle_minutes: int = Field(default=30, ge=1, le=24 * 60)
    session_max_hours: int = Field(default=10, ge=1, le=24)
    # The informant's journey (/tell-us-once): how long after a registration its
    # reference opens it.
    informant_reference_days: int = Field(default=28, ge=1, le=366)
    # Its confirmations by email (citizens.emails): unset host, no email is offered.
    smtp_host: str | None = None
    smtp_port: int = Field(default=587, ge=1, le=65535)
    smtp_starttls: bool = Field(default=True, description="Off only for a mail server on this machine.")
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_sender: str = "Tell Us Once <no-reply@tell-us-once.example>"
    informant_email_check_seconds: float = Field(default=5.0, gt=0, le=3600)
    govuk_frontend_dir: Path | None = Field(
        default=None,
        description="GOV.UK Frontend's dist/govuk folder; unset: node_modules/ in the project (npm ci).",
    )
    swagger_ui_dir: Path | None = Field(
        default=None,
        description="swagger-ui-dist's folder, for /docs; unset: node_modules/ in the project (npm ci).",
    )

    # Prometheus: each process started by `tuo run` serves its own counters on this port
    # (monitoring token required); unset: none. 0 picks a free port, which is logged.
    metrics_host: str = Field(default="127.0.0.1", min_length=1, pattern=r"^[^\s/]+$")
    metrics_port: int | None = Field(default=None, ge=0, le=65535)

    # Schemas: ids come from the committed catalogue, or from an existing
    # Confluent-compatible registry when one is named here.
    schema_registry_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s@]+$",
        description="Credentials go in the two settings below, never in the URL (it is logged).",
    )
    schema_registry_username: str | None = None
    schema_registry_password: SecretStr | None = None
    public_url: str = Field(
        default="http://127.0.0.1:8080",
        pattern=r"^https?://[^\s]+$",
        description="Where clients reach the intake service; ce_dataschema links point here.",
    )

    # Receipts: how long an agency has to answer (unless `tuo receipts deadline` sets its
    # own), and how often the tracker looks for overdue deliveries.
    receipt_deadline_minutes: int = Field(default=2 * 24 * 60, ge=1, le=30 * 24 * 60)
    overdue_check_seconds: float = Field(default=30.0, gt=0, le=3600)

    # Webhook delivery (consumers.webhooks): how long one attempt may take, which CAs to
    # trust for agencies' endpoints (unset: the system's), and the first retry's delay.
    webhook_timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    webhook_cafile: Path | None = Field(
        default=None, description="CAs for agencies' webhook endpoints; unset: the system's CAs."
    )
    webhook_first_retry_seconds: float = Field(default=1.0, gt=0, le=3600)

    # Citizens' sign-in (OpenID Connect)
    oidc_issuer: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s@]+$",
        description="The identity provider's issuer URL (its discovery document is read from "
        "<issuer>/.well-known/openid-configuration), e.g. GOV.UK One Login's.",
    )
    oidc_client_id: str | None = None
    oidc_client_secret: SecretStr | None = None
    oidc_redirect_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s@]+$",
        description="Registered with the provider; unset: <public_url>/citizen/callback.",
    )
    oidc_scopes: str = "openid"
    dev_idp_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Run the development identity provider (test identities) on this 127.0.0.1 "
        "port; the local stack sets it. Never set in production.",
    )

    # Deriving pseudonymous subject ids from identifiers such as the NINO.
    pseudonym_key: SecretStr | None = None
    # Sealing outbox payloads (personal data) at rest: AES-256-GCM, 32 bytes in URL-safe
    # base64. Rotate by moving the old key to data_keys_previous (a JSON list).
    data_key: SecretStr | None = None
    data_keys_previous: list[SecretStr] = Field(default_factory=list)

    # Local stack
    kafka_version: str = "4.3.1"
    kafka_heap: str | None = Field(
        default=None, description="Each local broker's Java heap; unset: 1G for one, 512M each for three."
    )

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "console"] = "json"

    @model_validator(mode="after")
    def _dev_idp_only_on_loopback(self) -> Settings:
        """The development identity provider signs anyone in as its test people: it may
        only ever be this service's provider on loopback, never stand in for a real one."""
        if self.dev_idp_port is not None and self.oidc_issuer != f"http://127.0.0.1:{self.dev_idp_port}":
            raise ValueError(
                "TUO_DEV_IDP_PORT is for the local stack only: TUO_OIDC_ISSUER must then be "
                f"http://127.0.0.1:{self.dev_idp_port}"
            )
        if self.oidc_issuer and not self.oidc_issuer.startswith(("https://", "http://127.0.0.1:")):
            raise ValueError("TUO_OIDC_ISSUER must use https (plain http only on 127.0.0.1)")
        return self

    def require_database_url(self) -> str:
        if self.database_url is None:
            raise MissingSetting(
                "database_url", "start the local stack with `tuo stack up` or point it at PostgreSQL"
            )
        return self.database_url.get_secret_value()

    def require_bootstrap_servers(self) -> str:
        if not self.kafka_bootstrap_servers:
            raise MissingSetting(
                "kafka_bootstrap_servers",
                "start the local stack with `tuo stack up` or point it at a Kafka cluster",
            )
        return self.kafka_bootstrap_servers

    def kafka_credentials(self, principal: str) -> tuple[str, str] | None:
        """The user name and password to connect as ``principal`` (see kafka_credentials_file)."""
        if self.kafka_credentials_file is not None:
            try:
                known = json.loads(self.kafka_credentials_file.read_text())
            except FileNotFoundError:
                known = {}
            if principal in known:
                return principal, str(known[principal])
        if self.kafka_sasl_username is None or self.kafka_sasl_password is None:
            return None
        return self.kafka_sasl_username, self.kafka_sasl_password.get_secret_value()

    def schema_registry_auth(self) -> tuple[str, str] | None:
        if self.schema_registry_username is None or self.schema_registry_password is None:
            return None
        return self.schema_registry_username, self.schema_registry_password.get_secret_value()

    def schema_base_url(self) -> str:
        return (self.schema_registry_url or self.public_url).rstrip("/")

    def require_pseudonym_key(self) -> bytes:
        if self.pseudonym_key is None:
            raise MissingSetting(
                "pseudonym_key", "the local stack generates one; elsewhere set a long random secret"
            )
        return self.pseudonym_key.get_secret_value().encode()


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, then the running local stack's env file."""
    base = Settings(**overrides)  # type: ignore[arg-type]
    stack_env = base.state_dir / STACK_ENV_FILE
    if not stack_env.exists():
        return base
    return Settings(_env_file=stack_env, **overrides)  # type: ignore[arg-type]
