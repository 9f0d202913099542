"""One settings object: the environment wins over the local stack's env file."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from runtime.settings import MissingSetting, Settings, load_settings


def test_running_stack_fills_in_connection_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "stack.env").write_text(
        "TUO_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:1111\nTUO_DATABASE_URL=postgresql://a:b@127.0.0.1:2222/tuo\n"
    )
    monkeypatch.delenv("TUO_KAFKA_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.setenv("TUO_STATE_DIR", str(tmp_path))
    settings = load_settings()
    assert settings.require_bootstrap_servers() == "127.0.0.1:1111"
    assert settings.require_database_url().endswith(":2222/tuo")


def test_environment_points_the_bus_at_a_real_cluster_over_the_stack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "stack.env").write_text("TUO_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:1111\n")
    monkeypatch.setenv("TUO_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("TUO_KAFKA_BOOTSTRAP_SERVERS", "kafka-1.example:9093,kafka-2.example:9093")
    monkeypatch.setenv("TUO_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("TUO_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    settings = load_settings()
    assert settings.kafka_bootstrap_servers == "kafka-1.example:9093,kafka-2.example:9093"
    assert settings.kafka_security_protocol == "SASL_SSL"
    assert settings.kafka_sasl_mechanism == "SCRAM-SHA-512"


def test_missing_database_url_says_which_variable_and_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUO_DATABASE_URL", raising=False)
    with pytest.raises(MissingSetting, match=r"TUO_DATABASE_URL is not set: start the local stack"):
        Settings(state_dir=Path("/nonexistent")).require_database_url()


def test_invalid_setting_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUO_KAFKA_SECURITY_PROTOCOL", "TELNET")
    with pytest.raises(ValueError, match="kafka_security_protocol"):
        Settings()


def test_secrets_do_not_appear_in_the_settings_repr() -> None:
    settings = Settings(database_url="postgresql://tuo:hunter2@db/tuo", pseudonym_key="k3y-s3cret")
    assert "hunter2" not in repr(settings)
    assert "k3y-s3cret" not in repr(settings)


def test_registry_credentials_are_refused_in_the_url_and_kept_secret() -> None:
    with pytest.raises(ValueError, match="schema_registry_url"):
        Settings(schema_registry_url="https://key:secret@registry.example")
    settings = Settings(
        schema_registry_url="https://registry.example",
        schema_registry_username="key",
        schema_registry_password="s3cret-value",
    )
    assert settings.schema_registry_auth() == ("key", "s3cret-value")
    assert "s3cret-value" not in repr(settings)
    assert settings.schema_base_url() == "https://registry.example"


def test_the_development_identity_provider_runs_only_as_this_services_loopback_provider() -> None:
    assert Settings(dev_idp_port=5555, oidc_issuer="http://127.0.0.1:5555").dev_idp_port == 5555
    with pytest.raises(ValidationError, match="TUO_DEV_IDP_PORT is for the local stack only"):
        Settings(dev_idp_port=5555, oidc_issuer="https://oidc.account.gov.uk/")
    with pytest.raises(ValidationError, match="TUO_DEV_IDP_PORT is for the local stack only"):
        Settings(dev_idp_port=5555)


def test_a_real_identity_provider_must_use_https() -> None:
    assert Settings(oidc_issuer="https://oidc.account.gov.uk/").oidc_issuer
    with pytest.raises(ValidationError, match="must use https"):
        Settings(oidc_issuer="http://idp.example.gov.uk")
