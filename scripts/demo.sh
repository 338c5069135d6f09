#!/usr/bin/env bash
# `make demo`: the main job. Runs `automedsam demo` on the public demo CT (downloaded, pinned by
# sha256) with LiteMedSAM, whose pretrained weights install with the package. Offline (the download
# fails with exit 3) and with the team's shared data beside the checkout, it runs the identical
# pipeline, real weights included, on the shared copy of that CT and says so.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
SHARED="${SHARED:-../shared}"
CT="$SHARED/data/ct_abdomen"
"$VENV/bin/automedsam" demo "$@"
rc=$?
if [ "$rc" -eq 3 ] && [ -f "$CT/ct_lowres.nii.gz" ]; then
  echo "[demo] the demo CT could not be downloaded (see above); running the same demo on the shared copy" \
       "in $CT" >&2
  exec "$VENV/bin/automedsam" demo --image "$CT/ct_lowres.nii.gz" --labels "$CT/ct_lowres_labels.nii.gz" "$@"
fi
exit "$rc"
