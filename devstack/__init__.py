"""For development and tests: the local stack (a real Kafka broker and a real PostgreSQL
server on loopback), the development identity provider for citizens' sign-in
(``dev_idp``) and the demo data (``demo``).

The local stack:

Kafka is assembled from Maven Central jars and runs as a single-node KRaft
broker, or (``tuo stack up --brokers 3``) as a three-node cluster that keeps
accepting writes with one node down; PostgreSQL runs as a throwaway cluster made with ``initdb``. Both keep
their data, logs and chosen ports under one state directory, so stopping and
starting keeps the data and purging wipes it.
"""

from devstack.local import LocalStack, StackError, StackStatus

__all__ = ["LocalStack", "StackError", "StackStatus"]
