"""Helpers that fetch third-party tools for the interoperability tests."""
