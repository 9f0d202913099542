"""`tuo access`: the Kafka ACLs of the bus's own components."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from operators.cli.shared import clear_errors, command_settings, console, fail
from runtime import access, kafka
from runtime.access import Principal
from runtime.kafka_admin import KafkaAdminError, describe_acls

access_app = typer.Typer(help="Kafka ACLs of the bus's components.", no_args_is_help=True)


@access_app.command("grant")
def access_grant() -> None:
    """Give each component (relay, router, tracker, operators' tooling) its ACLs for
    TUO_TOPIC_PREFIX. Run once per cluster, as a user allowed to alter the cluster;
    the local stack does it itself."""
    settings = command_settings()
    try:
        with clear_errors():
            asyncio.run(access.grant_components(settings))
    except (KafkaAdminError, access.NotInEffect) as exc:
        raise fail(str(exc)) from exc
    for component in Principal:
        rules = access.component_grants(component, settings.topic_prefix)
        console.print(f"{component}: {len(rules)} ACL rules")


@access_app.command("show")
def access_show(
    user: Annotated[str | None, typer.Argument(help="A Kafka user, e.g. agency-hmrc; default: all")] = None,
) -> None:
    """The ACL rules the cluster holds."""
    settings = command_settings()

    async def show() -> list[str]:
        client = kafka.admin(settings, principal=Principal.OPERATOR)
        await client.start()
        try:
            return [str(b) for b in await describe_acls(client, f"User:{user}" if user else None)]
        finally:
            await client.close()

    try:
        with clear_errors():
            rules = asyncio.run(show())
    except KafkaAdminError as exc:
        raise fail(str(exc)) from exc
    for rule in rules:
        console.print(rule)
    if not rules:
        console.print("No ACL rules" + (f" for {user}." if user else "."))
