"""Consumers: the agency SDK and the reference agencies.

An agency's code needs one import, ``from consumers import AgencyConsumer, …``
(see docs/agencies.md); the modules behind it may move.
"""

from consumers.receipts import Receipt
from consumers.sdk import AgencyConsumer, BatchHandler, DeliveredEvent, Handler, RejectEvent, subject_of
from runtime.keyring import KeyRing

__all__ = [
    "AgencyConsumer",
    "BatchHandler",
    "DeliveredEvent",
    "Handler",
    "KeyRing",
    "Receipt",
    "RejectEvent",
    "subject_of",
]
