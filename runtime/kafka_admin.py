"""Kafka's security administration over the wire: SCRAM credentials and ACLs.

aiokafka's admin client has no call for these, so this module defines the three
requests the bus needs (CreateAcls and DeleteAcls v1, DescribeAcls v1 and
AlterUserScramCredentials v0, from Kafka's protocol definitions) on aiokafka's
protocol types and sends them through an ``AIOKafkaAdminClient``. Passwords are
salted and hashed here (RFC 5802 ``Hi``, which is PBKDF2); the broker never sees
them, and no password is logged.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import for_code
from aiokafka.protocol.admin import (
    CreateAclsRequest_v1,
    DeleteAclsRequest_v1,
    DescribeAclsRequest_v1,
)
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (
    CompactArray,
    CompactBytes,
    CompactString,
    Int8,
    Int16,
    Int32,
    Schema,
    TaggedFields,
)

SCRAM_ITERATIONS = 8192  # Kafka's default is 4096; its maximum is 16384


class ResourceType(enum.IntEnum):
    UNKNOWN = 0
    ANY = 1
    TOPIC = 2
    GROUP = 3
    CLUSTER = 4
    TRANSACTIONAL_ID = 5
    DELEGATION_TOKEN = 6
    USER = 7


class PatternType(enum.IntEnum):
    UNKNOWN = 0
    ANY = 1
    MATCH = 2
    LITERAL = 3
    PREFIXED = 4


class Operation(enum.IntEnum):
    UNKNOWN = 0
    ANY = 1
    ALL = 2
    READ = 3
    WRITE = 4
    CREATE = 5
    DELETE = 6
    ALTER = 7
    DESCRIBE = 8
    CLUSTER_ACTION = 9
    DESCRIBE_CONFIGS = 10
    ALTER_CONFIGS = 11
    IDEMPOTENT_WRITE = 12
    CREATE_TOKENS = 13
    DESCRIBE_TOKENS = 14


class Permission(enum.IntEnum):
    ANY = 1
    DENY = 2
    ALLOW = 3


CLUSTER = "kafka-cluster"  # the one name a CLUSTER resource has


@dataclass(frozen=True, order=True)
class AclBinding:
    """One ALLOW rule: ``principal`` may do ``operation`` on the named resource(s)."""

    principal: str  # "User:<name>"
    resource_type: ResourceType
    resource_name: str
    pattern: PatternType
    operation: Operation

    def wire(self) -> tuple[int, str, int, str, str, int, int]:
        return (
            self.resource_type,
            self.resource_name,
            self.pattern,
            self.principal,
            "*",
            self.operation,
            Permission.ALLOW,
        )

    def __str__(self) -> str:
        pattern = "*" if self.pattern is PatternType.PREFIXED else ""
        resource = f"{self.resource_type.name}:{self.resource_name}{pattern}"
        return f"{self.principal} {self.operation.name} {resource}"


class KafkaAdminError(RuntimeError):
    """The broker refused a security administration request."""

    def __init__(self, action: str, errors: list[str], codes: frozenset[int] = frozenset()) -> None:
        super().__init__(f"Kafka refused to {action}: " + "; ".join(errors))
        self.errors = errors
        self.codes = codes  # Kafka's error codes, for callers that expect one of them


RESOURCE_NOT_FOUND = 91  # aiokafka has no class for it (for_code gives UnknownError)


def _refusal(code: int, message: str | None) -> str:
    name = "ResourceNotFound" if code == RESOURCE_NOT_FOUND else for_code(code).__name__
    return f"{name}: {message or 'no detail'}"


# --- AlterUserScramCredentials v0 (API key 51, flexible) --------------------------


class _AlterScramResponse(Response):  # type: ignore[misc]
    API_KEY = 51
    API_VERSION = 0
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "results",
            CompactArray(
                ("user", CompactString("utf-8")),
                ("error_code", Int16),
                ("error_message", CompactString("utf-8")),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class _AlterScramRequestStruct(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = 51
    API_VERSION = 0
    RESPONSE_TYPE = _AlterScramResponse
    SCHEMA = Schema(
        (
            "deletions",
            CompactArray(("name", CompactString("utf-8")), ("mechanism", Int8), ("tags", TaggedFields)),
        ),
        (
            "upsertions",
            CompactArray(
                ("name", CompactString("utf-8")),
                ("mechanism", Int8),
                ("iterations", Int32),
                ("salt", CompactBytes),
                ("salted_password", CompactBytes),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class _AlterScram(Request[_AlterScramRequestStruct]):  # type: ignore[misc]
    API_KEY = 51

    def __init__(self, deletions: list[tuple[Any, ...]], upsertions: list[tuple[Any, ...]]) -> None:
        self.deletions = deletions
        self.upsertions = upsertions

    def build(self, request_struct_class: type[_AlterScramRequestStruct]) -> _AlterScramRequestStruct:
        return request_struct_class(self.deletions, self.upsertions, {})


SCRAM_SHA_512 = 2  # the mechanism's number in AlterUserScramCredentials


def salted_password(password: str, salt: bytes, iterations: int = SCRAM_ITERATIONS) -> bytes:
    """SCRAM's SaltedPassword for SHA-512 (RFC 5802: Hi() is PBKDF2 with HMAC)."""
    return hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)


