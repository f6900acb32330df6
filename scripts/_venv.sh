# Sourced by scripts/serve, scripts/openvpp and scripts/test: a .venv (install_project below).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

find_python() {
  for candidate in "${PYTHON:-}" python3.11 python3.12 python3.13 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"
      return
    fi
  done
  echo "Python 3.11 or newer is required" >&2
  exit 1
}

if [ ! -x .venv/bin/python ]; then
  "$(find_python)" -m venv .venv
fi

# What decides whether the installed project is current: pyproject.toml and the top-level
# packages (an editable install maps packages when it is made).
INSTALL_STAMP=.venv/.openvpp-install
install_key() {
  .venv/bin/python -c 'import hashlib, pathlib
parts = [pathlib.Path("pyproject.toml").read_bytes()]
parts += sorted(p.parent.name.encode() for p in pathlib.Path(".").glob("*/__init__.py"))
print(hashlib.sha256(b"\0".join(parts)).hexdigest())'
}

# Installs the project (editable) into .venv unless the install is current, so a normal
# start runs no pip at all; when pip runs, it shows errors only (a pip configuration may
# warn about every index location it cannot read).
install_project() {
  local key
  key="$(install_key)"
  if [ "$(cat "$INSTALL_STAMP" 2>/dev/null)" != "$key" ] || [ ! -x .venv/bin/openvpp ]; then
    .venv/bin/python -m pip install --quiet --quiet --disable-pip-version-check -e .
    echo "$key" >"$INSTALL_STAMP"
  fi
}
