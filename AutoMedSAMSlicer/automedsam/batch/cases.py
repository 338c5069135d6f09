"""The cases of a batch run: every volume of a folder, or the rows of a CSV list.

A folder is searched recursively. Each volume file (NIfTI, NRRD, MetaImage; ``.seg.nrrd``
segmentations are skipped) is one case, and so is each folder that directly holds DICOM files (a
series). ``pattern`` (a glob on file names, e.g. ``*_0000.nii.gz``) restricts the files taken. A
case's id is its path relative to the input folder without the suffix, ``/`` written ``__``
(``patient7/ct.nii.gz`` -> ``patient7__ct``), so two runs over the same folder name the same
outputs.

A CSV list has a header row; the image column (default ``image``) holds a file or DICOM folder
path, an optional reference column a label map or ``.seg.nrrd``, an optional ``case`` column the
id. Relative paths are relative to the CSV's own folder.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidInputError
from ..io import SEG_NRRD_SUFFIX, VOLUME_SUFFIXES

#: Names the run's own files take in the output folder: no case may use them.
RESERVED_IDS = frozenset({"batch_report", "index", "previews"})
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")


@dataclass(frozen=True)
class Case:
    """One input of a batch.

    Attributes:
        id: the case's name; its outputs are ``<id>.seg.nrrd`` (or ``.nii.gz``) and ``<id>.json``.
        image: a volume file or a DICOM series folder.
        reference: a reference label map or ``.seg.nrrd`` to score against, or None.
    """

    id: str
    image: Path
    reference: Path | None = None

    def fingerprint(self) -> str:
        """What the inputs are now: names, sizes and modification times of the image (every file
        of a DICOM folder) and the reference. A case recorded with another fingerprint is done
        again (its input changed since)."""
        digest = hashlib.sha256()
        for path in (self.image, self.reference):
            if path is None:
                digest.update(b"-")
                continue
            try:
                files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
            except OSError as exc:  # an unreadable folder: the case fails when it is read, with the reason
                digest.update(f"{path}|unreadable|{exc.errno}".encode())
                continue
            for f in files:
                try:
                    st = f.stat()
                except OSError:
                    digest.update(f"{f.name}|missing".encode())
                    continue
                digest.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
        return digest.hexdigest()[:24]


def is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file: 'DICM' after the 128-byte preamble. Never opens what is not a regular
    file (reading a FIFO would block)."""
    try:
        if not path.is_file():
            return False
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _volume_suffix(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(SEG_NRRD_SUFFIX):
        return None
    return next((s for s in sorted(VOLUME_SUFFIXES, key=len, reverse=True) if lower.endswith(s)), None)


def _case_id(relative: str) -> str:
    case_id = relative.replace(os.sep, "/").strip("/").replace("/", "__")
    return case_id or "case"


#: Names Windows keeps for devices, whatever the extension (``NUL.json`` is the null device).
_DEVICE_NAMES = frozenset({"con", "prn", "aux", "nul", *(f"com{n}" for n in range(1, 10)),
                           *(f"lpt{n}" for n in range(1, 10))})


def _is_device_name(name: str) -> bool:
    return name.split(".")[0].casefold() in _DEVICE_NAMES


def safe_case_id(name: str) -> str:
    """``name`` if it can name output files on every system, else a safe spelling of it: accents
    folded to ASCII, anything but letters, digits, ``.``, ``_``, ``+`` and ``-`` written ``_``, at
    most 200 characters, never one of the run's own names (in any letter case) or a Windows device
    name (``NUL``), and a short hash of the original so two
    names that fold alike stay apart (``"Müller 2"`` -> ``Muller_2-1a2b3c``)."""
    if _SAFE_ID.match(name) and name.casefold() not in RESERVED_IDS and not _is_device_name(name):
        return name
    folded = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    cleaned = re.sub(r"[^A-Za-z0-9._+-]+", "_", folded).strip("._+-")[:185] or "case"
    return f"{cleaned}-{hashlib.sha256(name.encode('utf-8', 'surrogateescape')).hexdigest()[:6]}"


def cases_in_folder(folder: Path, pattern: str | None = None, skip: Path | None = None,
                    exclude: frozenset[Path] = frozenset()) -> list[Case]:
    """Every volume file and DICOM series folder under ``folder`` (sorted by id); ``skip``: a
    folder to leave out (the run's output folder when it lies inside the input); ``exclude``:
    resolved paths of files to leave out (outputs of earlier runs)."""
    found: dict[str, Path] = {}

    folded: dict[str, str] = {}

    def add(case_id: str, path: Path) -> None:
        case_id = safe_case_id(_case_id(case_id))
        first = folded.setdefault(case_id.casefold(), case_id)  # Case1 and case1: one file on Windows and macOS
        if first in found:
            raise InvalidInputError(
                f"two inputs would both be case {case_id!r}: {found[first]} and {path}. Rename one, or list the "
                "cases in a CSV with a 'case' column")
        found[case_id] = path

    skip = skip.resolve() if skip is not None else None
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (skip is None or (here / d).resolve() != skip))
        visible = sorted(f for f in files if not f.startswith("."))
        relative = here.relative_to(folder).as_posix()
        dicom = [f for f in visible if _volume_suffix(f) is None and is_dicom_file(here / f)]
        if dicom and (pattern is None or any(fnmatch.fnmatch(f, pattern) for f in dicom)):
            add(relative if relative != "." else folder.name, here)
        for name in visible:
            suffix = _volume_suffix(name)
            if suffix is None or (pattern is not None and not fnmatch.fnmatch(name, pattern)):
                continue
            if exclude and (here / name).resolve() in exclude:
                continue
            stem = name[: -len(suffix)]
            add(f"{relative}/{stem}" if relative != "." else stem, here / name)
    if not found:
        what = f"matching {pattern!r} " if pattern else ""
        raise InvalidInputError(
            f"no volume files {what}(.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd) and no DICOM series folders found "
            f"under {folder}")
    return [Case(case_id, path) for case_id, path in sorted(found.items())]


