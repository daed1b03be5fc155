#!/usr/bin/env bash
# The web front end in one command, from any folder:
#   web/run.sh serve [--port 8080] [--host 127.0.0.1]   start the page (http://127.0.0.1:8080/)
#   web/run.sh test                                      its tests, the end-to-end one in headless Chromium
#   web/run.sh setup                                     only create/update the environment
# Each first creates or updates web/.venv from requirements-web.txt (about a minute the first time);
# requirements-web.txt says why the web front end has an environment of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=web/.venv
STAMP=$VENV/.web-ok

setup() {
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    if [ ! -f "$STAMP" ] || [ requirements-web.txt -nt "$STAMP" ] || [ requirements.txt -nt "$STAMP" ] \
        || [ pyproject.toml -nt "$STAMP" ]; then
        "$VENV/bin/python" -m pip install --quiet --upgrade pip
        "$VENV/bin/pip" install --quiet -r requirements-web.txt
        "$VENV/bin/pip" install --quiet --no-deps -e .
        touch "$STAMP"
    fi
}

command=${1:-serve}
shift || true
case "$command" in
    setup) setup ;;
    serve) setup; exec "$VENV/bin/python" web/server.py "$@" ;;
    test)
        for tool in "${CHROMIUM:-/usr/bin/chromium}" "${CHROMEDRIVER:-/usr/bin/chromedriver}"; do
            [ -x "$tool" ] || { echo "web/run.sh: $tool is missing: apt-get install -y chromium chromium-driver" >&2; exit 2; }
        done
        setup
        OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider web/tests "$@" ;;
    *) echo "usage: web/run.sh [serve|test|setup] [options]" >&2; exit 2 ;;
esac
