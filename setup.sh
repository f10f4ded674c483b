#!/usr/bin/env bash
# Create .venv with the pinned CPU dependencies and the offline demo weights. Idempotent.
# PYTHON=python3.11 bash setup.sh   to choose the interpreter (3.10+).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -U pip
DS_BUILD_OPS=0 .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
.venv/bin/pip install -q --disable-pip-version-check -r requirements-serve.txt
.venv/bin/pip install -q --disable-pip-version-check --no-deps -r requirements-demo.txt
.venv/bin/pip install -q --disable-pip-version-check --no-deps -e .
if ! command -v java >/dev/null 2>&1; then
    echo "setup.sh: no Java found: METEOR and the PTB tokenizer need a JRE (apt-get install default-jre-headless);" \
         "other metrics still work." >&2
fi
echo "setup.sh: ready (.venv/bin/rsmoe --help)"
