#!/usr/bin/env bash
# `make demo`: the main job. Runs `automedsam demo` (downloads the public demo CT and uses the
# SAM 2.1 tiny weights). Where that cannot run (exit 3: no network, or the weights are not in the
# cache) and the team's shared data is beside the checkout, it runs the identical pipeline on the
# shared CT with the random-weight test backbone (--smoke) and says so.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
SHARED="${SHARED:-../shared}"
"$VENV/bin/automedsam" demo "$@"
rc=$?
if [ "$rc" -eq 3 ] && [ -f "$SHARED/data/ct_abdomen/ct_lowres.nii.gz" ]; then
  echo "[demo] the full demo needs network or cached weights (see above); running the offline smoke pipeline" \
       "on $SHARED/data/ct_abdomen instead" >&2
  exec "$VENV/bin/automedsam" demo --smoke --image "$SHARED/data/ct_abdomen/ct_lowres.nii.gz" \
       --labels "$SHARED/data/ct_abdomen/ct_lowres_labels.nii.gz" "$@"
fi
exit "$rc"
