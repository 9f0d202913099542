"""The routing rule as a pure function, with properties proved by hypothesis."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from router.rules import Condition, Outcome, PolicyBlock, RoutableEvent, Subscription, decide

NOW = datetime(2026, 11, 21, 12, tzinfo=UTC)
FIELDS = frozenset({"deceased", "date_of_death", "place_of_death", "last_address", "executor", "nino"})
EVENT = RoutableEvent(
    event_id="e-1",
    event_type="DeathRegistered",
    subject_id="s-1",
    fields=FIELDS,
    postcodes=frozenset({"LS7 3AB"}),
)


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
field_sets = st.one_of(st.none(), st.frozensets(st.sampled_from(sorted(FIELDS | {"unknown"}))))
conditions = st.builds(
    Condition, postcode_areas=st.frozensets(st.sampled_from(["LS", "LS7", "BD", "BD1", "YO"]))
)
subscriptions = st.builds(
    Subscription,
    fields=field_sets,
    condition=conditions,
    agency=agencies,
    event_type=st.sampled_from(["DeathRegistered", "BirthRegistered", "AddressChanged"]),
    legal_basis=st.sampled_from(["statutory", "consent"]),
    statute=st.just("An Act"),
    valid_from=st.one_of(st.none(), st.datetimes(timezones=st.just(UTC))),
    valid_to=st.one_of(st.none(), st.datetimes(timezones=st.just(UTC))),
    status=st.sampled_from(["active", "suspended"]),
)
consents = st.dictionaries(agencies, st.sampled_from(["given", "refused", "withdrawn"]))


policies = st.lists(
    st.builds(
        PolicyBlock,
        event_types=st.frozensets(st.sampled_from(["DeathRegistered", "BirthRegistered"]), min_size=1),
        agencies=st.frozensets(agencies, min_size=1),
        reason=st.just("policy"),
    ),
    max_size=2,
)


@given(st.lists(subscriptions, max_size=12), consents, policies)
def test_nothing_is_delivered_without_an_active_valid_subscription_and_a_basis(
    subs: list[Subscription], consent: dict[str, str], policy: list[PolicyBlock]
) -> None:
    decisions = decide(EVENT, subs, consent, NOW, policy)  # type: ignore[arg-type]
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


@given(st.lists(subscriptions, max_size=12), consents, policies)
def test_no_field_outside_the_subscription_is_ever_delivered(
    subs: list[Subscription], consent: dict[str, str], policy: list[PolicyBlock]
) -> None:
    for decision in decide(EVENT, subs, consent, NOW, policy):  # type: ignore[arg-type]
        granted = [s.fields for s in subs if s.agency == decision.agency and s.event_type == EVENT.event_type]
        if decision.delivers:
            assert any(g is None or decision.fields_delivered <= g for g in granted)
            assert decision.fields_delivered <= EVENT.fields
        else:
            assert decision.fields_delivered == frozenset()
        assert decision.fields_delivered | decision.fields_withheld == EVENT.fields
        assert not decision.fields_delivered & decision.fields_withheld


@given(st.lists(subscriptions, max_size=12), consents, policies)
def test_a_blocked_pair_never_receives_anything_whatever_the_subscriptions_say(
    subs: list[Subscription], consent: dict[str, str], policy: list[PolicyBlock]
) -> None:
    everyone_consents = {agency: "given" for agency in ("hmrc", "dwp", "dvla", "hmpo", "council-a")}
    for given_consent in (consent, everyone_consents):
        for decision in decide(EVENT, subs, given_consent, NOW, policy):  # type: ignore[arg-type]
            if any(block.blocks(EVENT.event_type, decision.agency) for block in policy):
                assert decision.outcome is Outcome.BLOCKED and not decision.delivers
                assert decision.legal_basis == "policy: policy"


def test_council_condition_covers_its_postcode_area_only() -> None:
    leeds = sub("council-leeds", condition=Condition.from_json({"postcode_areas": ["LS"]}))
    district = sub("council-x", condition=Condition.from_json({"postcode_areas": ["LS1"]}))
    outcomes_by = {d.agency: d.outcome for d in decide(EVENT, [leeds, district], {}, NOW)}
    assert outcomes_by["council-leeds"] is Outcome.DELIVERED, "LS7 3AB is in the LS area"
    assert outcomes_by["council-x"] is Outcome.WITHHELD_NO_SUBSCRIPTION, "LS7 is not district LS1"
    bradford = RoutableEvent("e-2", "DeathRegistered", "s-2", FIELDS, frozenset({"BD10 1AA"}))
    assert decide(bradford, [leeds], {}, NOW)[0].outcome is Outcome.WITHHELD_NO_SUBSCRIPTION
    lsx = RoutableEvent("e-3", "DeathRegistered", "s-3", FIELDS, frozenset({"LSX 1AA"}))
    assert decide(lsx, [leeds], {}, NOW)[0].outcome is Outcome.WITHHELD_NO_SUBSCRIPTION


def test_policy_block_beats_a_statutory_subscription() -> None:
    block = PolicyBlock(frozenset({"DeathRegistered"}), frozenset({"dwp"}), "never")
    [decision] = decide(EVENT, [sub("dwp")], {}, NOW, [block])
    assert (decision.outcome, decision.legal_basis) == (Outcome.BLOCKED, "policy: never")
