"""Schemathesis generates requests from the intake service's own OpenAPI
document — valid, invalid and hostile — and no response may be a 5xx."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import httpx
import pytest

from operators.services import RunningBus
from tests.support import death_registration

pytestmark = pytest.mark.integration

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


async def test_no_generated_request_makes_the_intake_api_fail_with_a_5xx(
    bus: RunningBus, intake: httpx.AsyncClient, registrar_token: str, tmp_path: Path
) -> None:
    base = f"http://127.0.0.1:{bus.http_port}"
    # A real reference, so status, correction and void requests reach past the 404.
    reference = (await intake.post("/v1/death-registrations", json=death_registration())).json()["reference"]
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        "[parameters]\n"
        f'"path.reference" = "{reference}"\n'
        '"path.subject" = "DeathRegistered-value"\n'
        '"path.schema_id" = 2\n'
    )
    # A subprocess, so the bus keeps serving on this event loop while schemathesis runs.
    process = await asyncio.create_subprocess_exec(
        str(SCHEMATHESIS),
        "--config-file",
        str(config),
        "run",
        f"{base}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--header",
        f"Authorization: Bearer {registrar_token}",
        "--max-examples",
        "40",
        "--seed",
        "20261121",
        "--workers",
        "2",
        "--request-timeout",
        "10",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,  # schemathesis keeps a cache in its working directory
        env={"PATH": "/usr/bin:/bin", "SCHEMATHESIS_HOOKS": "", "NO_COLOR": "1"},
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=600)
    text = output.decode(errors="replace")
    print(text)
    assert process.returncode == 0, f"schemathesis found failures:\n{text[-6000:]}"
    selected = re.search(r"Operations:\s+(\d+) selected / (\d+) total", text)
    tested = re.search(r"Tested:\s+(\d+)", text)
    assert selected and tested, "schemathesis did not report what it tested"
    assert int(tested.group(1)) == int(selected.group(2)) >= 10, "every operation in the document was tried"
    cases = re.search(r"(\d+) generated, (\d+) passed", text)
    assert cases and cases.group(1) == cases.group(2) and int(cases.group(1)) > 500, "thousands of cases ran"
