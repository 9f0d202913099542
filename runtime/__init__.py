"""Plumbing every component shares, and nothing else: settings, PostgreSQL (pool and
migrations) and the outbox, Kafka clients, users and ACLs, logging and its redaction,
sealing at rest, pseudonyms, the office key ring, postcodes, metrics, the dead-letter
writer, and the web kit (pages, sessions, security headers, rate limits). It imports
only ``schemas``; nothing in here knows about routing rules, agencies or users.
"""
