#!/usr/bin/env bash
# Set up a fresh machine, start the local stack and the bus, submit demo events,
# print each agency's receipts, and serve until Ctrl-C. Everything it started stops on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/tuo demo "$@"
