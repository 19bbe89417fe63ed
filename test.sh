#!/bin/sh
# The Quick start's test command: sets up .venv with the test dependencies
# (through start.sh, the same install path as the image) and runs the whole
# suite. Arguments go to pytest.
set -eu
ROOT=$(cd "$(dirname "$0")" && pwd)
SUPERVISOR_EXTRAS=test "$ROOT/start.sh" --install-only
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
