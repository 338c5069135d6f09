"""Sessions, jobs and the single model thread of the worker.

All model work (encoding, decoding, propagation) runs on one persistent executor thread: CUDA and
cuDNN state is per thread, and one queue keeps GPU memory predictable. HTTP handlers only enqueue
work and read job state, so the server answers status requests while a job runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..errors import AutoMedSAMError, NotFoundError, ServiceLimitError
from .protocol import error_status, result_to_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceSettings:
    """Limits and defaults of a worker."""

    token: str
    device: str = "auto"
    max_upload_mb: int = 1024
    max_bundle_mb: int = 1024
    max_sessions: int = 8
    max_queued_jobs: int = 16
    session_ttl_s: float = 3600.0
    #: Folders sessions may load bundles from (the first also receives uploads and trained
    #: bundles); empty: ``$AUTOMEDSAM_HOME/bundles``.
    bundle_dirs: tuple[str, ...] = ()
    #: URL prefixes a download request may name besides the catalog's own URLs.
    mirrors: tuple[str, ...] = ()
    #: Overall deadline of one weights download (seconds).
    download_deadline_s: float = 3600.0

    def __post_init__(self) -> None:
        from ..download import check_mirror

        for mirror in self.mirrors:
            check_mirror(mirror)

    def bundle_folders(self) -> list:
        from pathlib import Path

        from ..models import automedsam_home

        return [Path(d) for d in self.bundle_dirs] or [automedsam_home() / "bundles"]


@dataclass
class Session:
    id: str
    engine: object
    model_key: tuple
    labels: np.ndarray | None = None
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: The masks of the session's latest finished segmentation or propagation job, until the
    #: client fetched them (``(job id, {class name: (K, J, I) bool})``); one job's, so they stay bounded.
    last_masks: tuple[str, dict] | None = None


@dataclass
class Job:
    id: str
    session_id: str
    kind: str
    state: str = "queued"  # queued, running, done, cancelled, failed
    done: int = 0
    total: int = 0
    message: str = ""
    partial: dict = field(default_factory=dict)
    error: dict | None = None
    result: dict = field(default_factory=dict)
    cancel: threading.Event = field(default_factory=threading.Event)
    future: Future | None = None

    def to_dict(self) -> dict:
        return {"id": self.id, "session_id": self.session_id, "kind": self.kind, "state": self.state,
                "done": self.done, "total": self.total, "fraction": self.done / self.total if self.total else 0.0,
                "message": self.message, "partial": self.partial, "error": self.error,
                "result": self.result}


class WorkerState:
    """Everything the service holds: models, sessions, jobs and the model thread."""

    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="automedsam-model")
        self.sessions: dict[str, Session] = {}
        self.jobs: dict[str, Job] = {}
        self.models: dict[tuple, tuple] = {}
        self.lock = threading.Lock()
        self._creating = 0  # sessions being built: they count against the limit already
        from .bundles import BundleStore

        self.bundles = BundleStore(settings.bundle_folders(), settings.max_bundle_mb * 2**20)

    # ------------------------------------------------------------------------- model thread
    def run(self, fn, *args, timeout: float | None = None):
        """Run ``fn`` on the model thread and wait for it."""
        return self.executor.submit(fn, *args).result(timeout)

    async def run_async(self, fn, *args):
        """Run ``fn`` on the model thread without blocking the event loop."""
        return await asyncio.wrap_future(self.executor.submit(fn, *args))

    def shutdown(self) -> None:
        for job in self.jobs.values():
            job.cancel.set()
        self.executor.shutdown(wait=False, cancel_futures=True)

    # ----------------------------------------------------------------------------- sessions
    def expire(self) -> None:
        now = time.monotonic()
        with self.lock:
            expired = [s.id for s in self.sessions.values() if now - s.last_used > self.settings.session_ttl_s]
            for sid in expired:
                log.info("session %s expired", sid)
                self.sessions.pop(sid, None)
            if expired:
                self._forget_unused_models()
        if expired:
            self._after_sessions_ended()

    def create_session(self, bundle: str | None, backbone: str | None, device: str | None) -> Session:
        """Build a session's engine on the model thread. The slot is reserved under the lock
        before the (slow) build, so parallel requests cannot pass the session limit."""
        self.expire()
        with self.lock:
            if len(self.sessions) + self._creating >= self.settings.max_sessions:
                raise ServiceLimitError(f"the worker holds its maximum of {self.settings.max_sessions} sessions; "
                                        "delete one or wait for idle ones to expire")
            self._creating += 1
        try:
            path = str(self.bundles.resolve(bundle)) if bundle else None
            engine, key = self.run(self._build_engine, path, backbone, device or self.settings.device)
            session = Session(secrets.token_hex(8), engine, key)
            with self.lock:
                self.sessions[session.id] = session
        finally:
            with self.lock:
                self._creating -= 1
        return session

    def _build_engine(self, bundle_path: str | None, backbone: str | None, device: str):
        """An engine on a cached model (model thread only); returns it with its cache key."""
        from ..engine import Engine

        # A bundle rewritten under the same name (a class taught again) is a new model.
        stamp = (os.stat(bundle_path).st_mtime_ns, os.stat(bundle_path).st_size) if bundle_path else None
        key = (bundle_path, stamp, backbone, device)
        engine = self.models.get(key)  # a local reference: a session deleted meanwhile may evict the key
        if engine is None:
            from ..bundle import load_bundle

            if bundle_path:
                engine = Engine.from_bundle(load_bundle(bundle_path, self.bundles.max_weights_bytes), device)
            else:  # manual mode on the given backbone, or the default one
                engine = Engine.manual(backbone, device)
            self.models[key] = engine
        return engine.sibling(), key

    def _forget_unused_models(self) -> None:
        """Drop cached models no session uses any more (called with ``self.lock`` held), so memory
        follows the open sessions instead of every bundle ever opened."""
        used = {s.model_key for s in self.sessions.values()}
        for key in [k for k in self.models if k not in used]:
            self.models.pop(key, None)

    def session(self, sid: str) -> Session:
        self.expire()
        s = self.sessions.get(sid)
        if s is None:
            raise NotFoundError(f"no session {sid!r} (it may have expired after {self.settings.session_ttl_s:.0f} s "
                                "idle); create a new one")
        s.last_used = time.monotonic()
        return s

    def delete_session(self, sid: str) -> None:
        with self.lock:
            if self.sessions.pop(sid, None) is None:
                raise NotFoundError(f"no session {sid!r}")
            self._forget_unused_models()
            jobs = list(self.jobs.values())
        for job in jobs:
            if job.session_id == sid:
                job.cancel.set()
        self._after_sessions_ended()

    def _after_sessions_ended(self) -> None:
        """Forget the finished jobs of sessions that are gone and give the memory the session's
        engine held back to the system, on the model thread (after any job still running there)."""
        with self.lock:
            self._prune_jobs()
        self.executor.submit(release_memory)

    def _prune_jobs(self) -> None:
        """Drop finished jobs whose session is gone, and the oldest finished ones beyond
        :data:`MAX_FINISHED_JOBS` (called with ``self.lock`` held): a long-running worker must not
        grow with every job it ever ran."""
        finished = [j for j in self.jobs.values() if j.state not in ("queued", "running")]
        orphans = [j for j in finished if j.session_id and j.session_id not in self.sessions]
        for job in orphans + finished[:max(0, len(finished) - len(orphans) - MAX_FINISHED_JOBS)]:
            self.jobs.pop(job.id, None)

    # --------------------------------------------------------------------------------- jobs
    @staticmethod
    def new_job_id() -> str:
        return secrets.token_hex(8)

    def submit_task(self, kind: str, task, session: Session | None = None, cancel: threading.Event | None = None,
                    job_id: str | None = None) -> Job:
        """Queue ``task(job)`` on the model thread; it updates the job as it goes. ``cancel``: the
        job's cancel event, when the work was set up with it before (an engine generator);
        ``job_id``: an id from :meth:`new_job_id` the work was named after."""
        with self.lock:
            queued = sum(j.state in ("queued", "running") for j in self.jobs.values())
            if queued >= self.settings.max_queued_jobs:
                raise ServiceLimitError(f"{queued} jobs are queued or running (limit {self.settings.max_queued_jobs})")
            job = Job(job_id or self.new_job_id(), session.id if session else "", kind,
                      cancel=cancel or threading.Event())
            self.jobs[job.id] = job

        def work():
            if job.cancel.is_set():
                job.state = "cancelled"
                return
            job.state = "running"
            try:
                if session is not None:
                    _check_gpu_memory(session.engine, job)
                    with session.lock:
                        task(job)
                else:
                    task(job)
                if job.state == "running":
                    job.state = "done"
            except AutoMedSAMError as exc:
                job.state, job.error = "failed", {"code": error_status(exc)[1], "message": str(exc)}
            except Exception as exc:  # reported to the client, the worker keeps serving
                log.exception("job %s failed", job.id)
                job.state, job.error = "failed", {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}

        job.future = self.executor.submit(work)
        return job

    def submit(self, session: Session, kind: str, events, cancel: threading.Event) -> Job:
        """Queue a job that runs ``events``, an engine generator of progress events made with
        ``cancel`` (which becomes the job's cancel event)."""

        def task(job: Job) -> None:
            for event in events:
                job.done, job.total, job.message = event.done, event.total, event.message
                job.partial = dict(event.partial)
                if event.stage == "cancelled":
                    job.state = "cancelled"
                    return
                if event.result is not None:
                    job.result = result_to_json(event.result)
                    session.last_masks = (job.id, dict(event.result.masks))
            notes = session.engine.messages
            if notes:
                job.message = "; ".join(notes)

        return self.submit_task(kind, task, session, cancel)

    def job_masks(self, job: Job, class_name: str) -> np.ndarray:
        """The ``(K, J, I)`` masks of one class from ``job`` (its session's latest finished
        segmentation or propagation)."""
        session = self.sessions.get(job.session_id)
        last = session.last_masks if session is not None else None
        if job.state != "done" or last is None or last[0] != job.id:
            raise NotFoundError(f"job {job.id} has no masks here (state {job.state}; only the session's latest "
                                "finished segmentation or propagation keeps them)")
        name = session.engine.class_info(class_name).name
        if name not in last[1]:
            raise NotFoundError(f"job {job.id} has no masks of {name!r}; it has {', '.join(last[1])}")
        return last[1][name]

    def job(self, jid: str) -> Job:
        job = self.jobs.get(jid)
        if job is None:
            raise NotFoundError(f"no job {jid!r}")
        return job


LOW_GPU_MEMORY_MB = 1024
#: Finished jobs (of live sessions, or without one: downloads) kept for their clients to read.
MAX_FINISHED_JOBS = 256


def release_memory() -> None:
    """Return freed memory to the system: collect cycles, then ask glibc to trim its heaps (freed
    blocks in its per-thread arenas otherwise stay in the process: measured, 30 sessions grew the
    worker by ~15 MB each and it never went down) and PyTorch to free its cached CUDA blocks."""
    import ctypes
    import ctypes.util
    import gc
    import sys

    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # musl and others have no malloc_trim
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _check_gpu_memory(engine, job: Job) -> None:
    """Before a job on a GPU: warn the client when little memory is free (the engine then retries
    with smaller batches and finally falls back to the CPU, and says so in the job message)."""
    device = getattr(getattr(engine, "backbone", None), "device", None)
    if device is None or device.type != "cuda":
        return
    import torch

    free, _total = torch.cuda.mem_get_info(device)
    if free < LOW_GPU_MEMORY_MB * 2**20:
        job.message = f"low GPU memory ({free // 2**20} MB free): the job may run in smaller batches or on the CPU"
