"""Run the bus's long-running components in one process, each supervised.

A component that fails is logged and restarted after a short backoff (a fresh
Kafka client resumes from its last committed offsets), so one broken message
or a broker restart does not take the bus down.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import structlog
import uvicorn
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError, NodeNotReadyError, RequestTimedOutError

from citizens.emails import run_informant_emails
from citizens.signin import RelyingParty
from consumers.agencies import handler_for
from consumers.sdk import AgencyConsumer
from consumers.webhooks import WebhookBridge, webhook_agencies
from devstack.dev_idp import DevIdentityProvider, RegisteredClient, bind_loopback, serve_dev_idp
from operators.metrics_endpoint import metrics_app
from operators.web import create_app
from producers.relay import run_relay
from router import store as router_store
from router.service import run_router
from router.tracker import run_tracker
from runtime.access import Principal, agency_principal, credentials_file
from runtime.kafka import ensure_topics
from runtime.settings import Settings
from schemas.catalogue import CATALOGUE, activate
from schemas.registry_client import bind_to_registry

log = structlog.get_logger(__name__)

COMPONENTS = ("intake", "relay", "router", "agencies", "tracker")
RESTART_BACKOFF_SECONDS = (0.5, 1, 2, 5, 10)

Component = Callable[[asyncio.Event], Awaitable[None]]


async def supervise(name: str, component: Component, stop: asyncio.Event) -> None:
    """Run ``component`` until ``stop``, restarting it with backoff when it fails. Its
    log lines carry ``component`` (each task has its own context)."""
    structlog.contextvars.bind_contextvars(component=name)
    failures = 0
    while not stop.is_set():
        try:
            await component(stop)
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("component_failed", component=name)
            delay = RESTART_BACKOFF_SECONDS[min(failures, len(RESTART_BACKOFF_SECONDS) - 1)]
            failures += 1
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except TimeoutError:
                pass


STARTUP_PATIENCE_SECONDS = 300.0
# A server that is not there yet, or is starting or stopping; anything else (a wrong
# password, a missing ACL, a broken migration) fails at once.
UNAVAILABLE: tuple[type[Exception], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    KafkaConnectionError,
    NodeNotReadyError,
    KafkaTimeoutError,
    RequestTimedOutError,
)

T = TypeVar("T")


async def at_startup(what: str, attempt: Callable[[], Awaitable[T]]) -> T:
    """``attempt`` until it works, with the restart backoff, for up to five minutes: a
    component started while Kafka or PostgreSQL restarts waits for it instead of
    exiting (once running, ``supervise`` does the same)."""
    deadline = time.monotonic() + STARTUP_PATIENCE_SECONDS
    failures = 0
    while True:
        try:
            return await attempt()
        except UNAVAILABLE as exc:
            if time.monotonic() > deadline:
                raise
            delay = RESTART_BACKOFF_SECONDS[min(failures, len(RESTART_BACKOFF_SECONDS) - 1)]
            failures += 1
            log.warning("startup_waiting", what=what, error=type(exc).__name__, retry_in_seconds=delay)
            await asyncio.sleep(delay)


@dataclass
class RunningBus:
    stop: asyncio.Event
    tasks: list[asyncio.Task[None]]
    http_port: int | None
    metrics_port: int | None = None  # this process's Prometheus endpoint (TUO_METRICS_PORT)

    async def shutdown(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn that leaves signal handling to the process embedding it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def _serve_http(
    settings: Settings, pool: asyncpg.Pool, stop: asyncio.Event, ready: asyncio.Future[int]
) -> None:
    sockets = None
    if settings.http_reuse_port or settings.intake_processes > 1:  # intake processes share the port
        sockets = [
            _reusable_socket(settings.http_host, settings.http_port, first=not settings.http_reuse_port)
        ]
    config = uvicorn.Config(
        create_app(settings, pool),
        host=settings.http_host,
        port=settings.http_port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        proxy_headers=bool(settings.http_forwarded_allow_ips),
        forwarded_allow_ips=settings.http_forwarded_allow_ips or None,
    )
    await serve(config, "intake", stop, ready, sockets)


def _reusable_socket(host: str, port: int, *, first: bool) -> socket.socket:
    """A listening socket that the other intake processes bind too (SO_REUSEPORT: the
    kernel spreads new connections evenly among them, where one shared socket would let
    whichever accepts first take a whole burst). The ``first`` process makes sure nothing
    else listens there already, so a second bus on the port fails instead of sharing it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if first:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise RuntimeError(f"intake service could not listen on port {port}: {exc.strerror}") from exc
            port = probe.getsockname()[1]  # port 0: the free one found, then shared
    # IPPROTO_TCP named, or asyncio leaves Nagle on for its connections (40 ms stalls).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"intake service could not listen on port {port}: {exc.strerror}") from exc
    sock.set_inheritable(False)
    return sock


async def _serve_metrics(
    settings: Settings, pool: asyncpg.Pool, stop: asyncio.Event, ready: asyncio.Future[int]
) -> None:
    config = uvicorn.Config(
        metrics_app(pool),
        host=settings.metrics_host,
        port=settings.metrics_port or 0,
        log_level="warning",
        access_log=False,
        lifespan="off",
    )
    await serve(config, "metrics", stop, ready)


