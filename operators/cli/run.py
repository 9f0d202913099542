"""`tuo run` and `tuo demo`: the bus's services until Ctrl-C, and the demo that starts
everything, submits events and shows each agency's receipts."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from devstack import StackError
from devstack.demo import demo_submissions, register_demo_interest, seed_agency_records, seed_demo_registrar
from operators.cli.database import prepare
from operators.cli.shared import clear_errors, command_settings, console, fail
from operators.cli.stack import local_stack
from operators.cli.status import print_event_status
from operators.demo_webhook import delivered_by_webhook, start_demo_webhook_agency, stop_demo_webhook_agency
from operators.processes import child_process, die_with_parent
from operators.services import COMPONENTS, RunningBus, at_startup, start_bus, supervise
from producers import accounts
from runtime.database import migrate, open_pool
from runtime.logging import configure_logging
from runtime.settings import Settings, load_settings
from schemas.validation import today_in_the_uk


def run_command(
    components: Annotated[
        list[str] | None,
        typer.Argument(help=f"Which components to run (default all): {', '.join(COMPONENTS)}"),
    ] = None,
) -> None:
    """Run the bus's services until Ctrl-C."""
    die_with_parent()  # a child of another `tuo run` stops with it
    chosen = components or list(COMPONENTS)
    unknown = sorted(set(chosen) - set(COMPONENTS))
    if unknown:
        raise fail(f"unknown component {', '.join(unknown)}; choose from {', '.join(COMPONENTS)}")
    with clear_errors():
        asyncio.run(_run(command_settings(), chosen, demo=False))


class DemoRefused(RuntimeError):
    """The intake service refused one of the demo's own events."""


def demo_command(
    exit_after_demo: Annotated[
        bool, typer.Option("--exit", help="Stop after printing the receipts instead of serving.")
    ] = False,
) -> None:
    """Start the stack and the bus, submit demo events, print each agency's receipts,
    and keep serving until Ctrl-C; then stop everything this command started."""
    settings = load_settings()
    log_file = settings.state_dir / "bus.log"
    configure_logging(settings, log_file)
    stack = local_stack(settings)
    already_running = stack.status().running
    started = time.monotonic()
    try:
        with console.status("Starting the local stack (first run downloads Kafka)…"):
            stack.up()
        console.print(f"Local stack ready in {time.monotonic() - started:.1f}s; bus logs in {log_file}")
        settings = load_settings()
        asyncio.run(prepare(settings))
        asyncio.run(_run(settings, list(COMPONENTS), demo=True, exit_after_demo=exit_after_demo))
    except (StackError, DemoRefused) as exc:
        raise fail(str(exc)) from exc
    finally:
        if not already_running:
            with console.status("Stopping the local stack…"):
                stack.down()
            console.print("Local stack stopped; data kept. `tuo stack purge` wipes it.")


async def _run(
    settings: Settings, components: list[str], *, demo: bool, exit_after_demo: bool = False
) -> None:
    pool = await at_startup("postgresql", lambda: open_pool(settings, reset="locks"))
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_requested.set)
    try:
        await at_startup("database migrations", lambda: migrate(pool, settings))
        here, apart = placement(components) if settings.process_per_component else (components, [])
        webhook = await start_demo_webhook_agency(settings, pool) if demo else None
        if webhook is not None:
            settings = settings.model_copy(update={"webhook_cafile": webhook.ca_file})
        bus = await start_bus(settings, pool, here)
        _start_children(settings, bus, here, apart, log_file=settings.state_dir / "bus.log" if demo else None)
        try:
            base = f"http://{settings.http_host}:{bus.http_port}"
            where = f"; intake at {base}/docs" if bus.http_port is not None else ""
            console.print(f"Bus running: {', '.join(components)}{where}")
            if demo:
                sign_in = await seed_demo_registrar(pool, settings.state_dir)
                await seed_agency_records(pool, today_in_the_uk())
                await register_demo_interest(pool, settings.require_pseudonym_key(), today_in_the_uk())
                token = await accounts.issue_token(pool, "leeds", "registrar", "demo", timedelta(hours=1))
                if webhook is not None:
                    webhook.receipts_to(base)
                await _submit_demo(base, token)
                if webhook is not None:
                    delivered = await delivered_by_webhook(pool, webhook.agency)
                    console.print(
                        f"{webhook.agency} is told by webhook, at {webhook.url} (its reference receiver):"
                        f" {delivered} event(s) delivered; see `tuo webhooks log {webhook.agency}`"
                    )
                console.print(
                    f"Registrars' forms: {base}/sign-in — user [bold]{sign_in.username}[/],"
                    f" password in {sign_in.credentials_file}"
                )
                if settings.dev_idp_port is not None:
                    console.print(
                        f"Citizens' pages: {base}/citizen — sign in at the development identity"
                        " provider as Jo Citizen, Chris Example or Amara Okafor"
                    )
            if not (demo and exit_after_demo):
                console.print("Serving until Ctrl-C.")
                await stop_requested.wait()
        finally:
            with console.status("Stopping the bus…"):
                await bus.shutdown()
                if webhook is not None and not await stop_demo_webhook_agency(pool, webhook):
                    console.print(
                        f"{webhook.agency} keeps its webhook endpoint: events are still to deliver."
                    )
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await pool.close()


