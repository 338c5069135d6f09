"""The worker's HTTP API (FastAPI). Every route but ``/health`` needs ``Authorization: Bearer TOKEN``.

Routes (JSON unless stated): sessions (create with a bundle or backbone; upload the volume as raw
C-order bytes; read or restore a class's masks), segmentation and propagation jobs (progress,
per-class partial counts, cancel), refine and undo (synchronous), models, session delete. Errors are
``{"error": {"code": ..., "message": ...}}`` with stable codes.
"""

from __future__ import annotations

import contextlib
import hmac
import json
from typing import Annotated, Literal

import numpy as np
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..classes import check_classes_present
from ..errors import AutoMedSAMError, InvalidInputError
from . import PROTOCOL
from .bundles import MAX_NAME_CHARS
from .codec import array_from_bytes, mask_to_json, pack_mask, unpack_mask
from .limits import BodyLimitMiddleware
from .state import NotFoundError, ServiceSettings, WorkerState, error_status, masks_of

_STRICT = ConfigDict(allow_inf_nan=False)  # NaN / Infinity in JSON are bad input, never numbers
Finite = Annotated[float, Field(allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Point = Annotated[list[Finite], Field(min_length=2, max_length=2)]
ClassName = Annotated[str, Field(min_length=1, max_length=200)]


class SessionRequest(BaseModel):
    model_config = _STRICT
    bundle: str | None = Field(None, max_length=MAX_NAME_CHARS,
                               description="a bundle in the worker's bundle folders (see GET /v1/bundles)")
    backbone: str | None = Field(None, max_length=200, description="backbone id for manual-only sessions")
    device: str | None = Field(None, pattern="^(auto|cpu|cuda(:[0-9]+)?)$")


class VolumeMeta(BaseModel):
    model_config = _STRICT
    shape: list[Annotated[int, Field(ge=1, le=1 << 20)]] = Field(..., min_length=3, max_length=3,
                                                                 description="(K, J, I)")
    dtype: Literal["uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64"]
    spacing: list[Positive] = Field(..., min_length=3, max_length=3, description="(s_i, s_j, s_k) mm")
    origin: list[Finite] = Field(..., min_length=3, max_length=3, description="LPS mm of voxel (0, 0, 0)")
    direction: list[Finite] = Field(..., min_length=9, max_length=9, description="3x3 row-major, columns = axes")
    name: str = Field("", max_length=1000)


class SegmentRequest(BaseModel):
    model_config = _STRICT
    classes: list[ClassName] = Field(..., min_length=1, max_length=1000)
    slices: list[Annotated[int, Field(ge=0)]] | None = None
    cleanup: Literal["largest_component", "none"] | None = None


class RefineRequest(BaseModel):
    model_config = _STRICT
    class_name: ClassName
    slice_index: int = Field(..., ge=0)
    points: list[Point] | None = Field(None, max_length=1000)
    point_labels: list[Literal[0, 1]] | None = Field(None, max_length=1000)
    box: list[Finite] | None = Field(None, min_length=4, max_length=4)
    mode: Literal["semi", "manual"] | None = None
    reset: bool = False


class ClassRequest(BaseModel):
    model_config = _STRICT
    class_name: ClassName


class TrainRequest(BaseModel):
    model_config = _STRICT
    classes: dict[ClassName, Annotated[int, Field(ge=1, le=65535)]] = Field(
        ..., min_length=1, max_length=200, description="class name -> label value (1..65535) in the labels")
    generator: Literal["classmap", "ppn", "diffusion"] = "classmap"
    epochs: int = Field(30, ge=1, le=10000)
    train_slices: str | None = Field(None, max_length=1000)
    val_slices: str | None = Field("0::3", max_length=1000)
    lr: Positive | None = None
    decoder_lr: Positive = 1e-5
    use_now: bool = Field(True, description="switch this session to the new bundle when training ends")
    name: str = Field("taught-in-session", min_length=1, max_length=200)


class DownloadRequest(BaseModel):
    model_config = _STRICT
    sha256: str | None = Field(None, pattern="^[0-9a-f]{64}$")
    url: str | None = Field(None, max_length=2048, description="the catalog's URL or one under a configured mirror")


class PropagateRequest(BaseModel):
    model_config = _STRICT
    class_name: ClassName
    from_slice: int = Field(..., ge=0)
    direction: Literal["forward", "backward", "both"] = "both"
    max_slices: int | None = Field(None, ge=1)


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
                  description=f"Local inference service, protocol {PROTOCOL}. Bearer token required.")
    app.state.worker = worker
    app.add_middleware(BodyLimitMiddleware, upload_bytes=settings.max_upload_mb * 2**20,
                       bundle_bytes=settings.max_bundle_mb * 2**20)

    @app.exception_handler(AutoMedSAMError)
    async def _handled(request: Request, exc: AutoMedSAMError):
        status, code = error_status(exc)
        return _error(status, code, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(422, "invalid_request", f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = (f"no route {request.method} {request.url.path}" if exc.status_code in codes
                   else str(exc.detail))
        return _error(exc.status_code, codes.get(exc.status_code, "http_error"), message)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return _error(500, "internal", f"{type(exc).__name__}: {exc}")

    async def auth(authorization: str | None = Header(None)) -> None:  # async: never waits for a thread
        given = authorization[7:] if authorization and authorization.startswith("Bearer ") else ""
        if not hmac.compare_digest(given.encode(), settings.token.encode()):
            raise _Unauthorized()

    @app.exception_handler(_Unauthorized)
    async def _unauthorized(request: Request, exc: _Unauthorized):
        response = _error(401, "unauthorized", "missing or wrong bearer token")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "protocol": PROTOCOL, "version": __version__}

    guarded = [Depends(auth)]

    @app.get("/openapi.json", dependencies=guarded, include_in_schema=False)
    def openapi() -> dict:
        return app.openapi()

    @app.get("/v1/info", dependencies=guarded)
    def info() -> dict:
        import torch

        gpu = None
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            gpu = {"name": torch.cuda.get_device_name(0), "free_mb": free // 2**20, "total_mb": total // 2**20}
        return {"protocol": PROTOCOL, "version": __version__, "device": settings.device, "gpu": gpu,
                "sessions": len(worker.sessions), "jobs": sum(j.state in ("queued", "running")
                                                             for j in worker.jobs.values())}

    @app.get("/v1/models", dependencies=guarded)
    def models() -> dict:
        from ..models import BackboneCatalog

        catalog = BackboneCatalog.load()
        return {"backbones": [s.to_dict() | {"cached": catalog.cached_path(s) is not None} for s in catalog.all()]}

    @app.get("/v1/bundles", dependencies=guarded)
    def bundles() -> dict:
        return {"bundles": worker.bundles.list()}

    @app.post("/v1/bundles", dependencies=guarded, status_code=201, openapi_extra=_BINARY_BODY)
    async def upload_bundle(request: Request) -> dict:
        """A bundle zip (the bytes of a ``.zip`` bundle); answers the name to open sessions with."""
        data = await request.body()
        name, bundle = await run_in_threadpool(worker.bundles.store, data)
        return {"bundle": name, "name": bundle.name, "backbone": bundle.backbone_id,
                "classes": [c.to_dict() for c in bundle.classes]}

    @app.post("/v1/sessions", dependencies=guarded, status_code=201)
    def create_session(req: SessionRequest) -> dict:
        session = worker.create_session(req.bundle, req.backbone, req.device)
        engine = session.engine
        return {"session_id": session.id, "classes": [c.to_dict() for c in engine.class_catalog.classes],
                "backbone": engine.backbone.id, "device": str(engine.backbone.device)}

    @app.put("/v1/sessions/{sid}/volume", dependencies=guarded, openapi_extra=_BINARY_BODY)
    async def upload_volume(sid: str, request: Request, x_volume_meta: str = Header(..., max_length=8192)) -> dict:
        session = worker.session(sid)
        try:
            meta = VolumeMeta(**json.loads(x_volume_meta))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise InvalidInputError(f"X-Volume-Meta {where}: {first['msg']}") from None
        except (ValueError, TypeError) as exc:
            raise InvalidInputError(f"X-Volume-Meta is not valid volume metadata: {exc}") from None
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

    @app.delete("/v1/sessions/{sid}", dependencies=guarded)
    def delete_session(sid: str) -> dict:
        worker.delete_session(sid)
        return {"deleted": sid}

    @app.post("/v1/sessions/{sid}/segment", dependencies=guarded, status_code=202)
    def segment(sid: str, req: SegmentRequest) -> dict:
        session = worker.session(sid)
        engine = session.engine
        volume = engine._require_volume()
        if engine.generator is None:
            raise InvalidInputError("this session has no model bundle, so it cannot segment automatically; refine "
                                    "with points or a box, or open a session with a bundle")
        for c in req.classes:
            engine.class_info(c)  # unknown classes are a 422 now, not a failed job later
        _check_slices(req.slices or [], volume.num_slices)
        job = worker.submit(session, "segment",
                            lambda cancel: engine.segment(req.classes, req.slices, cleanup=req.cleanup, cancel=cancel))
        return job.to_dict()

    @app.post("/v1/sessions/{sid}/propagate", dependencies=guarded, status_code=202)
    def propagate(sid: str, req: PropagateRequest) -> dict:
        session = worker.session(sid)
        engine = session.engine
        engine.class_info(req.class_name)
        _check_slices([req.from_slice], engine._require_volume().num_slices)
        job = worker.submit(session, "propagate", lambda cancel: engine.propagate(
            req.class_name, req.from_slice, req.direction, req.max_slices, cancel=cancel))
        return job.to_dict()

    @app.put("/v1/sessions/{sid}/labels", dependencies=guarded, openapi_extra=_BINARY_BODY)
    async def put_labels(sid: str, request: Request) -> dict:
        """Label map for training, uint16 C-order bytes on the session volume's (K, J, I) grid."""
        session = worker.session(sid)
        shape = session.engine._require_volume().array.shape[:3]
        body = await request.body()

        def store() -> list[int]:
            labels = array_from_bytes(body, "uint16", shape).copy()
            session.labels = labels
            return [v for v in np.flatnonzero(np.bincount(labels.reshape(-1))).tolist() if v > 0]

        return {"label_values": await run_in_threadpool(store)}

    @app.post("/v1/sessions/{sid}/train", dependencies=guarded, status_code=202)
    def train(sid: str, req: TrainRequest) -> dict:
        from ..rescue import save_or_rescue
        from ..training.teach import engine_with_bundle, teach, teach_config

        session = worker.session(sid)
        engine = session.engine
        labels = session.labels
        if labels is None:
            raise InvalidInputError("upload the label map first (PUT /v1/sessions/{id}/labels)")
        config = teach_config(engine, req.classes, generator=req.generator, epochs=req.epochs,
                              train_slices=req.train_slices, val_slices=req.val_slices, lr=req.lr,
                              decoder_lr=req.decoder_lr, name=req.name)
        check_classes_present(config.classes, [labels], "the uploaded label map")
        target = worker.bundles.folders[0]

        def task(job) -> None:
            for event in teach(engine, labels, config, cancel=job.cancel):
                job.done, job.total, job.message = event.epoch, event.epochs, event.message or event.stage
                job.partial = {"stage": event.stage, "losses": event.losses, "metrics": event.metrics}
                if event.stage == "cancelled":
                    job.state = "cancelled"
                    return
                if event.bundle is not None:
                    path = save_or_rescue(event.bundle, target / f"trained-{job.id}.zip")
                    job.result = {"bundle": path.name, "validation": event.metrics,
                                  "classes": [c.to_dict() for c in event.bundle.classes]}
                    if req.use_now:
                        session.engine = engine_with_bundle(engine, event.bundle)

        return worker.submit_task("train", task, session).to_dict()

    @app.post("/v1/models/{backbone_id}/download", dependencies=guarded, status_code=202)
    def download(backbone_id: str, req: DownloadRequest) -> dict:
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

    @app.get("/v1/jobs/{jid}/bundle", dependencies=guarded,
             responses={200: {"content": {"application/zip": {}}}})
    def job_bundle(jid: str) -> Response:
        job = worker.job(jid)
        name = job.result.get("bundle") if job.state == "done" else None
        if not name:
            raise NotFoundError(f"job {jid} has no bundle (state {job.state})")
        return Response(worker.bundles.resolve(name).read_bytes(), media_type="application/zip")

    # Polling and cancel are async: they must answer even when every worker thread is waiting.
    @app.get("/v1/jobs/{jid}", dependencies=guarded)
    async def job_status(jid: str) -> dict:
        return worker.job(jid).to_dict()

    @app.delete("/v1/jobs/{jid}", dependencies=guarded)
    async def cancel_job(jid: str) -> dict:
        job = worker.job(jid)
        job.cancel.set()
        if job.future is not None and job.future.cancel():
            job.state = "cancelled"
        return job.to_dict()

    @app.post("/v1/sessions/{sid}/refine", dependencies=guarded)
    async def refine(sid: str, req: RefineRequest) -> dict:
        session = worker.session(sid)

        def work():
            with session.lock:
                return mask_to_json(session.engine.refine(req.class_name, req.slice_index, req.points,
                                                          req.point_labels, req.box, req.mode, req.reset))

        return {"slice_index": req.slice_index, "mask": await worker.run_async(work)}

    @app.post("/v1/sessions/{sid}/undo", dependencies=guarded)
    async def undo(sid: str, req: ClassRequest) -> dict:
        session = worker.session(sid)

        def work():
            with session.lock:
                return session.engine.undo(req.class_name)

        return {"slices": await worker.run_async(work)}

    @app.get("/v1/sessions/{sid}/masks/{class_name}", dependencies=guarded,
             responses={200: {"content": {"application/octet-stream": {}}}})
    def get_masks(sid: str, class_name: str) -> Response:
        session = worker.session(sid)
        masks = masks_of(session.engine, class_name)
        return Response(pack_mask(masks), media_type="application/octet-stream",
                        headers={"X-Shape": json.dumps(list(masks.shape))})

    @app.put("/v1/sessions/{sid}/masks/{class_name}", dependencies=guarded, openapi_extra=_BINARY_BODY)
    async def put_masks(sid: str, class_name: str, request: Request) -> dict:
        session = worker.session(sid)
        engine = session.engine
        shape = engine._require_volume().array.shape[:3]
        name = engine.class_info(class_name).name
        body = await request.body()
        masks = await run_in_threadpool(unpack_mask, body, shape)

        def store() -> int:
            with session.lock:  # on the model thread, after this session's running job
                session.engine.set_masks(name, masks)
            return int(masks.sum())

        return {"class_name": name, "voxels": await worker.run_async(store)}

    return app


_BINARY_BODY = {"requestBody": {"required": True, "content": {"application/octet-stream": {"schema": {
    "type": "string", "format": "binary"}}}}}


def _check_slices(slices: list[int], num_slices: int) -> None:
    bad = [k for k in slices if not 0 <= k < num_slices]
    if bad:
        raise InvalidInputError(f"slice index {bad[0]} is out of range: the volume has slices 0..{num_slices - 1} (k)")


class _Unauthorized(Exception):  # noqa: N818 (internal signal, never leaves the app)
    pass


__all__ = ["create_app"]
