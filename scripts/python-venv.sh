#!/usr/bin/env bash
# Create (or refresh) the Python virtualenv used by the interop tests.
#
#   scripts/python-venv.sh [VENV_DIR]      (default: <repo>/.venv)
#
# Installs the pinned packages of tests/interop/requirements.txt. A stamp file in
# the venv records the hash of the requirements and the Python version, so a
# second run is a fast no-op. Set PYTHON to choose the interpreter (default python3).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo/.venv}"
req="$repo/tests/interop/requirements.txt"
python="${PYTHON:-python3}"
stamp="$venv/.warren-requirements.stamp"

command -v "$python" >/dev/null || { echo "python-venv: '$python' not found" >&2; exit 1; }
pyver="$("$python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
want="$( { sha256sum "$req" | cut -d' ' -f1; echo "python $pyver"; } )"

if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "python-venv: $venv is up to date (python $pyver, $(basename "$req") unchanged)"
    exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
    echo "python-venv: creating virtualenv $venv with $python ($pyver)"
    "$python" -m venv "$venv"
fi

echo "python-venv: installing pinned packages from $req"
"$venv/bin/python" -m pip install --disable-pip-version-check --no-input -q -r "$req"
echo "python-venv: checking dependency consistency"
"$venv/bin/python" -m pip check --disable-pip-version-check
"$venv/bin/python" -W ignore -c 'import oslo_messaging, kombu; print("python-venv: oslo_messaging and kombu %s import fine" % kombu.__version__)'

echo "$want" > "$stamp"
echo "python-venv: done; use $venv/bin/python"