def scram_record(user: str, password: str) -> str:
    """A salted SCRAM-SHA-512 credential in kafka-storage's ``--add-scram`` form, so the
    password itself appears in no command line."""
    salt = secrets.token_bytes(32)
    salted = base64.b64encode(salted_password(password, salt)).decode()
    return (
        f"SCRAM-SHA-512=[name={user},iterations={SCRAM_ITERATIONS},"
        f'salt="{base64.b64encode(salt).decode()}",saltedpassword="{salted}"]'
    )


def new_password() -> str:
    return secrets.token_urlsafe(32)


async def set_scram_password(client: AIOKafkaAdminClient, user: str, password: str) -> None:
    """Create or replace ``user``'s SCRAM-SHA-512 credential."""
    salt = secrets.token_bytes(32)
    upsert: tuple[Any, ...] = (
        user,
        SCRAM_SHA_512,
        SCRAM_ITERATIONS,
        salt,
        salted_password(password, salt),
        {},
    )
    await _alter_scram(client, [], [upsert], f"set the SCRAM credential of {user}")


async def delete_scram_credential(client: AIOKafkaAdminClient, user: str) -> bool:
    """Remove ``user``'s credential; False if there was none."""
    try:
        await _alter_scram(client, [(user, SCRAM_SHA_512, {})], [], f"delete the SCRAM credential of {user}")
    except KafkaAdminError as exc:
        if exc.codes == {RESOURCE_NOT_FOUND}:
            return False
        raise
    return True


async def _alter_scram(
    client: AIOKafkaAdminClient,
    deletions: list[tuple[Any, ...]],
    upsertions: list[tuple[Any, ...]],
    action: str,
) -> None:
    # aiokafka keeps its request plumbing private; this is the admin client's own path.
    response = await client._send_request(_AlterScram(deletions, upsertions))
    refused = [(code, message) for _, code, message, _ in response.results if code != 0]
    if refused:
        raise KafkaAdminError(action, [_refusal(*r) for r in refused], frozenset(c for c, _ in refused))


# --- ACLs --------------------------------------------------------------------------


class _CreateAcls(Request[CreateAclsRequest_v1]):  # type: ignore[misc]
    API_KEY = 30

    def __init__(self, creations: list[tuple[Any, ...]]) -> None:
        self.creations = creations

    def build(self, request_struct_class: type[CreateAclsRequest_v1]) -> CreateAclsRequest_v1:
        return request_struct_class(self.creations)


class _DeleteAcls(Request[DeleteAclsRequest_v1]):  # type: ignore[misc]
    API_KEY = 31

    def __init__(self, filters: list[tuple[Any, ...]]) -> None:
        self.filters = filters

    def build(self, request_struct_class: type[DeleteAclsRequest_v1]) -> DeleteAclsRequest_v1:
        return request_struct_class(self.filters)


class _DescribeAcls(Request[DescribeAclsRequest_v1]):  # type: ignore[misc]
    API_KEY = 29

    def __init__(self, principal: str | None) -> None:
        self.principal = principal

    def build(self, request_struct_class: type[DescribeAclsRequest_v1]) -> DescribeAclsRequest_v1:
        return request_struct_class(
            ResourceType.ANY, None, PatternType.ANY, self.principal, None, Operation.ANY, Permission.ANY
        )


async def create_acls(client: AIOKafkaAdminClient, bindings: Iterable[AclBinding]) -> None:
    wanted = sorted(set(bindings))
    if not wanted:
        return
    response = await client._send_request(_CreateAcls([binding.wire() for binding in wanted]))
    errors = [
        f"{binding}: {_refusal(code, message)}"
        for binding, (code, message) in zip(wanted, response.creation_responses, strict=True)
        if code != 0
    ]
    if errors:
        raise KafkaAdminError("create ACLs", errors)


async def delete_acls(client: AIOKafkaAdminClient, principal: str) -> int:
    """Remove every ALLOW rule naming ``principal``; return how many were removed."""
    # Only ALLOW rules: a DENY an administrator added stays.
    match_all = (ResourceType.ANY, None, PatternType.ANY, principal, None, Operation.ANY, Permission.ALLOW)
    response = await client._send_request(_DeleteAcls([match_all]))
    errors = [_refusal(code, message) for code, message, _ in response.filter_responses if code != 0]
    if errors:
        raise KafkaAdminError(f"delete the ACLs of {principal}", errors)
    return sum(len(matching) for _, _, matching in response.filter_responses)


async def describe_acls(client: AIOKafkaAdminClient, principal: str | None = None) -> list[AclBinding]:
    """The ALLOW rules the cluster holds, for one principal or for all."""
    response = await client._send_request(_DescribeAcls(principal))
    if response.error_code != 0:
        raise KafkaAdminError("describe ACLs", [_refusal(response.error_code, response.error_message)])
    found = []
    for resource_type, resource_name, pattern, acls in response.resources:
        for acl_principal, _host, operation, permission in acls:
            if permission != Permission.ALLOW:
                continue
            found.append(
                AclBinding(
                    acl_principal,
                    ResourceType(resource_type),
                    resource_name,
                    PatternType(pattern),
                    Operation(operation),
                )
            )
    return sorted(found)
