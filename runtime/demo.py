"""Demo events for the local stack: one of each life event, as a registrar would
submit them over the intake API. The people are fictional."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any


def demo_submissions(today: date) -> list[tuple[str, dict[str, Any]]]:
    office = "Leeds Register Office"
    informant = {"name": "Alex Example", "relationship": "son"}
    address = {"lines": ["1 Example Street"], "town": "Leeds", "postcode": "LS1 1AA", "uprn": "72000001"}
    return [
        (
            "/v1/death-registrations",
            {
                "informant": informant,
                "channel": "desk",
                "registration_office": office,
                "deceased": {
                    "given_names": "Pat",
                    "family_name": "Example",
                    "date_of_birth": "1941-03-02",
                    "nino": "AB123456C",
                },
                "date_of_death": (today - timedelta(days=3)).isoformat(),
                "place_of_death": "Leeds General Infirmary",
                "last_address": address,
                "surviving_partner": {
                    "given_names": "Chris",
                    "family_name": "Example",
                    "relationship": "wife",
                    "nino": "CE112233D",
                },
                "executor": {"given_names": "Alex", "family_name": "Example", "relationship": "son"},
                "consents": [{"agency": "dvla", "choice": "given"}, {"agency": "hmpo", "choice": "refused"}],
            },
        ),
        (
            "/v1/birth-registrations",
            {
                "informant": {"name": "Sam Sample", "relationship": "mother"},
                "channel": "desk",
                "registration_office": office,
                "child": {
                    "given_names": "Robin",
                    "family_name": "Sample",
                    "date_of_birth": (today - timedelta(days=10)).isoformat(),
                },
                "place_of_birth": "St James's Hospital, Leeds",
                "registration_district": "Leeds",
                "parents": [{"given_names": "Sam", "family_name": "Sample", "relationship": "mother"}],
                "home_address": {"lines": ["2 Sample Road"], "town": "Leeds", "postcode": "LS2 2BB"},
            },
        ),
        (
            "/v1/address-changes",
            {
                "informant": {"name": "Jo Citizen", "relationship": "self"},
                "channel": "online",
                "registration_office": "Online service",
                "person": {"given_names": "Jo", "family_name": "Citizen", "nino": "CE654321A"},
                "old_address": {"lines": ["3 Old Lane"], "town": "York", "postcode": "YO1 7HH"},
                "new_address": {"lines": ["4 New Street"], "town": "Leeds", "postcode": "LS3 3BB"},
                "effective_date": (today - timedelta(days=1)).isoformat(),
                "consents": [
                    {"agency": "dvla", "choice": "given"},
                    {"agency": "council-leeds", "choice": "given"},
                ],
            },
        ),
    ]
