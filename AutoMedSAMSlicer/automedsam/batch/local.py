"""Running cases on this machine: in this process (one worker), or in a pool of worker processes
(``concurrent.futures``, spawned, so CUDA and the CPU runtimes start clean in each), each with its
own model loaded once.

Sharing the machine (:func:`plan_slots`): with CUDA GPUs, one worker per GPU (``--workers`` more
share them round-robin); on the CPU, the cores divided evenly between the workers, each worker's
PyTorch and OpenVINO/ONNX Runtime threads set to its share, so two workers never fight over a core.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from ..errors import InvalidInputError
from .case_worker import BatchConfig, CaseWorker
from .cases import Case

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Slot:
    """Where one worker runs: its device and its CPU threads."""

    device: str
    threads: int


def cuda_devices() -> int:
    """Number of CUDA GPUs torch sees (0 without torch or CUDA)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plan_slots(device: str, workers: int | None, cores: int | None = None, gpus: int | None = None) -> list[Slot]:
    """The workers of a local run (see the module docstring).

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (N pins every worker to that GPU).
        workers: how many; None: one per GPU, else one.
        cores, gpus: what the machine has (default: this process's CPU affinity, torch's count).
    """
    from ..backbones.runtime import cpu_threads

    if workers is not None and workers < 1:
        raise InvalidInputError(f"--workers must be >= 1, got {workers}")
    cores = cores or cpu_threads()
    gpus = cuda_devices() if gpus is None else gpus
    if device.startswith("cuda") and gpus == 0:
        raise InvalidInputError(f"device {device!r} was requested but no CUDA GPU is available; "
                                "use --device cpu or auto")
    if device != "cpu" and gpus:
        n = workers or gpus
        threads = max(1, cores // n)
        if device.startswith("cuda:"):
            return [Slot(device, threads) for _ in range(n)]
        return [Slot(f"cuda:{i % gpus}", threads) for i in range(n)]
    n = workers or 1
    if n > cores:
        log.warning("%d CPU workers on %d cores: each gets one thread and they share cores", n, cores)
    return [Slot("cpu", max(1, cores // n)) for _ in range(n)]


def run_inline(config: BatchConfig, cases: Sequence[Case], run_key: str, slot: Slot,
               cancel: threading.Event | None = None) -> Iterator[dict]:
    """One worker in this process: yields each case's record as it is written. The thread setting
    it makes for its engine is this process's only while the run lasts."""
    from ..backbones.runtime import THREADS_ENV

    before = os.environ.get(THREADS_ENV)
    worker = CaseWorker(config, slot.device, slot.threads)
    try:
        for case in cases:
            if cancel is not None and cancel.is_set():
                return
            yield worker.process(case, run_key)
    finally:
        worker.close()
        if before is None:
            os.environ.pop(THREADS_ENV, None)
        else:
            os.environ[THREADS_ENV] = before


# A pool process's worker, made once by _start_worker (the pool's initializer).
_WORKER: CaseWorker | None = None


def _start_worker(config: BatchConfig, slots, log_level: int) -> None:
    global _WORKER
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s[%(process)d]: %(message)s")
    slot = slots.get()  # each process takes one slot (device, threads) of the plan
    _WORKER = CaseWorker(config, slot.device, slot.threads)


def _process(case: Case, run_key: str) -> dict:
    if _WORKER is None:  # the initializer failed: the pool reports that, this never runs
        raise RuntimeError("batch worker not started")
    return _WORKER.process(case, run_key)


def lost_case(case: Case, run_key: str, why: str) -> dict:
    """The record of a case whose worker died under it (killed, out of memory, a crash in native
    code): failed, and done again by the next run."""
    from .records import RECORD_VERSION

    return {"version": RECORD_VERSION, "case": case.id, "run_key": run_key, "input_fingerprint": case.fingerprint(),
            "image": str(case.image), "reference": str(case.reference) if case.reference else None,
            "status": "failed", "warnings": [], "seconds": None,
            "error": {"type": "WorkerLost", "message": why, "retryable": True}}


def run_pool(config: BatchConfig, cases: Sequence[Case], run_key: str, slots: Sequence[Slot],
             cancel: threading.Event | None = None) -> Iterator[dict]:
    """Cases spread over one process per slot; yields records as cases finish (any order). A
    worker that dies fails only the cases it had, which the next run does again."""
    import multiprocessing

    from .records import write_json_atomic

    context = multiprocessing.get_context("spawn")
    plan = context.Queue()
    for slot in slots:
        plan.put(slot)
    executor = ProcessPoolExecutor(len(slots), mp_context=context, initializer=_start_worker,
                                   initargs=(config, plan, logging.getLogger().getEffectiveLevel()))
    try:
        pending = {executor.submit(_process, case, run_key): case for case in cases}
        while pending:
            if cancel is not None and cancel.is_set():
                break
            finished, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for future in finished:
                case = pending.pop(future)
                try:
                    yield future.result()
                except BrokenProcessPool as exc:
                    record = lost_case(case, run_key, f"the worker process died ({exc or 'killed or out of memory'})")
                    write_json_atomic(config.layout.record(case.id), record)
                    yield record
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
