#!/bin/sh
# The image's ENTRYPOINT and the Quick start's run command.
#
# On a fresh machine it sets itself up first (a virtualenv in .venv with this
# package installed), then replaces itself with `supervisor run` (exec), so
# that the supervisor is PID 1 in a container and receives the platform's
# signals directly. Arguments are passed to `supervisor run`.
#
#   ./start.sh                       run with ./supervisor.toml or the bundled example
#   ./start.sh --config my.toml      run with another config
#   ./start.sh --install-only        set up and exit (the Dockerfile's build step)
#
# SUPERVISOR_EXTRAS=test installs the test dependencies too (used by test.sh).
set -eu

ROOT=$(cd "$(dirname "$0")" && pwd)
VENV=${SUPERVISOR_VENV:-$ROOT/.venv}
EXTRAS=${SUPERVISOR_EXTRAS:-}

find_python() {
    for candidate in python3.13 python3.12 python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "start.sh: Python 3.11 or newer is required" >&2
    return 1
}

install() {
    # Reinstall only when pyproject.toml or the extras changed since last time.
    stamp="$VENV/.ca-supervisor-installed"
    want="$(cat "$ROOT/pyproject.toml" | cksum) extras=$EXTRAS"
    if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        "$(find_python)" -m venv "$VENV"
    fi
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    target="$ROOT"
    [ -n "$EXTRAS" ] && target="$ROOT[$EXTRAS]"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$target"
    echo "$want" > "$stamp"
}

install >&2
if [ "${1:-}" = "--install-only" ]; then
    exit 0
fi
exec "$VENV/bin/supervisor" run "$@"
