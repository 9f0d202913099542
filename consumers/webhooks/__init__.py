"""Webhooks: the bus delivering to agencies that cannot run Kafka.

``WebhookBridge`` (``bridge``) reads an agency's topic and POSTs each event to the
agency's HTTPS endpoint, signed with Standard Webhooks, with retries and a log of every
attempt; ``endpoints`` holds the endpoints, their secrets and the log's queries;
``requests`` turns a message into a request. A reference receiver for agencies is
``consumers.webhook_agency``.
"""

from consumers.webhooks.bridge import WebhookBridge
from consumers.webhooks.endpoints import Endpoint, endpoint_of, set_endpoint, webhook_agencies

__all__ = ["Endpoint", "WebhookBridge", "endpoint_of", "set_endpoint", "webhook_agencies"]
