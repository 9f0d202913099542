#!/usr/bin/env bash
# Install everything Tell Us Once needs on a fresh Debian machine, idempotently:
# OS packages (PostgreSQL server, a JDK, Maven, Chromium, npm, wrk) with apt-get, Python packages
# into .venv with pip, GOV.UK Frontend, Swagger UI and axe-core into node_modules with npm,
# and Apache Kafka's jars from Maven Central into .tuo/cache.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
compgen -G "/usr/lib/postgresql/*/bin/initdb" > /dev/null || need_apt+=(postgresql postgresql-client)
command -v java > /dev/null || need_apt+=(openjdk-17-jre-headless)
command -v mvn > /dev/null || need_apt+=(maven)
python3 -c 'import venv, ensurepip' 2> /dev/null || need_apt+=(python3-venv)
command -v chromium > /dev/null || need_apt+=(chromium)  # the browser tests drive it
command -v npm > /dev/null || need_apt+=(nodejs npm)
command -v wrk > /dev/null || need_apt+=(wrk)  # the intake benchmark's load generator (bench/intake.lua)

if ((${#need_apt[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "setup: please install these Debian packages first (as root): ${need_apt[*]}" >&2
        exit 1
    fi
    echo "setup: installing ${need_apt[*]} with apt-get"
    # We run our own throwaway PostgreSQL cluster; stop Debian creating and starting its own.
    mkdir -p /etc/postgresql-common/createcluster.d
    echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/tuo.conf
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${need_apt[@]}"
fi

if [[ ! -x .venv/bin/python ]]; then
    echo "setup: creating .venv"
    python3 -m venv .venv
fi
stamp=.venv/.tuo-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
    echo "setup: installing Python packages"
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
    touch "$stamp"
fi

if [[ ! -d node_modules || package-lock.json -nt node_modules ]]; then
    echo "setup: installing GOV.UK Frontend, Swagger UI and axe-core with npm"
    npm ci --no-audit --no-fund
    touch node_modules
fi

echo "setup: resolving Apache Kafka jars (cached after the first run)"
.venv/bin/python -c '
from runtime.settings import load_settings
from devstack.kafka import ensure_jars, ensure_tool_jars
s = load_settings()
print("setup: Kafka jars in", ensure_jars(s.cache_dir, s.kafka_version))
# Kafka'"'"'s own ProducerPerformance, the benchmarks'"'"' physical limit (bench/producer_performance.py)
print("setup: Kafka tool jars in", ensure_tool_jars(s.cache_dir, s.kafka_version))
'
