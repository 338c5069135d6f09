"""Where a batch run keeps each case's results, and how a rerun knows a case is finished.

In the output folder, per case: ``<id>.seg.nrrd`` (or ``<id>.nii.gz``), ``previews/<id>.png`` and
``<id>.json``, the case's record. Every file is written to a temporary name and renamed, and the
record is written last, so a case is finished exactly when its record says so and the output file
it names has the sha256 it records; anything else (a crash between two files, a kill in the middle
of one) is done again. Temporary files a killed run left behind are removed when the case is done
again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..download import sha256_file

#: Bump when records change meaning; records of another version are done again.
RECORD_VERSION = 1
FORMATS = {"seg.nrrd": ".seg.nrrd", "nifti": ".nii.gz"}


@dataclass(frozen=True)
class OutputLayout:
    """The file names of a batch run's outputs in ``folder``."""

    folder: Path
    format: str = "seg.nrrd"

    def segmentation(self, case_id: str) -> Path:
        """The case's segmentation: ``.seg.nrrd`` (named segments) or a ``.nii.gz`` label map
        (values 1..N in the order of the classes)."""
        return self.folder / f"{case_id}{FORMATS[self.format]}"

    def record(self, case_id: str) -> Path:
        return self.folder / f"{case_id}.json"

    def preview(self, case_id: str) -> Path:
        return self.folder / "previews" / f"{case_id}.png"

    def remove_partial(self, case_id: str) -> None:
        """Delete what an interrupted attempt at this case left: its temporary files, and its
        outputs, which no record vouches for (the record goes first, so a stale one never points
        at new files)."""
        outputs = (self.record(case_id), self.segmentation(case_id), self.preview(case_id))
        for output in outputs:
            if output.parent.is_dir():
                for p in output.parent.glob(f".{output.name}.*"):  # e.g. .<id>.seg.nrrd.tmp.seg.nrrd
                    if ".tmp" in p.name[len(output.name) + 1:]:
                        p.unlink(missing_ok=True)
        for p in outputs:
            p.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON to a temporary name in the same folder, flush it to disk, then rename it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_record(layout: OutputLayout, case_id: str) -> dict | None:
    """The case's record, or None when there is none or it cannot be read (a half-written file
    from an older tool, a hand edit): such a case is done again."""
    try:
        record = json.loads(layout.record(case_id).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("version") == RECORD_VERSION else None


def finished(record: dict | None, layout: OutputLayout, fingerprint: str, run_key: str, retry_failed: bool) -> bool:
    """Whether a rerun may skip the case: done (the output file is there with its recorded sha256)
    or failed for a reason that would recur (not ``retry_failed``, not a lost worker), for the same
    input files and the same run configuration."""
    if record is None or record.get("run_key") != run_key or record.get("input_fingerprint") != fingerprint:
        return False
    if record.get("status") == "failed":
        return not retry_failed and not record.get("error", {}).get("retryable", False)
    if record.get("status") != "done":
        return False
    output = layout.folder / str(record.get("output", ""))
    return output.is_file() and sha256_file(output) == record.get("output_sha256")
