"""The demo's webhook agency: Leeds City Council told by webhook, as a council that
cannot run a Kafka client would be (docs/agencies.md, "Without Kafka").

``start_demo_webhook_agency``, before the bus starts:

1. makes a local CA and a certificate for 127.0.0.1 (in the state directory);
2. points the council's webhook endpoint at a port it has bound (its Standard Webhooks
   secret is made once and kept, sealed, like any agency's);
3. gives the council an OAuth2 client for its receipts (``receipts:write`` only);
4. serves the reference receiver (``consumers.webhook_agency``) on that port, over
   HTTPS, with the council's reference handler.

The bus started after it runs a webhook bridge for the council instead of its Kafka
consumer, and trusts the demo's CA (``TUO_WEBHOOK_CAFILE``, set for the bus's child
processes too). ``stop_demo_webhook_agency`` stops the receiver, revokes the client and,
when nothing is left to deliver, removes the endpoint again, so that a later `tuo run`
tells the council over Kafka as before.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import uvicorn

from consumers.agencies import handler_for
from consumers.agency_api import create_client, revoke_client
from consumers.webhook_agency import ReceiptClient, create_receiver
from consumers.webhooks import endpoint_of, set_endpoint
from devstack.certificates import loopback_server_tls
from devstack.dev_idp import bind_loopback
from operators.services import serve
from runtime.keyring import KeyRing
from runtime.sealing import PayloadSealer
from runtime.settings import Settings

DEMO_WEBHOOK_AGENCY = "council-leeds"


@dataclass
class DemoWebhookAgency:
    agency: str
    url: str
    ca_file: Path
    client_id: str
    receipts: ReceiptClient
    stop: asyncio.Event
    serving: asyncio.Task[None]

    def receipts_to(self, base_url: str) -> None:
        """Where the bus listens, once it does: the receipts go there."""
        self.receipts.http.base_url = httpx.URL(base_url)


async def start_demo_webhook_agency(settings: Settings, pool: asyncpg.Pool) -> DemoWebhookAgency:
    agency = DEMO_WEBHOOK_AGENCY
    directory = settings.state_dir / "webhook-agency"
    directory.mkdir(parents=True, exist_ok=True)
    tls = loopback_server_tls(directory, "webhook-agency")
    sock = bind_loopback()
    url = f"https://127.0.0.1:{sock.getsockname()[1]}/events"
    sealer = PayloadSealer.from_settings(settings)
    await set_endpoint(pool, sealer, agency, url, by="demo")
    endpoint = await endpoint_of(pool, sealer, agency)
    assert endpoint is not None
    client = await create_client(pool, agency, by="demo", scopes=("receipts:write",))
    receipts = ReceiptClient("http://127.0.0.1", client.client_id, client.client_secret)
    receiver = create_receiver(
        pool,
        agency,
        endpoint.secrets,
        handler_for(agency),
        keys=KeyRing.from_database(pool),
        consent_keys=KeyRing.consent_from_database(pool),
        receipts=receipts,
    )
    config = uvicorn.Config(
        receiver,
        ssl_certfile=str(tls.certificate_file),
        ssl_keyfile=str(tls.key_file),
        log_level="warning",
        access_log=False,
        lifespan="off",
    )
    stop = asyncio.Event()
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    serving = asyncio.create_task(serve(config, "webhook-agency", stop, ready, [sock]))
    waiters: list[asyncio.Future[object]] = [ready, serving]  # type: ignore[list-item]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    if not ready.done():
        serving.result()  # why it could not listen
    os.environ["TUO_WEBHOOK_CAFILE"] = str(tls.ca_file)  # for the bus's children
    return DemoWebhookAgency(agency, url, tls.ca_file, client.client_id, receipts, stop, serving)


async def stop_demo_webhook_agency(pool: asyncpg.Pool, demo: DemoWebhookAgency) -> bool:
    """Stop the receiver; whether the endpoint was removed (not while anything waits)."""
    demo.stop.set()
    await demo.serving
    await demo.receipts.aclose()
    await revoke_client(pool, demo.client_id, by="demo")
    removed: str = await pool.execute(
        "DELETE FROM webhook_endpoint e WHERE agency = $1 AND NOT EXISTS"
        " (SELECT 1 FROM webhook_delivery d WHERE d.agency = e.agency AND d.status = 'pending')",
        demo.agency,
    )
    return removed.endswith(" 1")


async def delivered_by_webhook(pool: asyncpg.Pool, agency: str, wait_seconds: float = 15.0) -> int:
    """How many of the agency's events its endpoint has taken (answered 2xx), once none is
    pending (or after ``wait_seconds``). The receiver posts its receipt before it answers,
    so the bridge may record the answer a moment after the receipt is in."""
    deadline = time.monotonic() + wait_seconds
    while True:
        row = await pool.fetchrow(
            "SELECT count(*) FILTER (WHERE status = 'delivered') AS delivered,"
            "       count(*) FILTER (WHERE status = 'pending') AS pending"
            "  FROM webhook_delivery WHERE agency = $1",
            agency,
        )
        if row["pending"] == 0 or time.monotonic() > deadline:
            delivered: int = row["delivered"]
            return delivered
        await asyncio.sleep(0.2)
