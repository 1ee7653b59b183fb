# Sourced by hack/*.sh: make sure .venv exists with fuyao installed (editable) plus the given extras.
# Usage: ensure_venv [extra]   (e.g. ensure_venv test)
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${FUYAO_VENV:-$REPO_ROOT/.venv}"

pick_python() {  # [UPPER]: a Python >= 3.11 and below UPPER (e.g. 3.15) when given
  local upper="${1:-}" below="True"
  [ -n "$upper" ] && below="sys.version_info < (${upper/./, })"
  for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c "import sys; sys.exit(0 if sys.version_info >= (3, 11) and $below else 1)" 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "fuyao needs Python >= 3.11${upper:+ and < $upper} (set PYTHON=/path/to/python3.11)" >&2
  return 1
}

ensure_venv() {
  local extra="${1:-}" spec="$REPO_ROOT" stamp
  [ -n "$extra" ] && spec="$REPO_ROOT[$extra]"
  if [ ! -x "$VENV/bin/python" ]; then
    local py; py="$(pick_python)"
    echo "==> creating virtualenv $VENV ($("$py" --version))"
    "$py" -m venv "$VENV" || {
      echo "python venv module missing; installing python3-venv" >&2
      apt-get update -qq && apt-get install -y -qq python3-venv && "$py" -m venv "$VENV"
    }
  fi
  # Reinstall only when pyproject.toml changed (or the extra differs).
  stamp="$VENV/.fuyao-installed-$extra-path"
  if [ ! -f "$stamp" ] || [ "$REPO_ROOT/pyproject.toml" -nt "$stamp" ] || [ ! -x "$VENV/bin/fuyao" ]; then
    echo "==> installing fuyao${extra:+[$extra]} into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
    # setuptools' 'compat' editable mode puts the checkout on sys.path with a plain .pth line; the default mode's
    # import hook costs every Python start about 25 ms (pathlib and importlib.util at interpreter start), and the
    # tests start Python thousands of times (each fake npu-smi call is one). A setuptools without the mode (it is
    # transitional): the default install.
    if ! "$VENV/bin/python" -m pip install -q -e "$spec" --config-settings editable_mode=compat 2>/dev/null; then
      echo "==> setuptools' compat editable mode failed: the default editable install" >&2
      "$VENV/bin/python" -m pip install -q -e "$spec"
    fi
    touch "$stamp"
  fi
  export PATH="$VENV/bin:$PATH"
}
