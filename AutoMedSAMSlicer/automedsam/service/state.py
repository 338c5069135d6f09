"""Sessions, jobs and the single model thread of the worker.

All model work (encoding, decoding, propagation) runs on one persistent executor thread: CUDA and
cuDNN state is per thread, and one queue keeps GPU memory predictable. HTTP handlers only enqueue
work and read job state, so the server answers status requests while a job runs.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..errors import AutoMedSAMError, InvalidInputError
from ..models import DEFAULT_BACKBONE

log = logging.getLogger(__name__)


class ServiceLimitError(AutoMedSAMError):
    """A configured limit (sessions, queued jobs) is reached; the client should retry later."""


class NotFoundError(AutoMedSAMError):
    """No such session or job."""


@dataclass(frozen=True)
class ServiceSettings:
    """Limits and defaults of a worker."""

    token: str
    device: str = "auto"
    max_upload_mb: int = 1024
    max_sessions: int = 8
    max_queued_jobs: int = 16
    session_ttl_s: float = 3600.0


@dataclass
class Session:
    id: str
    engine: object
    model_key: tuple
    labels: np.ndarray | None = None
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


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

    # ------------------------------------------------------------------------- model thread
    def run(self, fn, *args, timeout: float | None = None):
        """Run ``fn`` on the model thread and wait for it."""
        return self.executor.submit(fn, *args).result(timeout)

    def shutdown(self) -> None:
        for job in self.jobs.values():
            job.cancel.set()
        self.executor.shutdown(wait=False, cancel_futures=True)

    # ----------------------------------------------------------------------------- sessions
    def expire(self) -> None:
        now = time.monotonic()
        with self.lock:
            for sid in [s.id for s in self.sessions.values() if now - s.last_used > self.settings.session_ttl_s]:
                log.info("session %s expired", sid)
                self.sessions.pop(sid, None)

    def create_session(self, bundle: str | None, backbone: str | None, device: str | None) -> Session:
        from ..engine import Engine

        self.expire()
        with self.lock:
            if len(self.sessions) >= self.settings.max_sessions:
                raise ServiceLimitError(f"the worker holds its maximum of {self.settings.max_sessions} sessions; "
                                        "delete one or wait for idle ones to expire")
        device = device or self.settings.device
        key = (bundle, backbone, device)

        def build():
            if key not in self.models:
                from ..backbones import build_backbone
                from ..bundle import backbone_for_bundle, load_bundle

                if bundle:
                    b = load_bundle(bundle)
                    self.models[key] = (backbone_for_bundle(b, device), b)
                elif backbone:
                    weights = "random" if backbone.startswith("tiny-") else None
                    self.models[key] = (build_backbone(backbone, weights=weights, device=device), None)
                else:  # manual mode on the default backbone
                    self.models[key] = (build_backbone(DEFAULT_BACKBONE, device=device), None)
            bb, bun = self.models[key]
            return Engine(bb, bun)

        engine = self.run(build)
        session = Session(secrets.token_hex(8), engine, key)
        with self.lock:
            self.sessions[session.id] = session
        return session

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
        for job in self.jobs.values():
            if job.session_id == sid:
                job.cancel.set()

    # --------------------------------------------------------------------------------- jobs
    def submit_task(self, kind: str, task, session: Session | None = None) -> Job:
        """Queue ``task(job)`` on the model thread; it updates the job as it goes."""
        with self.lock:
            queued = sum(j.state in ("queued", "running") for j in self.jobs.values())
            if queued >= self.settings.max_queued_jobs:
                raise ServiceLimitError(f"{queued} jobs are queued or running (limit {self.settings.max_queued_jobs})")
            job = Job(secrets.token_hex(8), session.id if session else "", kind)
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
                job.state, job.error = "failed", {"code": _code(exc), "message": str(exc)}
            except Exception as exc:  # reported to the client, the worker keeps serving
                log.exception("job %s failed", job.id)
                job.state, job.error = "failed", {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}

        job.future = self.executor.submit(work)
        return job

    def submit(self, session: Session, kind: str, events_fn) -> Job:
        """Queue a job whose ``events_fn(cancel)`` yields engine progress events."""

        def task(job: Job) -> None:
            for event in events_fn(job.cancel):
                job.done, job.total, job.message = event.done, event.total, event.message
                job.partial = dict(event.partial)
                if event.stage == "cancelled":
                    job.state = "cancelled"
                    return
                if event.result is not None:
                    job.result = event.result.summary() if hasattr(event.result, "summary") else dict(event.result)
            notes = getattr(session.engine, "messages", [])
            if notes:
                job.message = "; ".join(notes)

        return self.submit_task(kind, task, session)

    def job(self, jid: str) -> Job:
        job = self.jobs.get(jid)
        if job is None:
            raise NotFoundError(f"no job {jid!r}")
        return job


LOW_GPU_MEMORY_MB = 1024


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


def _code(exc: Exception) -> str:
    from ..errors import WeightsUnavailableError

    if isinstance(exc, InvalidInputError):
        return "invalid_input"
    if isinstance(exc, WeightsUnavailableError):
        return "weights_unavailable"
    return "error"


def masks_of(engine, name: str) -> np.ndarray:
    volume = engine._require_volume()
    return engine.masks.get(engine.class_info(name).name, np.zeros(volume.array.shape[:3], bool))
