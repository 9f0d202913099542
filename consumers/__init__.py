"""Consumers: the agency SDK and the reference agencies.

An agency's code needs one import, ``from consumers import AgencyConsumer, …``
(see docs/agencies.md); the modules behind it may move.
"""

from consumers.sdk import AgencyConsumer, DeliveredEvent, Handler, Receipt, RejectEvent, subject_of
from runtime.keyring import KeyRing

__all__ = ["AgencyConsumer", "DeliveredEvent", "Handler", "KeyRing", "Receipt", "RejectEvent", "subject_of"]
