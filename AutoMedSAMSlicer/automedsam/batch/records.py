"""Where a batch run keeps each case's results, which files in the output folder are its own, and
how a rerun knows a case is finished.

In the output folder, per case: ``<id>.seg.nrrd`` (or ``<id>.nii.gz``), ``previews/<id>.png`` and
``<id>.json``, the case's record. Before a worker writes anything of a case it replaces the record
with a *claim* (``"status": "running"``); every file is written to a temporary name and renamed;
the final record comes last and names each file with its sha256. So a case is finished exactly
when its record says so and its files have the recorded sha256s; anything else is done again.

Ownership: a file with an output's name belongs to this tool only when a record vouches for it: a
finished record whose sha256 matches (a file the user edited afterwards is the user's), or a claim
(a case this tool was writing when it stopped, for the file names the claim notes). Anything else
(a user's ``a.seg.nrrd``, a BIDS sidecar ``a.json``) is the user's: :func:`foreign_outputs` finds
them so the run can refuse before any work; only ``--overwrite`` lets the run replace them.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..download import sha256_file
from ..io import temporary_name
from .cases import Case

#: Bump when records change meaning; records of another version are done again.
RECORD_VERSION = 2
#: What every record of this tool says it is (so a user's JSON with the same name is never taken for one).
RECORD_KIND = "automedsam-batch-case"
FORMATS = {"seg.nrrd": ".seg.nrrd", "nifti": ".nii.gz"}
STATUSES = ("running", "done", "failed")
#: A case whose claim was found stale this many times (the run died on it each time) is not tried again
#: without --retry-failed.
MAX_DEATHS = 2


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

    def preview_link(self, case_id: str) -> str:
        """The preview's path relative to the output folder, as records and the HTML index name it."""
        return f"previews/{case_id}.png"

    def outputs(self, case_id: str) -> tuple[Path, Path, Path]:
        """Every file a case may leave: record, segmentation, preview."""
        return self.record(case_id), self.segmentation(case_id), self.preview(case_id)

    def claimed_names(self, case_id: str) -> list[str]:
        """The segmentation and preview names a claim notes (relative to the folder)."""
        return [p.relative_to(self.folder).as_posix() for p in self.outputs(case_id)[1:]]

    def remove_temporary(self, case_id: str) -> None:
        """Delete the temporary files an interrupted attempt at this case left: exactly the names
        :func:`automedsam.io.temporary_name` makes for its outputs, nothing else. Only one run
        writes to a folder at a time (:mod:`.lock`), and one worker a case, so none is in use."""
        for output in self.outputs(case_id):
            if output.parent.is_dir():
                pattern = re.compile(rf"\.{re.escape(output.name)}\.\d+-[0-9a-f]{{8}}\.tmp")
                for p in output.parent.glob(f".{output.name}.*.tmp*"):
                    if pattern.match(p.name):
                        p.unlink(missing_ok=True)

    def remove_claimed(self, case_id: str) -> None:
        """Delete the case's segmentation and preview, which its claim vouches for (a failed attempt
        must not leave files no record names). Never called for files a claim does not cover."""
        for p in self.outputs(case_id)[1:]:
            p.unlink(missing_ok=True)


def new_record(case: Case, run_key: str) -> dict:
    """The fields every record of ``case`` starts with (what it is, for which run and inputs)."""
    return {"version": RECORD_VERSION, "kind": RECORD_KIND, "case": case.id, "run_key": run_key,
            "input_fingerprint": case.fingerprint(), "image": str(case.image),
            "reference": str(case.reference) if case.reference else None}


def lost_record(case: Case, run_key: str, died: int, message: str) -> dict:
    """The record of a case a worker or the run died on ``died`` times: failed, retryable while
    ``died`` is below :data:`MAX_DEATHS`."""
    return new_record(case, run_key) | {
        "status": "failed", "warnings": [], "seconds": None, "deaths": died,
        "error": {"type": "WorkerLost", "retryable": died < MAX_DEATHS, "message": message}}


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON to a temporary name in the same folder, flush it to disk, then rename it."""
    tmp = temporary_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load_json(path: Path):
    try:
        if not path.is_file():
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_ours(data, case_id: str) -> bool:
    """Whether a JSON document is a record of this tool for ``case_id`` (any version, even one
    whose other fields were edited by hand): a dict with this tool's ``kind`` (or, from version 1,
    a ``run_key``) and the case's id."""
    if not isinstance(data, dict) or data.get("case") != case_id:
        return False
    return data.get("kind") == RECORD_KIND or (data.get("version") == 1 and isinstance(data.get("run_key"), str))


