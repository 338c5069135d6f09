"""The worker's HTTP API (FastAPI). Every route but ``/health`` needs ``Authorization: Bearer TOKEN``.

Routes (JSON unless stated): sessions (create with a bundle or backbone; upload the volume as raw
C-order bytes), segmentation and propagation jobs (progress, per-class partial counts, cancel, the
finished job's masks), refine (synchronous; the caller sends the slice's mask as it has it), models,
session delete. The worker keeps no masks between calls: the caller owns them. Errors are
``{"error": {"code": ..., "message": ...}}`` with stable codes.
"""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import AutoMedSAMError, InvalidInputError, NotFoundError
from . import protocol as p
from .auth import TokenMiddleware
from .codec import array_from_bytes, mask_from_json, mask_to_json, pack_mask
from .limits import BodyLimitMiddleware
from .state import ServiceSettings, WorkerState


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def create_app(settings: ServiceSettings) -> FastAPI:
    """The FastAPI application of one worker (state lives on ``app.state.worker``)."""
    worker = WorkerState(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        worker.shutdown()

    # The schema and the docs page describe every route, so they need the token like the routes.
    app = FastAPI(title="AutoMedSAM worker", version=__version__, lifespan=lifespan, openapi_url=None,
                  docs_url=None, redoc_url=None,
                  description=f"Local inference service, protocol {p.PROTOCOL}. Bearer token required.")
    app.state.worker = worker
    app.add_middleware(BodyLimitMiddleware, upload_bytes=settings.max_upload_mb * 2**20,
                       bundle_bytes=settings.max_bundle_mb * 2**20)
    app.add_middleware(TokenMiddleware, token=settings.token)  # added last: runs first

    @app.exception_handler(AutoMedSAMError)
    async def _handled(request: Request, exc: AutoMedSAMError):
        status, code = p.error_status(exc)
        return _error(status, code, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(422, p.REQUEST_INVALID, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = (f"no route {request.method} {request.url.path}" if exc.status_code in codes
                   else str(exc.detail))
        return _error(exc.status_code, codes.get(exc.status_code, "http_error"), message)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return _error(500, "internal", f"{type(exc).__name__}: {exc}")

    @app.get(p.HEALTH)
    async def health() -> dict:
        return {"status": "ok", "protocol": p.PROTOCOL, "version": __version__}

    @app.get(p.OPENAPI, include_in_schema=False)
    def openapi() -> dict:
        return app.openapi()

    @app.get(p.INFO)
    def info() -> dict:
        from ..backbones import gpu_info

        return {"protocol": p.PROTOCOL, "version": __version__, "device": settings.device, "gpu": gpu_info(),
                "sessions": len(worker.sessions), "jobs": sum(j.state in ("queued", "running")
                                                             for j in worker.jobs.values())}

    @app.get(p.MODELS)
    def models() -> dict:
        from ..models import BackboneCatalog

        catalog = BackboneCatalog.load()
        return {"backbones": [s.to_dict() | {"cached": catalog.cached_path(s) is not None} for s in catalog.all()]}

    @app.get(p.BUNDLES)
    def bundles() -> dict:
        return {"bundles": worker.bundles.list()}

    @app.post(p.BUNDLES, status_code=201, openapi_extra=_BINARY_BODY)
    async def upload_bundle(request: Request) -> dict:
        """A bundle zip (the bytes of a ``.zip`` bundle); answers the name to open sessions with."""
        data = await request.body()
        name, bundle = await run_in_threadpool(worker.bundles.store, data)
        return {"bundle": name, "name": bundle.name, "backbone": bundle.backbone_id,
                "classes": [c.to_dict() for c in bundle.classes]}

    @app.post(p.SESSIONS, status_code=201)
    def create_session(req: p.SessionRequest) -> dict:
        session = worker.create_session(req.bundle, req.backbone, req.device)
        engine = session.engine
        return {"session_id": session.id, "classes": [c.to_dict() for c in engine.class_catalog.classes],
                "backbone": engine.backbone.id, "device": str(engine.backbone.device)}

    @app.put(p.VOLUME, openapi_extra=_BINARY_BODY)
    async def upload_volume(sid: str, request: Request, x_volume_meta: str = Header(..., max_length=8192)) -> dict:
        session = worker.session(sid)
        try:
            meta = p.VolumeMeta(**json.loads(x_volume_meta))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise InvalidInputError(f"{p.VOLUME_META_HEADER} {where}: {first['msg']}") from None
        except (ValueError, TypeError) as exc:
            raise InvalidInputError(f"{p.VOLUME_META_HEADER} is not valid volume metadata: {exc}") from None
        expected = int(np.prod(meta.shape, dtype=np.float64) * np.dtype(meta.dtype).itemsize)
        limit = settings.max_upload_mb * 2**20
        if expected > limit:
            return _error(413, "too_large", f"a {meta.dtype} volume of shape {meta.shape} has {expected} bytes; "
                                            f"this worker accepts up to {settings.max_upload_mb} MB (--max-upload-mb)")
        from ..volume import Volume

        body = await request.body()

        def build() -> Volume:  # checks every voxel: in a thread, not on the event loop
            array = array_from_bytes(body, meta.dtype, tuple(meta.shape))
            return Volume(array, tuple(meta.spacing), tuple(meta.origin), np.array(meta.direction).reshape(3, 3),
                          meta.name)

        volume = await run_in_threadpool(build)
        await worker.run_async(session.engine.set_volume, volume)
        return {"session_id": sid, "shape": meta.shape}

    @app.delete(p.SESSION)
    def delete_session(sid: str) -> dict:
        worker.delete_session(sid)
        return {"deleted": sid}

    @app.post(p.SEGMENT, status_code=202)
    def segment(sid: str, req: p.SegmentRequest) -> dict:
        session = worker.session(sid)
        cancel = threading.Event()  # bad input is refused here, before the job is queued
        events = session.engine.segment(**req.model_dump(), cancel=cancel)  # the request's fields are its arguments
        return worker.submit(session, "segment", events, cancel).to_dict()

    @app.post(p.PROPAGATE, status_code=202)
    def propagate(sid: str, req: p.PropagateRequest) -> dict:
        session = worker.session(sid)
        cancel = threading.Event()
        fields = req.model_dump()
        fields["seed"] = mask_from_json(fields["seed"])
        events = session.engine.propagate(**fields, cancel=cancel)
        return worker.submit(session, "propagate", events, cancel).to_dict()

    @app.get(p.JOB_MASKS, responses={200: {"content": {"application/octet-stream": {}}}})
    def job_masks(jid: str, class_name: str) -> Response:
        """A finished job's ``(K, J, I)`` masks of one class, packed bits (shape in ``X-Shape``)."""
        job = worker.job(jid)
        masks = worker.job_masks(job, class_name)
        return Response(pack_mask(masks), media_type="application/octet-stream",
                        headers={p.SHAPE_HEADER: json.dumps(list(masks.shape))})

    @app.put(p.LABELS, openapi_extra=_BINARY_BODY)
    async def put_labels(sid: str, request: Request) -> dict:
        """Label map for teaching, uint16 C-order bytes on the session volume's (K, J, I) grid."""
        session = worker.session(sid)
        shape = session.engine.require_volume().array.shape[:3]
        body = await request.body()

        def store() -> list[int]:
            labels = array_from_bytes(body, "uint16", shape).copy()
            session.labels = labels
            return [v for v in np.flatnonzero(np.bincount(labels.reshape(-1))).tolist() if v > 0]

        return {"label_values": await run_in_threadpool(store)}

    @app.post(p.TEACH, status_code=202)
    def teach(sid: str, req: p.TeachRequest) -> dict:
        session = worker.session(sid)
        if session.labels is None:
            raise InvalidInputError(f"upload the label map first (PUT {p.LABELS})")
        cancel = threading.Event()
        job_id = worker.new_job_id()
        target = worker.bundles.folders[0] / f"taught-{job_id}.zip"
        events = session.engine.teach(session.labels, save_to=target, **req.model_dump(), cancel=cancel)

        def task(job) -> None:
            for event in events:
                job.done, job.total, job.message = event.epoch, event.epochs, event.message or event.stage
                job.partial = {"stage": event.stage, "losses": event.losses, "metrics": event.metrics}
                if event.stage == "cancelled":
                    job.state = "cancelled"
                    return
                if event.bundle_path is not None:
                    job.result = {"bundle": Path(event.bundle_path).name, "validation": event.metrics,
                                  "classes": [c.to_dict() for c in event.bundle.classes]}

        return worker.submit_task("teach", task, session, cancel, job_id).to_dict()

    @app.post(p.MODEL_DOWNLOAD, status_code=202)
    def download(backbone_id: str, req: p.DownloadRequest) -> dict:
        from ..download import download_backbone, pinned_sha256, url_under
        from ..models import BackboneCatalog

        spec = BackboneCatalog.load().get(backbone_id)  # unknown ids are a 422 now
        if req.url and req.url != spec.url and not url_under(req.url, settings.mirrors):
            raise InvalidInputError(
                f"this worker downloads {backbone_id} only from the catalog's URL or a configured mirror "
                f"({', '.join(settings.mirrors) or 'none configured; see serve --mirror'})")
        pinned_sha256(spec, req.sha256)  # a hash contradicting the catalog's pin is a 422 now, not a failed job

        def task(job) -> None:
            def progress(done: int, total: int | None) -> None:
                job.done, job.total = done, total or 0

            path = download_backbone(backbone_id, url=req.url, sha256=req.sha256, progress=progress,
                                     deadline_s=settings.download_deadline_s)
            job.result = {"path": path.name}

        return worker.submit_task("download", task).to_dict()

    @app.get(p.JOB_BUNDLE,
             responses={200: {"content": {"application/zip": {}}}})
    def job_bundle(jid: str) -> Response:
        job = worker.job(jid)
        name = job.result.get("bundle") if job.state == "done" else None
        if not name:
            raise NotFoundError(f"job {jid} has no bundle (state {job.state})")
        return Response(worker.bundles.resolve(name).read_bytes(), media_type="application/zip")

    # Polling and cancel are async: they must answer even when every worker thread is waiting.
    @app.get(p.JOB)
    async def job_status(jid: str) -> dict:
        return worker.job(jid).to_dict()

    @app.delete(p.JOB)
    async def cancel_job(jid: str) -> dict:
        job = worker.job(jid)
        job.cancel.set()
        if job.future is not None and job.future.cancel():
            job.state = "cancelled"
        return job.to_dict()

    @app.post(p.REFINE)
    async def refine(sid: str, req: p.RefineRequest) -> dict:
        session = worker.session(sid)
        fields = req.model_dump()
        if fields["mask"] is not None:
            fields["mask"] = mask_from_json(fields["mask"])

        def work():
            with session.lock:
                return mask_to_json(session.engine.refine(**fields))

        return {"slice_index": req.slice_index, "mask": await worker.run_async(work)}

    return app


_BINARY_BODY = {"requestBody": {"required": True, "content": {"application/octet-stream": {"schema": {
    "type": "string", "format": "binary"}}}}}


__all__ = ["create_app"]
