#!/usr/bin/env bash
# Set up a fresh machine, then run the whole test suite: lint, types, and pytest
# (unit tests and integration tests against a real Kafka broker and PostgreSQL
# server that the suite starts on free loopback ports and stops afterwards).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m tests.tools.avro_tools  # Apache Avro's Java tools for the interop tests (cached)
started=$(date +%s)
echo "test: ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "test: mypy"
.venv/bin/mypy
echo "test: layers (import-linter)"
.venv/bin/lint-imports --no-cache
echo "test: schema evolution"
.venv/bin/tuo schemas check
echo "test: pytest"
# Two workers: the tests on the session's stack in one, the tests that start worlds of
# their own in the other (tests/conftest.py groups them).
.venv/bin/pytest --numprocesses=2 --dist=loadgroup "$@"
echo "test: whole suite took $(( $(date +%s) - started ))s"
