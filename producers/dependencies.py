"""What the intake's handlers take from the app serving the request.

The handlers (the JSON API in ``producers.intake``, the registrars' pages in
``producers.web.routes``) are module-level functions on ``APIRouter``s; they
reach the running ``Intake`` through ``Depends``, never through a closure, so a
router works on any app whose ``state.intake`` is set: ``create_app`` sets it at
start, and a test may set it on a bare FastAPI app.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from producers.accept import Intake


def running_intake(request: Request) -> Intake:
    """The app's ``Intake``: its settings, database pool and signers."""
    intake: Intake = request.app.state.intake
    return intake


RunningIntake = Annotated[Intake, Depends(running_intake)]
