"""The routing rule as a pure function, with properties proved by hypothesis."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from router.rules import Outcome, RoutableEvent, Subscription, decide

NOW = datetime(2026, 11, 21, 12, tzinfo=UTC)
EVENT = RoutableEvent(event_id="e-1", event_type="DeathRegistered", subject_id="s-1")


def sub(agency: str, basis: str = "statutory", **changes: object) -> Subscription:
    fields: dict[str, object] = {
        "agency": agency,
        "event_type": "DeathRegistered",
        "legal_basis": basis,
        "statute": "Some Act 1992 s.1" if basis == "statutory" else None,
        "valid_from": None,
        "valid_to": None,
        "status": "active",
    }
    fields.update(changes)
    return Subscription(**fields)  # type: ignore[arg-type]


def outcomes(subscriptions: list[Subscription], consent: dict[str, str]) -> dict[str, Outcome]:
    return {d.agency: d.outcome for d in decide(EVENT, subscriptions, consent, NOW)}  # type: ignore[arg-type]


def test_statutory_subscription_delivers_without_consent() -> None:
    assert outcomes([sub("dwp")], {}) == {"dwp": Outcome.DELIVERED}


def test_consent_subscription_delivers_only_when_consent_is_given() -> None:
    subs = [sub("dvla", "consent")]
    assert outcomes(subs, {"dvla": "given"}) == {"dvla": Outcome.DELIVERED}
    for choice in ("refused", "withdrawn"):
        assert outcomes(subs, {"dvla": choice}) == {"dvla": Outcome.WITHHELD_NO_CONSENT}
    assert outcomes(subs, {}) == {"dvla": Outcome.WITHHELD_NO_CONSENT}


def test_suspended_expired_or_future_subscriptions_do_not_deliver() -> None:
    for stale in (
        sub("dwp", status="suspended"),
        sub("dwp", valid_to=NOW - timedelta(seconds=1)),
        sub("dwp", valid_from=NOW + timedelta(days=1)),
    ):
        assert outcomes([stale], {}) == {"dwp": Outcome.WITHHELD_NO_SUBSCRIPTION}


def test_agency_subscribed_to_other_types_is_told_it_was_withheld() -> None:
    other = sub("council-leeds", event_type="AddressChanged")
    decision = decide(EVENT, [other], {}, NOW)
    assert [(d.agency, d.outcome, d.legal_basis) for d in decision] == [
        ("council-leeds", Outcome.WITHHELD_NO_SUBSCRIPTION, None)
    ]


def test_statutory_decision_cites_the_statute() -> None:
    [decision] = decide(EVENT, [sub("hmrc", statute="Registration Service Act 1953 s.19AA")], {}, NOW)
    assert decision.legal_basis == "statutory: Registration Service Act 1953 s.19AA"


agencies = st.sampled_from(["hmrc", "dwp", "dvla", "hmpo", "council-a"])
subscriptions = st.builds(
    Subscription,
    agency=agencies,
    event_type=st.sampled_from(["DeathRegistered", "BirthRegistered", "AddressChanged"]),
    legal_basis=st.sampled_from(["statutory", "consent"]),
    statute=st.just("An Act"),
    valid_from=st.one_of(st.none(), st.datetimes(timezones=st.just(UTC))),
    valid_to=st.one_of(st.none(), st.datetimes(timezones=st.just(UTC))),
    status=st.sampled_from(["active", "suspended"]),
)
consents = st.dictionaries(agencies, st.sampled_from(["given", "refused", "withdrawn"]))


@given(st.lists(subscriptions, max_size=12), consents)
def test_nothing_is_delivered_without_an_active_valid_subscription_and_a_basis(
    subs: list[Subscription], consent: dict[str, str]
) -> None:
    decisions = decide(EVENT, subs, consent, NOW)  # type: ignore[arg-type]
    assert len({d.agency for d in decisions}) == len(decisions), "one decision per agency"
    assert {d.agency for d in decisions} == {s.agency for s in subs}
    for decision in decisions:
        if not decision.delivers:
            continue
        covering = [
            s
            for s in subs
            if s.agency == decision.agency and s.event_type == EVENT.event_type and s.in_force(NOW)
        ]
        assert covering, f"{decision.agency} delivered without an active, valid subscription"
        assert any(s.legal_basis == "statutory" for s in covering) or consent.get(decision.agency) == "given"
