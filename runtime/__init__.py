"""Shared runtime plumbing for Tell Us Once.

Settings, Kafka and PostgreSQL client factories, SQL migrations, logging, the
local stack (Kafka from Maven Central, PostgreSQL from Debian) and the ``tuo``
command line. Components (producers, router, consumers, schemas) build on this
package; nothing in here knows about routing rules or agencies.
"""
