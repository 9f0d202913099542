"""The reference agencies: each applies the life events it is sent to its own
tables (``agency.*``, see ``runtime/migrations/0006_reference_agencies.sql``),
so the effect of an event can be seen.

- ``tax`` (hmrc): tax records, closed at death, readdressed on a move.
- ``pensions`` (dwp): pension awards, stopped at death with the overpayment.
- ``licensing`` (dvla): driving licences, cancelled at death, readdressed on a move.
- ``council`` (council-leeds, council-bradford): households, residents, the
  single-person discount and the electoral register.
- ``records``: creating those records, for the tests and the demo.

Every handler follows the same rules. An event it cannot apply (no matching
record, or a field it needs was withheld) is rejected with a reason in plain
English that carries no personal data, since the registrar and the citizen see
it. An event type the agency has no business with (a birth at DWP's pensions, a
correction) is applied with no effect: nothing it holds needs to change.
"""

from __future__ import annotations

from consumers.agencies import licensing, pensions, tax
from consumers.agencies.council import CouncilHandler
from consumers.reference import apply_life_event
from consumers.sdk import Handler

# Each council's local authorities (GSS codes): the addresses whose households it holds.
COUNCIL_AUTHORITIES: dict[str, frozenset[str]] = {
    "council-leeds": frozenset({"E08000035"}),
    "council-bradford": frozenset({"E08000032"}),
}
_NATIONAL: dict[str, Handler] = {
    "hmrc": tax.TAX,  # also applies a batch set-wise
    "dwp": pensions.PENSIONS,  # likewise
    "dvla": licensing.LICENSING,  # likewise
}


def handler_for(agency: str) -> Handler:
    """The reference handler for ``agency``; an agency without a model of its own
    (hmpo, say) accepts every life event without effect."""
    if agency in COUNCIL_AUTHORITIES:
        return CouncilHandler(agency, COUNCIL_AUTHORITIES[agency])
    return _NATIONAL.get(agency, apply_life_event)


__all__ = ["COUNCIL_AUTHORITIES", "handler_for"]
