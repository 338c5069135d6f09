"""A batch run from start to end: check the model and classes, find the cases, skip the finished
ones, run the rest (in this process, a local pool or on Ray) and write the report.

:func:`run_batch` is a generator of :class:`BatchEvent` (progress and cancel for free, as the
engine's long runs): a ``"start"`` event, one ``"case"`` event per case finished in this run, and a
``"done"`` event with the report. The report is written also when the run is interrupted (Ctrl-C,
a consumer that stops iterating, ``cancel``), from every record there is, so it always describes
the output folder as it is.
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
from .case_worker import BatchConfig
from .cases import Case, discover_cases
from .records import RECORD_VERSION, finished, read_record
from .report import write_report

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


def _output_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise InvalidInputError(f"--output {folder} is a file; give a folder for the batch's outputs")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{time.time_ns()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InvalidInputError(f"cannot write into the output folder {folder}: {exc}") from None


def run_batch(config: BatchConfig, source: str | Path, *, pattern: str | None = None, image_column: str = "image",
              reference_column: str | None = None, case_column: str = "case", workers: int | None = None,
              ray: str | None = None, cancel: threading.Event | None = None) -> Iterator[BatchEvent]:
    """Segment every case of ``source`` (a folder or a CSV list; see :mod:`.cases`) into
    ``config.output``. Events as in the module docstring.

    Args:
        workers: local worker processes (default: one per GPU, else one), or Ray actors.
        ray: None (this machine), ``"local"``, ``"auto"`` or a cluster address (:mod:`.ray_cluster`).
    """
    config, run_key = prepare(config)
    _output_folder(config.output)
    cases = discover_cases(source, pattern=pattern, image_column=image_column, reference_column=reference_column,
                           case_column=case_column, skip=config.output)
    layout = config.layout
    todo: list[Case] = []
    records: dict[str, dict] = {}
    foreign = []
    for case in cases:
        record = read_record(layout, case.id)
        if finished(record, layout, case.fingerprint(), run_key, config.retry_failed):
            records[case.id] = record
            continue
        if record is not None and record.get("run_key") != run_key and record.get("status") == "done":
            foreign.append(case.id)  # results of another configuration: never replaced unasked
        todo.append(case)
    if foreign and not config.overwrite:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise InvalidInputError(
            f"{config.output} holds results of {len(foreign)} case(s) made with another model, classes or settings "
            f"({shown}); use another --output folder, or --overwrite to redo them with this configuration")
    skipped = len(records)
    yield BatchEvent("start", 0, len(todo), skipped, message=f"{len(cases)} cases: {skipped} finished earlier, "
                                                               f"{len(todo)} to do")
    started = time.perf_counter()
    done = failed = 0
    backend = "none"
    completed = False
    try:
        if todo:
            stream, backend = _backend(config, todo, run_key, workers, ray, cancel)
            for record in stream:
                records[record["case"]] = record
                done += 1
                failed += record["status"] != "done"
                yield BatchEvent("case", done, len(todo), skipped, failed, record=record)
        completed = cancel is None or not cancel.is_set()
    finally:
        seconds = time.perf_counter() - started
        summary = {"cases": len(cases), "done": sum(r["status"] == "done" for r in records.values()),
                   "failed": sum(r["status"] != "done" for r in records.values()), "skipped": skipped,
                   "processed": done, "seconds": round(seconds, 2),
                   "cases_per_min": round(60.0 * done / seconds, 3) if done and seconds > 0 else None,
                   "backend": backend, "complete": completed and len(records) == len(cases)}
        run = {"model": str(config.model), "classes": list(config.classes), "format": config.format,
               "device": config.device, "run_key": run_key, "source": str(source)}
        report = write_report(config.output, [records[c.id] for c in cases if c.id in records], config.classes,
                              run, summary)
    yield BatchEvent("done", done, len(todo), skipped, failed, report=report)


def _backend(config: BatchConfig, todo: list[Case], run_key: str, workers: int | None, ray: str | None,
             cancel: threading.Event | None):
    """The record stream of the chosen way of running, and its name for the report."""
    if ray is not None:
        from .ray_cluster import run_on_ray

        return run_on_ray(config, todo, run_key, ray, workers, cancel), f"ray:{ray}"
    from .local import plan_slots, run_inline, run_pool

    slots = plan_slots(config.device, workers)
    name = f"{len(slots)} x {slots[0].device} ({slots[0].threads} threads)"
    if len(slots) == 1:
        return run_inline(config, todo, run_key, slots[0], cancel), f"local: {name}"
    return run_pool(config, todo, run_key, slots, cancel), f"local: {name}"
