#!/usr/bin/env bash
# Create .venv with the pinned CPU dependencies and the offline demo weights. Idempotent.
#   bash setup.sh           what the demo and every command need
#   bash setup.sh --tests   also what only the tests need: a second venv with transformers 4.x
#                           (.venv-tf4: exports must load there too) and a headless browser
#                           (Debian's chromium + chromium-driver, for the web page and report tests)
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
if [[ ${1:-} == --tests ]]; then
    if [ ! -x .venv-tf4/bin/python ]; then
        "$PY" -m venv .venv-tf4
    fi
    .venv-tf4/bin/pip install -q --disable-pip-version-check -r requirements-tf4.txt
    if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
        else
            echo "setup.sh: no chromium/chromedriver (apt-get install chromium chromium-driver as root): the browser tests will skip" >&2
        fi
    fi
fi
echo "setup.sh: ready (.venv/bin/rsmoe --help)"