async def serve(
    config: uvicorn.Config,
    what: str,
    stop: asyncio.Event,
    ready: asyncio.Future[int],
    sockets: list[socket.socket] | None = None,
) -> None:
    """Serve ``config``'s app (on ``sockets``, else its host and port) until ``stop`` is set;
    ``ready`` gets the port once it listens."""
    structlog.contextvars.bind_contextvars(component=what)  # its requests' log lines too
    server = _EmbeddedServer(config)
    serving = asyncio.create_task(server.serve(sockets))
    while not server.started:
        if serving.done():
            await serving
            raise RuntimeError(f"{what} service could not listen on port {config.port}")
        await asyncio.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    if not ready.done():
        ready.set_result(port)
    log.info(f"{what}_listening", host=config.host, port=port)
    await stop.wait()
    server.should_exit = True
    await serving


Server = Callable[[Settings, asyncpg.Pool, asyncio.Event, asyncio.Future[int]], Coroutine[Any, Any, None]]


async def _listening(
    name: str,
    serve: Server,
    settings: Settings,
    pool: asyncpg.Pool,
    stop: asyncio.Event,
    tasks: list[asyncio.Task[None]],
) -> int:
    """Start an HTTP server as one of the bus's tasks; its port once it listens. If it
    cannot listen, everything started so far is stopped and the reason raised."""
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    serving = asyncio.create_task(serve(settings, pool, stop, ready), name=name)
    tasks.append(serving)
    waiters: list[asyncio.Future[object]] = [ready, serving]  # type: ignore[list-item]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    if not ready.done():
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        serving.result()
    return ready.result()


async def _reference_agencies(settings: Settings, pool: asyncpg.Pool, subscribed: list[str]) -> list[str]:
    """The subscribed agencies whose consumers this process can run: not suspended,
    and, on a secured cluster, with a password in the local credentials file."""
    suspended = {
        row["agency"]
        for row in await pool.fetch("SELECT agency FROM agency_account WHERE status = 'suspended'")
    }
    store = credentials_file(settings)
    passwords = store.read() if store is not None else {}
    runnable = []
    for agency in subscribed:
        if agency in suspended:
            continue
        if settings.kafka_security_protocol.startswith("SASL_") and agency_principal(agency) not in passwords:
            log.warning(
                "agency_consumer_not_started", agency=agency, reason="no Kafka credentials for it here"
            )
            continue
        runnable.append(agency)
    return runnable


async def _start_dev_idp(settings: Settings, stop: asyncio.Event) -> asyncio.Task[None]:
    """The development identity provider (test identities) the local stack's citizens
    sign in with, registered for this service's own client; never in production."""
    party = RelyingParty.from_settings(settings)
    sock = bind_loopback(settings.dev_idp_port or 0)
    provider = DevIdentityProvider(
        party.issuer,
        [RegisteredClient(party.client_id, party.client_secret, frozenset({party.redirect_url}))],
    )
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    serving = asyncio.create_task(serve_dev_idp(provider, sock, stop, ready), name="dev-idp")
    waiters: list[asyncio.Future[object]] = [ready, serving]  # type: ignore[list-item]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    if serving.done():
        await serving  # it could not start: say why
    return serving


async def start_bus(
    settings: Settings, pool: asyncpg.Pool, components: Sequence[str] = COMPONENTS
) -> RunningBus:
    """Create topics, then start the chosen components; returns once intake listens."""
    unknown = set(components) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components: {', '.join(sorted(unknown))}")
    if settings.schema_registry_url:
        activate(
            await bind_to_registry(
                settings.schema_registry_url, CATALOGUE, auth=settings.schema_registry_auth()
            )
        )
    agencies = await router_store.agencies(pool)
    operator = settings.kafka_credentials(Principal.OPERATOR)
    if not settings.kafka_security_protocol.startswith("SASL_") or (
        operator and operator[0] == Principal.OPERATOR
    ):
        # Only where this process may act as the operators' tooling (the local stack, an
        # operator's shell). A deployment that gives each component only its own password
        # creates the topics beforehand (`tuo agencies add`); the router makes new agencies'.
        await at_startup(
            "kafka topics", lambda: ensure_topics(settings, agencies, principal=Principal.OPERATOR)
        )
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    if settings.dev_idp_port is not None and "intake" in components and not settings.http_reuse_port:
        tasks.append(await _start_dev_idp(settings, stop))

    def add(name: str, component: Component) -> None:
        tasks.append(asyncio.create_task(supervise(name, component, stop), name=name))

    if "relay" in components:
        add("relay", lambda s: run_relay(settings, pool, s))
    if "router" in components:
        add("router", lambda s: run_router(settings, pool, s))
    if "agencies" in components:
        by_webhook = set(await webhook_agencies(pool))
        for agency in await _reference_agencies(settings, pool, agencies):
            if agency in by_webhook:  # the bus is its consumer, and POSTs to its endpoint
                add(f"webhooks:{agency}", WebhookBridge(settings, pool, agency).run)
                continue
            consumer = AgencyConsumer(settings, pool, agency, handler_for(agency))
            add(f"agency:{agency}", consumer.run)
    if "tracker" in components:
        add("tracker", lambda s: run_tracker(settings, pool, s))
        # Beside the receipts it waits on: the informants' confirmations by email.
        add("informant-emails", lambda s: run_informant_emails(settings, pool, s))
    http_port: int | None = None
    if "intake" in components:
        http_port = await _listening("intake", _serve_http, settings, pool, stop, tasks)
    metrics_port: int | None = None
    if settings.metrics_port is not None:
        metrics_port = await _listening("metrics", _serve_metrics, settings, pool, stop, tasks)
    return RunningBus(stop=stop, tasks=tasks, http_port=http_port, metrics_port=metrics_port)
