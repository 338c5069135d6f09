#!/usr/bin/env bash
# Create (or reuse) the virtual environment that runs AutoMedSAMSlicer's core, CLI and tests.
#
# Usage: scripts/setup_env.sh [VENV_DIR]   (default: .venv, or $VENV)
#
# Why it is not a plain `pip install -e .[models,dev]`:
# - torchvision only imports with the registry's CUDA-enabled torch build (it runs on CPU too);
#   some machines' pip configuration offers a local CPU-only torch wheel that pip prefers, so the
#   torch stack is installed with `pip --isolated` (ignores pip.conf and PIP_* variables).
# - sam2 ships as a source distribution that builds against the installed torch: it is built
#   without build isolation (no second torch download) and with SAM2_BUILD_CUDA=0 (no CUDA
#   toolkit needed; its optional CUDA post-processing extension is not used by AutoMedSAM).
# The heavy dependencies are installed once per content of constraints.txt/pyproject.toml/this
# script (a stamp file in the venv records the hash); later runs only refresh the editable install.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-${VENV:-.venv}}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

key=$(cat constraints.txt pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)
stamp="$VENV/.automedsam-deps-$key"

# `pip_install ARGS...`: pip install ignoring pip.conf and PIP_* variables (see above).
pip_install() {
  local cert=()
  [ -n "${PIP_CERT:-}" ] && [ -f "${PIP_CERT}" ] && cert=(--cert "$PIP_CERT")
  "$VENV/bin/python" -m pip --isolated --disable-pip-version-check --default-timeout 180 \
    "${cert[@]}" install --progress-bar off "$@"
}

if [ ! -f "$stamp" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version 2>&1)" >&2
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  pip_install -q --upgrade pip setuptools wheel
  pip_install -q -c constraints.txt torch torchvision
  SAM2_BUILD_CUDA=0 pip_install -q --no-build-isolation -c constraints.txt \
    segment-anything sam2
  pip_install -q -c constraints.txt -e ".[models,service,cluster,dev]"
  touch "$stamp"
fi
# Cheap on every run: points the editable install at this checkout (CI clones to new paths).
pip_install -q --no-deps --no-build-isolation -e .
"$VENV/bin/python" -c "import torchvision, segment_anything, sam2, automedsam" \
  || { echo "[setup] the environment in $VENV is broken: delete it and run again" >&2; exit 1; }
