#!/usr/bin/env bash
# Install inference-perf (kubernetes-sigs, PyPI) into its own venv:
#   ${TIDELOCK_IP_HOME:-~/.cache/tidelock/inference-perf}/venv
#
# inference-perf 0.7.0 declares Requires-Python >= 3.12. This picks an interpreter:
#   1. $IP_PYTHON, if set;
#   2. python3.12 / python3.13 on PATH (Ubuntu 24.04 has 3.12 as its python3);
#   3. a pyenv build under ~/.pyenv/versions/3.12* or 3.13* (this image has 3.12.1
#      and 3.13.0 there, though the active python3 is 3.11);
#   4. python3.12 / python3.13 from apt, where the distribution has one;
#   5. otherwise python3.11 with `pip install --ignore-requires-python`: the 0.7.0
#      code has no 3.12-only syntax and runs on 3.11 (checked, see README.md).
# Only PyPI (and apt in step 4) is used. Re-running is a no-op once installed.
set -euo pipefail

IP_VERSION="${IP_VERSION:-0.7.0}"
IP_HOME="${TIDELOCK_IP_HOME:-$HOME/.cache/tidelock/inference-perf}"
VENV="$IP_HOME/venv"

if [[ -x "$VENV/bin/inference-perf" ]] && "$VENV/bin/python" -c "import inference_perf" 2>/dev/null; then
  echo "inference-perf already installed in $VENV ($("$VENV/bin/python" --version))"
  exit 0
fi

works() { # interpreter that runs and is >= 3.MIN
  "$1" -c "import sys, venv; sys.exit(0 if sys.version_info >= (3, $2) else 1)" >/dev/null 2>&1
}

pick() {
  local c
  if [[ -n "${IP_PYTHON:-}" ]]; then echo "$IP_PYTHON"; return; fi
  for c in python3.12 python3.13 python3; do
    if command -v "$c" >/dev/null && works "$c" 12; then command -v "$c"; return; fi
  done
  for c in "$HOME"/.pyenv/versions/3.12*/bin/python3 "$HOME"/.pyenv/versions/3.13*/bin/python3; do
    if [[ -x "$c" ]] && works "$c" 12; then echo "$c"; return; fi
  done
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    for c in python3.12 python3.13; do
      if apt-cache show "$c-venv" >/dev/null 2>&1; then
        apt-get install -y -q "$c" "$c-venv" >&2 && works "$c" 12 && { command -v "$c"; return; }
      fi
    done
  fi
  for c in python3.11 /usr/bin/python3.11; do
    if command -v "$c" >/dev/null && works "$c" 11; then echo "$c"; return; fi
  done
  echo "no python >= 3.11 found" >&2
  return 1
}

PY="$(pick)"
echo "interpreter: $PY ($("$PY" --version 2>&1))"
mkdir -p "$IP_HOME"
rm -rf "$VENV"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
if works "$PY" 12; then
  "${PIP[@]}" "inference-perf==$IP_VERSION"
else
  # Only inference-perf itself ignores Requires-Python. Its dependencies must be
  # resolved normally, or pip picks e.g. numpy 2.5 (3.12+, no 3.11 wheel) and
  # fails building it from source.
  echo "no python >= 3.12: installing inference-perf with --ignore-requires-python" >&2
  "${PIP[@]}" --no-deps --ignore-requires-python "inference-perf==$IP_VERSION"
  "$VENV/bin/python" -c "from importlib.metadata import requires
print('\n'.join(r for r in requires('inference-perf') if 'extra ==' not in r))" >"$IP_HOME/requirements.txt"
  "${PIP[@]}" -r "$IP_HOME/requirements.txt"
fi
"$VENV/bin/python" -c "import inference_perf, transformers; print('inference-perf', '$IP_VERSION', 'transformers', transformers.__version__)"
echo "installed in $VENV"