def placement(components: list[str]) -> tuple[list[str], list[str]]:
    """With ``TUO_PROCESS_PER_COMPONENT``: (the components this process runs, those that
    each run in a child process of its own). One component runs here; of several, intake
    (and the development identity provider and metrics that go with this process) stays
    here and each other one is a child, so a burst of CPU in one (a router's batch) never
    stalls another's I/O."""
    if len(components) == 1:
        return components, []
    return [c for c in components if c == "intake"], [c for c in components if c != "intake"]


def child_env(settings: Settings) -> dict[str, str]:
    """The environment of a child: this one's, with each router child only itself, and a
    metrics port of its own (any free one: it logs which) when this process serves one."""
    env = {**os.environ, "TUO_ROUTER_PROCESSES": "1"}
    if settings.metrics_port is not None:
        env["TUO_METRICS_PORT"] = "0"
    return env


def _start_children(
    settings: Settings, bus: RunningBus, here: list[str], apart: list[str], log_file: Path | None
) -> None:
    """Start the ``apart`` components as children, supervised as the bus's own tasks
    (restarted with backoff if one stops; stopped with the bus). The router runs in
    ``TUO_ROUTER_PROCESSES`` processes in all, in its one consumer group: here and in
    children when it runs here, else all in children. Intake, when it runs here, runs
    in ``TUO_INTAKE_PROCESSES`` in all, on this one's port."""
    env = child_env(settings)
    wanted = [(c, settings.router_processes if c == "router" else 1, env) for c in apart]
    if "router" in here:
        wanted.append(("router", settings.router_processes - 1, env))
    if "intake" in here and bus.http_port is not None:
        wanted.append(("intake", settings.intake_processes - 1, intake_child_env(env, bus.http_port)))
    for component, copies, its_env in wanted:
        first = 2 if component in here else 1
        for n in range(first, first + copies):
            name = component if (n, copies) == (1, 1) else f"{component}-{n}"
            bus.tasks.append(
                asyncio.create_task(
                    supervise(name, child_process(component, its_env, log_file), bus.stop), name=name
                )
            )


def intake_child_env(env: dict[str, str], port: int) -> dict[str, str]:
    """An added intake process: on the first one's port (any free one it was given), one
    process itself, without a second development identity provider."""
    return {**env, "TUO_INTAKE_PROCESSES": "1", "TUO_HTTP_REUSE_PORT": "true", "TUO_HTTP_PORT": str(port)}


async def _submit_demo(base: str, token: str, wait_seconds: float = 60.0) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=base, timeout=10, headers=headers) as client:
        references = []
        submissions = list(demo_submissions(today_in_the_uk()))
        for path, body in submissions:
            response = await client.post(path, json=body)
            if response.status_code == 409 and "existing_reference" in response.text:
                # A demo run on data kept from an earlier one: the same death and birth are
                # already registered (a person dies once); show those instead.
                references.append(response.json()["existing_reference"])
                continue
            if response.status_code not in (200, 201):
                raise DemoRefused(f"intake refused a demo event: {response.text}")
            references.append(response.json()["reference"])
        console.print(f"Submitted {len(references)} demo events: {', '.join(references)}")
        deadline = time.monotonic() + wait_seconds
        for reference in references:
            while True:
                found = (await client.get(f"/v1/events/{reference}")).json()
                if _settled(found) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            print_event_status(found)
            console.print(f"  {base}/v1/events/{reference}")
        for (path, body), reference in zip(submissions, references, strict=True):
            if path == "/v1/death-registrations":  # what the informant was given, to try
                born = date.fromisoformat(body["deceased"]["date_of_birth"])
                console.print(
                    f"Informant's journey: {base}/tell-us-once — reference [bold]{reference}[/],"
                    f" date of birth {born.day} {born.month} {born.year}"
                )


def _settled(found: dict[str, Any]) -> bool:
    agencies = found.get("agencies") or []
    return bool(agencies) and all(a["receipt"] is not None for a in agencies if a["decision"] == "delivered")
