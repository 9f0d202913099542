"""The one web service, composed: the registrars' intake (API and pages) and the
citizens' sign-in, consent pages, privacy notice, the public register of sharing
agreements, the public performance dashboard and the informants' journey, on one
origin. Producers and citizens never import each other; this is where they meet."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import asyncpg
from fastapi import FastAPI

from citizens.informants import RequestServices, install_informant_journey
from citizens.pages import install_citizen_pages
from citizens.performance import install_performance
from citizens.privacy import install_privacy_notice
from citizens.register import install_register
from citizens.signin import install_citizen_sign_in
from consumers.agency_api import install_agency_api
from producers import intake
from producers.accept import Intake
from producers.store import Recorded
from runtime.settings import Settings


def _through_intake(app: FastAPI) -> RequestServices:
    """The informant's requests, recorded by the intake that the app starts."""

    async def request_services(*args: Any, **kwargs: Any) -> Recorded:
        running: Intake = app.state.intake
        return await running.request_services(*args, **kwargs)

    return request_services


def create_app(settings: Settings, pool: asyncpg.Pool | None = None) -> FastAPI:
    def citizens(app: FastAPI) -> None:
        install_privacy_notice(app, lambda: app.state.intake.pool)
        install_register(app, lambda: app.state.intake.pool)  # every sharing agreement, public
        install_performance(  # the public dashboard
            app, lambda: app.state.intake.pool, timedelta(minutes=settings.receipt_deadline_minutes)
        )
        if pool is not None:
            install_informant_journey(app, settings, pool, _through_intake(app))
            install_agency_api(app, pool, settings)  # agencies on HTTPS: receipts and their feed
        if settings.oidc_issuer and pool is not None:
            install_citizen_sign_in(app, settings, pool)
            install_citizen_pages(app, settings, pool)

    return intake.create_app(settings, pool, also=[citizens])
