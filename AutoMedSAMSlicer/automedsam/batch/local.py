"""Running cases on this machine: in this process (one worker), or in a pool of worker processes
(spawned, so CUDA and the CPU runtimes start clean in each), each with its own model loaded once.
The pool is ours rather than ``concurrent.futures``' because a run must know which case each
process holds: one process dying then fails only that case, not every case still queued.

Sharing the machine (:func:`plan_slots`): with CUDA GPUs, one worker per GPU (``--workers`` more
share them round-robin); on the CPU, the cores divided evenly between the workers, each worker's
PyTorch and OpenVINO/ONNX Runtime threads set to its share, so two workers never fight over a core.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Sequence
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


def run_inline(config: BatchConfig, cases: Sequence[Case], run_key: str, deaths: dict[str, int], slot: Slot,
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
            yield worker.process(case, run_key, deaths.get(case.id, 0))
    finally:
        worker.close()
        if before is None:
            os.environ.pop(THREADS_ENV, None)
        else:
            os.environ[THREADS_ENV] = before


def lost_case(config: BatchConfig, case: Case, run_key: str, why: str) -> dict:
    """Record (and return) the end of a case whose worker died under it (killed, out of memory, a
    crash in native code): failed, and done again by the next run unless workers died on it
    :data:`~.records.MAX_DEATHS` times. A case the worker had finished keeps its record."""
    from .case_worker import write_record
    from .records import MAX_DEATHS, deaths_of, lost_record, read_record

    layout = config.layout
    claim = read_record(layout, case.id)
    if claim is not None and claim["status"] != "running" and claim["run_key"] == run_key:
        return claim  # it finished just before its worker went
    # The worker's claim already counts this death; without a claim (it died before writing one) add it.
    died = deaths_of(claim) if claim is not None and claim["status"] == "running" else deaths_of(claim) + 1
    layout.remove_claimed(case.id)
    record = lost_record(case, run_key, died, why + ("" if died < MAX_DEATHS else
                                                     f" ({died} times on this case; --retry-failed tries it again)"))
    write_record(layout, case.id, record)
    return record


def mark_interrupted(config: BatchConfig, case: Case) -> None:
    """A case whose worker this run stopped (Ctrl-C, SIGTERM): its claim stays, marked so the next
    run does it again without counting a death."""
    from .case_worker import write_record
    from .records import read_record

    claim = read_record(config.layout, case.id)
    if claim is not None and claim["status"] == "running":
        write_record(config.layout, case.id, claim | {"interrupted": True}, quiet=True)


def _watch_parent() -> None:
    """In a worker process: exit at once when the run's process is gone (even killed by SIGKILL;
    on every system: it waits on the parent's process handle, not on a pid), so no worker
    outlives its run, writing files or holding a model."""
    import multiprocessing
    from multiprocessing.connection import wait

    parent = multiprocessing.parent_process()
    if parent is not None:
        wait([parent.sentinel])
    os._exit(3)


def _pool_worker(config: BatchConfig, slot: Slot, tasks, results, log_level: int) -> None:
    """A pool process: loads the model once, then processes the cases it is sent, one at a time,
    until it is sent None. Messages to the run, on its own pipe: ``("ready"|"record"|"error",
    payload)``."""
    import signal

    def interrupted(signum, frame):
        raise KeyboardInterrupt  # the case marks its claim as interrupted, not as a death

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the run stops its workers
    signal.signal(signal.SIGTERM, interrupted)  # so does a scheduler's SIGTERM
    threading.Thread(target=_watch_parent, daemon=True).start()
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s[%(process)d]: %(message)s")
    try:
        worker = CaseWorker(config, slot.device, slot.threads)
    except Exception as exc:  # the run reports it
        results.send(("error", (type(exc).__name__, str(exc))))
        return
    results.send(("ready", os.getpid()))
    try:
        while (task := tasks.recv()) is not None:
            case, run_key, deaths = task
            try:
                results.send(("record", worker.process(case, run_key, deaths)))
            except Exception as exc:  # e.g. the output folder became unwritable
                results.send(("error", (type(exc).__name__, str(exc))))
                return
    except (KeyboardInterrupt, EOFError):
        return
    finally:
        worker.close()


class _PoolProcess:
    """One worker process of :func:`run_pool` with a pipe each way of its own: the run always
    knows which case each process holds, and a process killed while writing cannot block the
    others (as it could holding a shared queue's lock)."""

    def __init__(self, context, config: BatchConfig, slot: Slot):
        tasks_end, self.tasks = context.Pipe(duplex=False)  # (reader there, writer here)
        self.results, results_end = context.Pipe(duplex=False)  # (reader here, writer there)
        self.process = context.Process(target=_pool_worker, name="automedsam-batch", daemon=True,
                                       args=(config, slot, tasks_end, results_end,
                                             logging.getLogger().getEffectiveLevel()))
        self.process.start()
        tasks_end.close()
        results_end.close()
        self.case: Case | None = None
        self.ready = False

    def send(self, case: Case, run_key: str, deaths: int) -> None:
        self.case = case
        self.tasks.send((case, run_key, deaths))

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the process to end; terminate it if it is busy or does not end in time."""
        if self.process.is_alive() and self.case is None:
            with contextlib.suppress(OSError):
                self.tasks.send(None)
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout)
        self.tasks.close()
        self.results.close()


def run_pool(config: BatchConfig, cases: Sequence[Case], run_key: str, deaths: dict[str, int],
             slots: Sequence[Slot], cancel: threading.Event | None = None) -> Iterator[dict]:
    """Cases spread over one process per slot, each sent one case at a time; yields records as
    cases finish (any order). A worker that dies fails only the case it held (done again by the
    next run, unless workers died on it :data:`~.records.MAX_DEATHS` times) and is replaced; the
    others go on. When the run stops (the consumer stops, Ctrl-C, SIGTERM, ``cancel``) every
    worker is stopped before this returns, and the cases they held keep claims, marked
    interrupted, that the next run redoes."""
    import multiprocessing
    from multiprocessing.connection import wait

    from ..errors import AutoMedSAMError
    from .records import read_record

    context = multiprocessing.get_context("spawn")
    pool: list[_PoolProcess] = []
    waiting = list(cases)
    remaining = len(cases)
    failed_starts = 0
    try:
        pool.extend(_PoolProcess(context, config, slot) for slot in slots)
        while remaining:
            if cancel is not None and cancel.is_set():
                return
            for member in pool:
                if member.ready and member.case is None and waiting:
                    case = waiting.pop(0)
                    member.send(case, run_key, deaths.get(case.id, 0))
            ready = wait([m.results for m in pool] + [m.process.sentinel for m in pool], timeout=0.5)
            for i, member in enumerate(pool):
                message = None
                if member.results in ready:
                    try:
                        message = member.results.recv()
                    except (EOFError, OSError):  # its end closed: it exited or was killed
                        member.process.join(5)
                if message is not None:
                    kind, payload = message
                    if kind == "ready":
                        member.ready = True
                    elif kind == "record":
                        if member.case is not None and payload.get("case") == member.case.id:
                            member.case = None
                            remaining -= 1
                            yield payload
                    else:
                        name, text = payload
                        raise (InvalidInputError if name in ("InvalidInputError", "OutputFolderError")
                               else AutoMedSAMError)(f"a batch worker stopped: {text}")
                    continue
                if member.process.exitcode is None:
                    continue  # alive (a message it sent before dying is read first, above)
                lost, member.case = member.case, None
                if not member.ready:
                    failed_starts += 1
                    if failed_starts > len(pool):
                        raise AutoMedSAMError(f"batch worker processes die while loading the model (exit code "
                                              f"{member.process.exitcode}); run with --workers 1 to see why")
                if lost is not None:
                    remaining -= 1
                    claim = read_record(config.layout, lost.id)
                    if claim is None or claim["status"] != "running" or not claim.get("interrupted"):
                        yield lost_case(config, lost, run_key,
                                        f"the worker process died (exit code {member.process.exitcode}: killed, "
                                        "out of memory or a crash)")
                member.stop()
                if remaining:
                    log.warning("a batch worker died; starting another")
                    pool[i] = _PoolProcess(context, config, slots[i])
    finally:
        for member in pool:
            member.stop()
            if member.case is not None:
                mark_interrupted(config, member.case)
