#!/usr/bin/env bash
# Build the Python example component: plugins/hello-py/app.py -> $1 (default hello-py.wasm).
# componentize-py (pinned in requirements.txt) is installed into plugins/hello-py/.venv on first
# use; it bundles CPython, so the component is ~18 MB and needs no other toolchain.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/hello-py.wasm}"
venv="$here/.venv"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
if [[ ! -x "$venv/bin/componentize-py" || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  "${PYTHON:-python3}" -m venv "$venv"
  "$venv/bin/python" -m pip install --disable-pip-version-check --no-input -q -r "$here/requirements.txt"
  echo "$want" > "$stamp"
fi
cd "$here"
"$venv/bin/componentize-py" -d ../../guest-sdk/wit -w handler-world componentize app -o "$out"
