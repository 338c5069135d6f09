"""One batch worker: the model loaded once, then one case after another.

The same :class:`CaseWorker` runs every case whether the run is in this process, in a local
process pool or in a Ray actor on another machine; it writes the case's files itself (see
:mod:`.records`), so what a worker finished survives the end of the run that started it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import AutoMedSAMError, InvalidInputError
from .cases import Case
from .records import FORMATS, OutputLayout, new_record, write_json_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchConfig:
    """What a batch run does to every case.

    Attributes:
        model: the model bundle (``.zip`` or folder) every worker loads once.
        classes: class names as given (catalog spellings and aliases resolve, e.g. ``kidney_left``).
        output: the output folder (created if missing).
        reference_values: class name -> label value in the reference label maps; None: value N
            for the N-th class (the order of ``classes``), or the segment of that name in a
            ``.seg.nrrd`` reference.
        format: ``"seg.nrrd"`` (named, coloured, terminology-coded segments) or ``"nifti"`` (a
            ``.nii.gz`` label map, values 1..N in the order of ``classes``).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        cleanup: keep each class's largest 3-D connected component (as ``automedsam segment``).
        preview: write ``previews/<id>.png`` per case.
        tolerance_mm: NSD tolerance in millimetres.
        retry_failed: do failed cases again even if their input is unchanged.
        overwrite: redo cases finished under another configuration (another model or classes), and
            replace files with the run's output names that it did not write (see :mod:`.records`),
            instead of refusing to touch them. Inputs are never replaced.
    """

    model: Path
    classes: tuple[str, ...]
    output: Path
    reference_values: dict[str, int] | None = None
    format: str = "seg.nrrd"
    device: str = "auto"
    cleanup: bool = True
    preview: bool = True
    tolerance_mm: float = 2.0
    retry_failed: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise InvalidInputError(f"output format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if not self.classes:
            raise InvalidInputError("no classes given (e.g. --classes liver,spleen)")
        if not (np.isfinite(self.tolerance_mm) and self.tolerance_mm >= 0):
            raise InvalidInputError(f"the NSD tolerance must be a finite number of mm >= 0, got {self.tolerance_mm}")

    @property
    def layout(self) -> OutputLayout:
        return OutputLayout(self.output, self.format)


class OutputFolderError(InvalidInputError):
    """The output folder cannot be written (permissions changed, disk full, unmounted): the run
    stops; every finished case is kept."""

    def __init__(self, folder: Path, exc: OSError):
        super().__init__(f"cannot write into the output folder {folder}: {exc.strerror or exc}. The run stopped; "
                         "the cases finished so far are kept. Make the folder writable (or free space) and run the "
                         "same command again to do the rest")


def _in_folder(exc: BaseException, folder: Path, missing: bool = False) -> bool:
    """An OSError about a file in the output folder: one that cannot be written, or with
    ``missing``, one that vanished (a temporary file another program removed)."""
    if not isinstance(exc, OSError) or exc.filename is None or isinstance(exc, FileNotFoundError) != missing:
        return False
    try:
        return Path(exc.filename).resolve().is_relative_to(folder.resolve())
    except (OSError, ValueError, TypeError):
        return False


def write_record(layout: OutputLayout, case_id: str, record: dict, quiet: bool = False) -> None:
    """Write a case's record (or claim); an unwritable folder is :class:`OutputFolderError`
    (ignored with ``quiet``, for the last words of an interrupted case)."""
    try:
        layout.folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(layout.record(case_id), record)
    except OSError as exc:
        if not quiet:
            raise OutputFolderError(layout.folder, exc) from None


class CaseWorker:
    """Holds one engine (the bundle's backbone and prompt network, on ``device`` with ``threads``
    CPU threads) and segments, scores, previews and records one case per :meth:`process` call."""

    def __init__(self, config: BatchConfig, device: str | None = None, threads: int | None = None):
        from ..backbones.runtime import THREADS_ENV
        from ..engine import Engine, EngineConfig

        if threads is not None:
            # Read by build_backbone (torch) and the compiled CPU runtimes alike.
            os.environ[THREADS_ENV] = str(threads)
        self.config = config
        self.engine = Engine.from_bundle(config.model, device or config.device, EngineConfig(
            cleanup="largest_component" if config.cleanup else "none"))
        self.classes = [self.engine.class_info(name) for name in config.classes]
        self.where = {"host": socket.gethostname(), "pid": os.getpid(), "device": str(self.engine.backbone.device),
                      "threads": threads}

    def process(self, case: Case, run_key: str, deaths: int = 0) -> dict:
        """Segment one case and write its files; returns its record. A bad case (unreadable, not
        3-D, a reference that does not fit) is recorded as failed with the reason, never raised.

        Args:
            deaths: how many earlier runs died while on this case (carried in its claim).

        Raises:
            OutputFolderError: the output folder cannot be written (nothing of the case is kept).
        """
        layout = self.config.layout
        try:
            layout.remove_temporary(case.id)
        except OSError as exc:
            raise OutputFolderError(layout.folder, exc) from None
        started = time.perf_counter()
        record = new_record(case, run_key) | {"worker": self.where, "warnings": []}
        claim = record | {"status": "running", "deaths": deaths, "interrupted": False,
                          "outputs": layout.claimed_names(case.id)}
        write_record(layout, case.id, claim)  # from here the case's output names are ours to replace
        try:
            record |= self._segment(case, layout, record["warnings"])
            record["status"] = "done"
        except Exception as exc:  # one bad case never stops the others: its reason goes into its record
            if _in_folder(exc, layout.folder):  # the run stops here: not a death of this case
                write_record(layout, case.id, claim | {"interrupted": True}, quiet=True)
                raise OutputFolderError(layout.folder, exc) from None
            known = isinstance(exc, (AutoMedSAMError, ValueError, OSError, MemoryError))
            if not known:
                log.exception("case %s failed unexpectedly", case.id)
            layout.remove_claimed(case.id)
            record |= {"status": "failed", "error": {"type": type(exc).__name__, "message": str(exc) or repr(exc),
                                                     "retryable": isinstance(exc, MemoryError)
                                                     or _in_folder(exc, layout.folder, missing=True)}}
        except BaseException:  # Ctrl-C, SIGTERM: the claim stays, marked as an interruption, not a death
            write_record(layout, case.id, claim | {"interrupted": True}, quiet=True)
            raise
        record["seconds"] = round(time.perf_counter() - started, 3)
        write_record(layout, case.id, record)
        return record

    def _segment(self, case: Case, layout: OutputLayout, warnings: list[str]) -> dict:
        from ..contract import result_of
        from ..download import sha256_file
        from ..io import read_image, read_segmentation, write_segmentation
        from ..metrics import evaluate_masks, reference_masks

        volume = read_image(case.image)
        if volume.is_rgb:
            raise InvalidInputError(f"{case.image} is a colour picture, not a scan")
        self.engine.set_volume(volume)
        result = result_of(self.engine.segment([c.name for c in self.classes]))
        self.engine.messages.clear()
        summary = result.summary()["classes"]
        output = layout.segmentation(case.id)
        write_segmentation(result.to_segmentation(), output)
        if self.config.format == "nifti":
            covered = sum(m.astype(np.uint8) for m in result.masks.values())
            shared = int(np.count_nonzero(covered > 1)) if len(result.masks) > 1 else 0
            if shared:
                warnings.append(f"{shared} voxels belong to more than one class; the label map keeps the later class "
                                "(in --classes order) there, the scores and volumes count each class's own mask")
        scores = None
        if case.reference is not None:
            values = self.config.reference_values or {}
            wanted = {c.name: values.get(c.name, n) for n, c in enumerate(self.classes, start=1)}
            try:
                reference = reference_masks(read_segmentation(case.reference), wanted, volume)
                scores = evaluate_masks(result.masks, reference, tuple(reversed(volume.spacing)),
                                        self.config.tolerance_mm)
            except (AutoMedSAMError, ValueError, OSError) as exc:  # the segmentation stands; the score is missing
                warnings.append(f"reference {case.reference} not scored: {exc}")
            else:
                for name in scores["absent"]:
                    warnings.append(f"{name} is in neither the prediction nor the reference (label "
                                    f"{wanted[name]}); a wrong label value?")
                for name, s in scores["classes"].items():
                    summary[name] |= {"dsc": s["dsc"], "nsd": s["nsd"], "reference_voxels": s["ref_voxels"]}
        preview = None
        if self.config.preview:
            preview = layout.preview(case.id)
            preview.parent.mkdir(parents=True, exist_ok=True)
            self._write_preview(preview, case, volume, result.masks, summary)
        return {"output": output.name, "output_sha256": sha256_file(output),
                "preview": layout.preview_link(case.id) if preview else None,
                "preview_sha256": sha256_file(preview) if preview else None,
                "size_ijk": list(volume.shape_ijk), "spacing_mm": [round(s, 4) for s in volume.spacing],
                "classes": summary, "mean": scores["mean"] if scores else None}

    def _write_preview(self, path: Path, case: Case, volume, masks: dict, summary: dict) -> None:
        from ..preview import write_preview

        def line(name: str) -> str:
            s = summary[name]
            score = f", DSC {s['dsc']:.3f}" if "dsc" in s else ""
            return f"{name}: {s['volume_ml']:.1f} mL{score}"

        write_preview(path, volume, masks, {c.name: c.color for c in self.classes}, title=case.id,
                      lines=["; ".join(line(c.name) for c in self.classes)],
                      intensity=self.engine.bundle.intensity if self.engine.bundle else None)

    def close(self) -> None:
        self.engine.close()
