"""A batch run from start to end: check the model and classes, find the cases, skip the finished
ones, run the rest (in this process, a local pool or on Ray) and write the report.

:func:`run_batch` is a generator of :class:`BatchEvent` (progress and cancel for free, as the
engine's long runs): a ``"start"`` event, one ``"case"`` event per case finished in this run, and a
``"done"`` event with the report. The report is written also when the run is interrupted (Ctrl-C,
SIGTERM, a consumer that stops iterating, ``cancel``), from every record on disk, so it always
describes the output folder as it is.

The folder is the user's as much as the run's: one run at a time holds it (:mod:`.lock`), and
before any work the run refuses outputs that would land on an input and files with its output
names that it did not write (:mod:`.records`), unless ``overwrite``.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import InvalidInputError
from ..io import writable_folder
from .case_worker import BatchConfig, OutputFolderError
from .cases import Case, discover_cases
from .lock import OutputLock
from .records import (
    MAX_DEATHS,
    RECORD_VERSION,
    deaths_of,
    finished,
    foreign_outputs,
    lost_record,
    read_record,
    recorded_outputs,
)
from .report import REPORT_FILES, foreign_report_files, write_report

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchEvent:
    """One step of a batch run.

    Attributes:
        stage: ``"start"``, ``"case"`` (a case finished, ``record`` is its record) or ``"done"``.
        done: cases finished in this run so far; ``total``: cases this run has to do.
        skipped: cases already finished by an earlier run (not done again).
        failed: cases of this run that failed so far.
        report: on ``"done"``, the JSON report (see :mod:`.report`).
    """

    stage: str
    done: int
    total: int
    skipped: int = 0
    failed: int = 0
    record: dict | None = None
    report: dict | None = None
    message: str = ""

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


def _model_digest(path: Path) -> str:
    """sha256 of the bundle: the .zip's bytes, or a folder's file names and bytes."""
    from ..download import sha256_file

    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        digest.update(f"{p.relative_to(path).as_posix()}|{sha256_file(p)}".encode())
    return digest.hexdigest()


def prepare(config: BatchConfig) -> tuple[BatchConfig, str]:
    """Check, before any case, what would otherwise fail in every worker: the bundle loads, it
    knows every class, its backbone's weights are here. Returns the config with the classes as
    the bundle spells them, and the run key (what a record must carry to count as this run's).

    Raises:
        InvalidInputError: a missing or broken bundle, an unknown or repeated class.
        WeightsUnavailableError: the backbone's weights are not installed.
    """
    from ..backbones import cached_weights
    from ..bundle import load_bundle
    from ..classes import ClassCatalog
    from ..models import BackboneCatalog

    model = Path(config.model).expanduser()
    if not model.exists():
        raise InvalidInputError(f"--model {model} does not exist (a model bundle .zip or folder)")
    bundle = load_bundle(model)
    catalog = ClassCatalog(bundle.classes)
    names = []
    for given in config.classes:
        bundle.class_index(given)  # says which classes the bundle has
        names.append(catalog.get(given).name)
    if len(set(names)) != len(names):
        raise InvalidInputError(f"--classes names a class twice ({', '.join(config.classes)})")
    values = None
    if config.reference_values is not None:
        values = {catalog.get(k).name: v for k, v in config.reference_values.items()}
    if not bundle.backbone_weights.startswith("random:"):
        backbones = BackboneCatalog.load()
        cached_weights(backbones.get(bundle.backbone_id), backbones)
    config = replace(config, model=model.resolve(), classes=tuple(names), reference_values=values,
                     output=Path(config.output).expanduser().resolve())
    key = "|".join([str(RECORD_VERSION), _model_digest(model), ",".join(names), config.format,
                    str(config.cleanup), str(sorted((values or {}).items())), str(config.tolerance_mm)])
    return config, hashlib.sha256(key.encode()).hexdigest()[:24]


def _check_outputs(config: BatchConfig, cases: list[Case], todo: list[Case]) -> None:
    """Before any work: no output may land on an input, and without ``--overwrite`` no file with
    an output's name may be one this tool did not write (see :mod:`.records`).

    Raises:
        InvalidInputError: names the files and what to do.
    """
    layout = config.layout
    out = config.output.resolve()
    inputs: dict[Path, str] = {}
    for case in cases:
        for path in (case.image, case.reference):
            if path is None:
                continue
            resolved = path.resolve()
            if resolved.is_dir() and out == resolved:  # its files would become part of the series folder
                raise InvalidInputError(f"--output {config.output} is the DICOM folder of case {case.id}; choose "
                                        "another output folder (a subfolder is fine)")
            inputs[resolved] = case.id
    for case in cases:
        for path in (*layout.outputs(case.id), *(config.output / n for n in REPORT_FILES)):
            if path.resolve() in inputs:
                raise InvalidInputError(
                    f"the output {path} of case {case.id} would replace the input of case {inputs[path.resolve()]}; "
                    "choose another --output folder (or --format)")
    if config.overwrite:
        return
    found = [p for case in todo for p in foreign_outputs(layout, case.id)] + foreign_report_files(config.output)
    if found:
        shown = ", ".join(str(p) for p in found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise InvalidInputError(
            f"{config.output} holds {len(found)} file(s) with the names this run would write that it did not write "
            f"itself ({shown}); nothing was changed. Choose another --output folder, move them, or pass --overwrite "
            "to replace them")


def _plan(config: BatchConfig, cases: list[Case], run_key: str) -> tuple[list[Case], dict[str, dict], dict]:
    """Which cases to do (those whose run died on them last), the finished records, and how many
    runs died on each case to do. A case the run died on :data:`MAX_DEATHS` times is recorded as
    failed (unless ``retry_failed``) so it cannot stop the rest of every rerun."""
    layout = config.layout
    todo, last, records, deaths = [], [], {}, {}
    foreign = []
    for case in cases:
        record = read_record(layout, case.id)
        if finished(record, layout, case.fingerprint(), run_key, config.retry_failed, config.preview):
            records[case.id] = record
            continue
        if record is not None and record.get("run_key") != run_key and record.get("status") == "done":
            foreign.append(case.id)  # results of another configuration: never replaced unasked
        died = deaths_of(record)
        if died >= MAX_DEATHS and not config.retry_failed and record["input_fingerprint"] == case.fingerprint():
            records[case.id] = record if record["status"] == "failed" else _died_twice(config, case, run_key, died)
            continue
        if died:
            deaths[case.id] = died
            last.append(case)
            continue
        todo.append(case)
    if foreign and not config.overwrite:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise InvalidInputError(
            f"{config.output} holds results of {len(foreign)} case(s) made with another model, classes or settings "
            f"({shown}); use another --output folder, or --overwrite to redo them with this configuration")
    return todo + last, records, deaths


def _died_twice(config: BatchConfig, case: Case, run_key: str, died: int) -> dict:
    from .case_worker import write_record

    config.layout.remove_claimed(case.id)
    record = lost_record(case, run_key, died, f"the batch process died {died} times while segmenting this case "
                                              "(killed, out of memory or a crash in native code); --retry-failed "
                                              "tries it again")
    write_record(config.layout, case.id, record)
    return record


def _records_on_disk(config: BatchConfig, cases: list[Case]) -> dict[str, dict]:
    """Every case's record as the folder holds it now (a claim counts as no record)."""
    found = {}
    for case in cases:
        record = read_record(config.layout, case.id)
        if record is not None and record["status"] != "running":
            found[case.id] = record
    return found


def run_batch(config: BatchConfig, source: str | Path, *, pattern: str | None = None, image_column: str = "image",
              reference_column: str | None = None, case_column: str = "case", workers: int | None = None,
              ray: str | None = None, cancel: threading.Event | None = None) -> Iterator[BatchEvent]:
    """Segment every case of ``source`` (a folder or a CSV list; see :mod:`.cases`) into
    ``config.output``. Events as in the module docstring.

    Args:
        workers: local worker processes (default: one per GPU, else one), or Ray actors.
        ray: None (this machine), ``"local"``, ``"auto"`` or a cluster address (:mod:`.ray_cluster`).

    Raises:
        InvalidInputError: before any work, for a bad model, classes, input or output folder
            (files there this run did not write, another run holding it); during the run, an
            output folder that can no longer be written (:class:`~.case_worker.OutputFolderError`).
    """
    config, run_key = prepare(config)
    writable_folder(config.output, "--output", "the batch's outputs")
    with OutputLock(config.output):
        cases = discover_cases(source, pattern=pattern, image_column=image_column,
                               reference_column=reference_column, case_column=case_column, skip=config.output,
                               exclude=frozenset(recorded_outputs(config.layout)))
        todo, records, deaths = _plan(config, cases, run_key)
        _check_outputs(config, cases, todo)
        yield from _run(config, source, cases, todo, records, deaths, run_key, workers, ray, cancel)


def _run(config: BatchConfig, source, cases: list[Case], todo: list[Case], records: dict[str, dict], deaths: dict,
         run_key: str, workers: int | None, ray: str | None, cancel: threading.Event | None) -> Iterator[BatchEvent]:
    skipped = len(records)
    yield BatchEvent("start", 0, len(todo), skipped, message=f"{len(cases)} cases: {skipped} finished earlier, "
                                                               f"{len(todo)} to do")
    started = time.perf_counter()
    done = failed = 0
    backend = "none"
    completed = False

    def report() -> dict:
        seconds = time.perf_counter() - started
        final = _records_on_disk(config, cases)
        summary = {"cases": len(cases), "done": sum(r["status"] == "done" for r in final.values()),
                   "failed": sum(r["status"] != "done" for r in final.values()), "skipped": skipped,
                   "processed": done, "seconds": round(seconds, 2),
                   "cases_per_min": round(60.0 * done / seconds, 3) if done and seconds > 0 else None,
                   "backend": backend, "complete": completed and len(final) == len(cases)}
        run = {"model": str(config.model), "classes": list(config.classes), "format": config.format,
               "device": config.device, "run_key": run_key, "source": str(source)}
        return write_report(config.layout, [final[c.id] for c in cases if c.id in final], config.classes, run,
                            summary)

    stream = None
    try:
        if todo:
            stream, backend = _backend(config, todo, run_key, deaths, workers, ray, cancel)
            for record in stream:
                done += 1
                failed += record["status"] != "done"
                yield BatchEvent("case", done, len(todo), skipped, failed, record=record)
        completed = cancel is None or not cancel.is_set()
    except BaseException:
        if stream is not None:
            stream.close()  # the workers stop (and their cases' claims are marked) before the report
        try:  # the report describes the folder as the interruption left it
            report()
        except OSError as exc:
            log.warning("the batch report could not be written: %s", exc)
        raise
    try:
        final = report()
    except OSError as exc:
        raise OutputFolderError(config.output, exc) from None
    yield BatchEvent("done", done, len(todo), skipped, failed, report=final)


def _backend(config: BatchConfig, todo: list[Case], run_key: str, deaths: dict, workers: int | None,
             ray: str | None, cancel: threading.Event | None):
    """The record stream of the chosen way of running, and its name for the report."""
    if ray is not None:
        from .ray_cluster import run_on_ray

        return run_on_ray(config, todo, run_key, deaths, ray, workers, cancel), f"ray:{ray}"
    from .local import plan_slots, run_inline, run_pool

    slots = plan_slots(config.device, workers)
    name = f"{len(slots)} x {slots[0].device} ({slots[0].threads} threads)"
    if len(slots) == 1:
        return run_inline(config, todo, run_key, deaths, slots[0], cancel), f"local: {name}"
    return run_pool(config, todo, run_key, deaths, slots, cancel), f"local: {name}"