def _number(value) -> bool:
    """A finite JSON number (Python's json reads NaN, which the report could not write back)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _classes_ok(classes) -> bool:
    if not isinstance(classes, dict) or not all(isinstance(c, dict) for c in classes.values()):
        return False
    for c in classes.values():
        if not all(_number(c.get(k)) for k in ("voxels", "volume_ml")):
            return False
        if any(c.get(k) is not None and not _number(c[k]) for k in ("dsc", "nsd", "slices_with_mask")):
            return False
        if (c.get("dsc") is None) != (c.get("nsd") is None):
            return False
    return True


def valid_record(record, layout: OutputLayout, case_id: str) -> bool:
    """Whether a record of ours has every field the run and the report use, with the right types
    and the file names the layout gives (a hand edit that breaks any of this makes the case be
    done again, never an internal error or a link the index would show)."""
    if not is_ours(record, case_id) or record.get("version") != RECORD_VERSION:
        return False
    if not all(isinstance(record.get(k), str) for k in ("run_key", "input_fingerprint", "image")):
        return False
    if record.get("status") not in STATUSES or not isinstance(record.get("warnings", []), list):
        return False
    if not all(isinstance(w, str) for w in record.get("warnings", [])):
        return False
    if record.get("seconds") is not None and not _number(record["seconds"]):
        return False
    if "classes" in record and not _classes_ok(record["classes"]):
        return False
    if record["status"] != "failed" and record.get("error") is not None:
        return False
    if record["status"] == "failed":
        error = record.get("error")
        return (isinstance(error, dict) and isinstance(error.get("message"), str)
                and isinstance(error.get("type"), str) and isinstance(error.get("retryable"), bool))
    if record["status"] == "running":
        outputs = record.get("outputs")
        return isinstance(record.get("deaths", 0), int) and isinstance(outputs, list) and all(
            isinstance(o, str) for o in outputs)
    if record.get("output") != layout.segmentation(case_id).name or not isinstance(record.get("output_sha256"), str):
        return False
    if record.get("preview") not in (None, layout.preview_link(case_id)):
        return False
    if record.get("preview") is not None and not isinstance(record.get("preview_sha256"), str):
        return False
    if "classes" not in record:
        return False
    mean = record.get("mean")
    return mean is None or (isinstance(mean, dict) and all(_number(v) for v in mean.values()))


def read_record(layout: OutputLayout, case_id: str) -> dict | None:
    """The case's record if it is a valid one of this version, else None (no file, a half-written
    file from an older tool, a hand edit): such a case is done again."""
    record = _load_json(layout.record(case_id))
    return record if valid_record(record, layout, case_id) else None


def vouched_files(layout: OutputLayout, case_id: str) -> set[Path]:
    """The case's files this tool may replace or remove: its record file if it is ours, and the
    segmentation and preview a claim covers or a finished record names with a matching sha256."""
    data = _load_json(layout.record(case_id))
    if not is_ours(data, case_id):
        return set()
    files = {layout.record(case_id)}
    if data.get("status") == "running":  # the files it was about to write, by the names it noted
        noted = data.get("outputs") if isinstance(data.get("outputs"), list) else []
        return files | {p for p in layout.outputs(case_id)[1:] if p.relative_to(layout.folder).as_posix() in noted}
    if data.get("status") != "done":
        return files
    # By content, not by the names the record gives (a hand may have edited those).
    for path, digest in ((layout.segmentation(case_id), data.get("output_sha256")),
                         (layout.preview(case_id), data.get("preview_sha256"))):
        if isinstance(digest, str) and path.is_file() and sha256_file(path) == digest:
            files.add(path)
    return files


def foreign_outputs(layout: OutputLayout, case_id: str) -> list[Path]:
    """Files with one of the case's output names that no record of this tool vouches for."""
    present = [p for p in layout.outputs(case_id) if p.exists() or p.is_symlink()]
    if not present:
        return []
    vouched = vouched_files(layout, case_id)
    return [p for p in present if p not in vouched]


def recorded_outputs(layout: OutputLayout) -> set[Path]:
    """Resolved paths of the segmentations and previews that records of this tool in the output
    folder name (either format), so a batch whose output folder is, or lies above, its input never
    takes its own earlier outputs for scans. By name only: this only keeps files out of the case
    list, it never touches them, so hashing every output here would be work for nothing."""
    found: set[Path] = set()
    if not layout.folder.is_dir():
        return found
    for path in layout.folder.glob("*.json"):
        case_id = path.name[: -len(".json")]
        if is_ours(_load_json(path), case_id):
            for fmt in FORMATS:  # an earlier run may have written the other format
                found |= {p.resolve() for p in OutputLayout(layout.folder, fmt).outputs(case_id)[1:] if p.exists()}
    return found


def deaths_of(record: dict | None) -> int:
    """How many times a run or a worker died while on this case, as its record or claim says: a
    claim left by a run that died counts one more (an interrupted one does not)."""
    if record is None:
        return 0
    deaths = record.get("deaths", 0)
    deaths = deaths if isinstance(deaths, int) and not isinstance(deaths, bool) and deaths >= 0 else 0
    if record["status"] == "running":
        return deaths + (record.get("interrupted") is not True)
    if record["status"] == "failed" and record["error"]["type"] == "WorkerLost":
        return deaths
    return 0


def finished(record: dict | None, layout: OutputLayout, fingerprint: str, run_key: str, retry_failed: bool,
             preview: bool) -> bool:
    """Whether a rerun may skip the case: done (its files there with their recorded sha256, the
    preview too when the run draws previews) or failed for a reason that would recur (not
    ``retry_failed``, not a lost worker), for the same input files and the same run configuration."""
    if record is None or record.get("run_key") != run_key or record.get("input_fingerprint") != fingerprint:
        return False
    if record["status"] == "failed":
        return not retry_failed and not record["error"]["retryable"]
    if record["status"] != "done":
        return False
    output = layout.segmentation(case_id := record["case"])
    if not (output.is_file() and sha256_file(output) == record["output_sha256"]):
        return False
    if not preview:
        return True
    picture = layout.preview(case_id)
    return (record.get("preview") is not None and picture.is_file()
            and sha256_file(picture) == record.get("preview_sha256"))