def cases_in_csv(path: Path, image_column: str = "image", reference_column: str | None = None,
                 case_column: str = "case") -> list[Case]:
    """The rows of a CSV list (see the module docstring), in the file's order."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
            header = rows[0].keys() if rows else []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InvalidInputError(f"cannot read the case list {path}: {exc}") from None
    if not rows:
        raise InvalidInputError(f"the case list {path} has no rows under its header")
    for column, option in ((image_column, "--image-column"), (reference_column, "--reference-column")):
        if column is not None and column not in header:
            raise InvalidInputError(f"the case list {path} has no column {column!r} ({option}); its columns are: "
                                    f"{', '.join(header)}")
    base = path.parent
    cases, seen = [], {}
    for line, row in enumerate(rows, start=2):
        image_text = (row.get(image_column) or "").strip()
        if not image_text:
            raise InvalidInputError(f"{path}, line {line}: the {image_column!r} column is empty")
        image = (base / image_text).expanduser() if not Path(image_text).is_absolute() else Path(image_text)
        reference = None
        if reference_column is not None and (row.get(reference_column) or "").strip():
            text = row[reference_column].strip()
            reference = base / text if not Path(text).is_absolute() else Path(text)
        given = (row.get(case_column) or "").strip() if case_column in header else ""
        if given:
            case_id = given
        else:
            name = image.name
            suffix = _volume_suffix(name) or ""
            case_id = name[: -len(suffix)] if suffix else name
        case_id = safe_case_id(case_id)
        if case_id.casefold() in seen:
            raise InvalidInputError(f"{path}, lines {seen[case_id.casefold()]} and {line} are both case {case_id!r} "
                                    f"(letter case aside); give each row its own id in a {case_column!r} column")
        seen[case_id.casefold()] = line
        cases.append(Case(case_id, image, reference))
    return cases


def discover_cases(source: str | os.PathLike, *, pattern: str | None = None, image_column: str = "image",
                   reference_column: str | None = None, case_column: str = "case",
                   skip: Path | None = None, exclude: frozenset[Path] = frozenset()) -> list[Case]:
    """The cases of a folder or a ``.csv`` list (see the module docstring).

    Raises:
        InvalidInputError: the source is missing, holds no case, or two inputs share an id.
    """
    p = Path(source).expanduser().resolve()
    if not p.exists():
        raise InvalidInputError(f"batch input {p} does not exist; give a folder of volumes or a .csv list")
    if p.is_file():
        if p.suffix.lower() != ".csv":
            raise InvalidInputError(f"batch input {p} is a file but not a .csv list; give a folder of volumes or a "
                                    "CSV with an image column (use `automedsam segment` for one volume)")
        return cases_in_csv(p, image_column, reference_column, case_column)
    if reference_column is not None:
        raise InvalidInputError("--reference-column needs a CSV list as input (a folder has no reference column)")
    return cases_in_folder(p, pattern, skip, exclude)
