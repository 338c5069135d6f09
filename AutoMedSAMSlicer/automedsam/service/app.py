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
from typing import Literal

import numpy as np
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from .. import __version__
from ..errors import AutoMedSAMError, InvalidInputError, WeightsUnavailableError
from . import PROTOCOL
from .codec import array_from_bytes, mask_to_json, pack_mask, unpack_mask
from .state import NotFoundError, ServiceLimitError, ServiceSettings, WorkerState, masks_of


class SessionRequest(BaseModel):
    bundle: str | None = Field(None, description="path of a model bundle on the worker's machine")
    backbone: str | None = Field(None, description="backbone id for manual-only sessions")
    device: str | None = Field(None, pattern="^(auto|cpu|cuda(:[0-9]+)?)$")


class VolumeMeta(BaseModel):
    shape: list[int] = Field(..., min_length=3, max_length=3, description="(K, J, I)")
    dtype: Literal["uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64"]
    spacing: list[float] = Field(..., min_length=3, max_length=3, description="(s_i, s_j, s_k) mm")
    origin: list[float] = Field(..., min_length=3, max_length=3, description="LPS mm of voxel (0, 0, 0)")
    direction: list[float] = Field(..., min_length=9, max_length=9, description="3x3 row-major, columns = axes")
    name: str = ""


class SegmentRequest(BaseModel):
    classes: list[str] = Field(..., min_length=1)
    slices: list[int] | None = None
    cleanup: Literal["largest_component", "none"] | None = None


class RefineRequest(BaseModel):
    class_name: str
    slice_index: int
    points: list[list[float]] | None = None
    point_labels: list[int] | None = None
    box: list[float] | None = Field(None, min_length=4, max_length=4)
    mode: Literal["semi", "manual"] | None = None
    reset: bool = False


class ClassRequest(BaseModel):
    class_name: str


class TrainRequest(BaseModel):
    classes: dict[str, int] = Field(..., min_length=1, description="class name -> label value in the labels")
    generator: Literal["classmap", "ppn", "diffusion"] = "classmap"
    epochs: int = Field(30, ge=1, le=10000)
    train_slices: str | None = None
    val_slices: str | None = "0::3"
    lr: float | None = Field(None, gt=0)
    decoder_lr: float = Field(1e-5, gt=0)
    use_now: bool = Field(True, description="switch this session to the new bundle when training ends")
    name: str = "taught-in-session"


class DownloadRequest(BaseModel):
    sha256: str | None = Field(None, pattern="^[0-9a-f]{64}$")
    url: str | None = None


class PropagateRequest(BaseModel):
    class_name: str
    from_slice: int
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

    app = FastAPI(title="AutoMedSAM worker", version=__version__, lifespan=lifespan,
                  description=f"Local inference service, protocol {PROTOCOL}. Bearer token required.")
    app.state.worker = worker

    @app.exception_handler(AutoMedSAMError)
    async def _handled(request: Request, exc: AutoMedSAMError):
        if isinstance(exc, NotFoundError):
            return _error(404, "not_found", str(exc))
        if isinstance(exc, ServiceLimitError):
            return _error(429, "busy", str(exc))
        if isinstance(exc, InvalidInputError):
            return _error(422, "invalid_input", str(exc))
        if isinstance(exc, WeightsUnavailableError):
            return _error(424, "weights_unavailable", str(exc))
        return _error(500, "error", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(422, "invalid_request", f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return _error(500, "internal", f"{type(exc).__name__}: {exc}")

    def auth(authorization: str | None = Header(None)) -> None:
        given = authorization[7:] if authorization and authorization.startswith("Bearer ") else ""
        if not hmac.compare_digest(given.encode(), settings.token.encode()):
            raise _Unauthorized()

    @app.exception_handler(_Unauthorized)
    async def _unauthorized(request: Request, exc: _Unauthorized):
        response = _error(401, "unauthorized", "missing or wrong bearer token")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "protocol": PROTOCOL, "version": __version__}

    guarded = [Depends(auth)]

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

    @app.post("/v1/sessions", dependencies=guarded, status_code=201)
    def create_session(req: SessionRequest) -> dict:
        session = worker.create_session(req.bundle, req.backbone, req.device)
        engine = session.engine
        return {"session_id": session.id, "classes": [c.to_dict() for c in engine.class_catalog.classes],
                "backbone": engine.backbone.id, "device": str(engine.backbone.device)}

    @app.put("/v1/sessions/{sid}/volume", dependencies=guarded,
             openapi_extra={"requestBody": {"required": True,
                                            "content": {"application/octet-stream": {"schema": {
                                                "type": "string", "format": "binary"}}}}})
    async def upload_volume(sid: str, request: Request, x_volume_meta: str = Header(...)) -> dict:
        session = worker.session(sid)
        try:
            meta = VolumeMeta(**json.loads(x_volume_meta))
        except (ValueError, TypeError) as exc:
            raise InvalidInputError(f"X-Volume-Meta is not valid volume metadata: {exc}") from None
        limit = settings.max_upload_mb * 2**20
        declared = int(request.headers.get("content-length") or 0)
        if declared > limit:
            return _error(413, "too_large",
                          f"upload of {declared} bytes exceeds the limit of {settings.max_upload_mb} MB")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return _error(413, "too_large", f"upload exceeds the limit of {settings.max_upload_mb} MB")
        from ..volume import Volume

        array = array_from_bytes(bytes(body), meta.dtype, tuple(meta.shape))
        volume = Volume(array, tuple(meta.spacing), tuple(meta.origin), np.array(meta.direction).reshape(3, 3),
                        meta.name)
        worker.run(session.engine.set_volume, volume)
        return {"session_id": sid, "shape": meta.shape}

    @app.delete("/v1/sessions/{sid}", dependencies=guarded)
    def delete_session(sid: str) -> dict:
        worker.delete_session(sid)
        return {"deleted": sid}

    @app.post("/v1/sessions/{sid}/segment", dependencies=guarded, status_code=202)
    def segment(sid: str, req: SegmentRequest) -> dict:
        session = worker.session(sid)
        engine = session.engine
        engine._require_volume()
        for c in req.classes:
            engine.class_info(c)  # unknown classes are a 422 now, not a failed job later
        job = worker.submit(session, "segment",
                            lambda cancel: engine.segment(req.classes, req.slices, cleanup=req.cleanup, cancel=cancel))
        return job.to_dict()

    @app.post("/v1/sessions/{sid}/propagate", dependencies=guarded, status_code=202)
    def propagate(sid: str, req: PropagateRequest) -> dict:
        session = worker.session(sid)
        engine = session.engine
        job = worker.submit(session, "propagate", lambda cancel: engine.propagate(
            req.class_name, req.from_slice, req.direction, req.max_slices, cancel=cancel))
        return job.to_dict()

    @app.put("/v1/sessions/{sid}/labels", dependencies=guarded,
             openapi_extra={"requestBody": {"required": True,
                                            "content": {"application/octet-stream": {"schema": {
                                                "type": "string", "format": "binary"}}}}})
    async def put_labels(sid: str, request: Request) -> dict:
        """Label map for training, uint16 C-order bytes on the session volume's (K, J, I) grid."""
        session = worker.session(sid)
        shape = session.engine._require_volume().array.shape[:3]
        session.labels = array_from_bytes(await request.body(), "uint16", shape).copy()
        values = [int(v) for v in np.unique(session.labels) if v > 0]
        return {"label_values": values}

    @app.post("/v1/sessions/{sid}/train", dependencies=guarded, status_code=202)
    def train(sid: str, req: TrainRequest) -> dict:
        from ..training.teach import engine_with_bundle, teach, teach_config

        session = worker.session(sid)
        engine = session.engine
        labels = getattr(session, "labels", None)
        if labels is None:
            raise InvalidInputError("upload the label map first (PUT /v1/sessions/{id}/labels)")
        config = teach_config(engine, req.classes, generator=req.generator, epochs=req.epochs,
                              train_slices=req.train_slices, val_slices=req.val_slices, lr=req.lr,
                              decoder_lr=req.decoder_lr, name=req.name)

        def task(job) -> None:
            from ..models import automedsam_home

            for event in teach(engine, labels, config, cancel=job.cancel):
                job.done, job.total, job.message = event.epoch, event.epochs, event.message or event.stage
                job.partial = {"stage": event.stage, "losses": event.losses, "metrics": event.metrics}
                if event.stage == "cancelled":
                    job.state = "cancelled"
                    return
                if event.bundle is not None:
                    path = event.bundle.save(automedsam_home() / "bundles" / f"{job.id}.zip")
                    job.result = {"bundle": str(path), "validation": event.metrics}
                    if req.use_now:
                        session.engine = engine_with_bundle(engine, event.bundle)

        return worker.submit_task("train", task, session).to_dict()

    @app.post("/v1/models/{backbone_id}/download", dependencies=guarded, status_code=202)
    def download(backbone_id: str, req: DownloadRequest) -> dict:
        from ..download import download_backbone
        from ..models import BackboneCatalog

        BackboneCatalog.load().get(backbone_id)  # unknown ids are a 422 now

        def task(job) -> None:
            def progress(done: int, total: int | None) -> None:
                job.done, job.total = done, total or 0

            path = download_backbone(backbone_id, url=req.url, sha256=req.sha256, progress=progress)
            job.result = {"path": str(path)}

        return worker.submit_task("download", task).to_dict()

    @app.get("/v1/jobs/{jid}/bundle", dependencies=guarded,
             responses={200: {"content": {"application/zip": {}}}})
    def job_bundle(jid: str) -> Response:
        job = worker.job(jid)
        path = job.result.get("bundle") if job.state == "done" else None
        if not path:
            raise NotFoundError(f"job {jid} has no bundle (state {job.state})")
        with open(path, "rb") as f:
            return Response(f.read(), media_type="application/zip")

    @app.get("/v1/jobs/{jid}", dependencies=guarded)
    def job_status(jid: str) -> dict:
        return worker.job(jid).to_dict()

    @app.delete("/v1/jobs/{jid}", dependencies=guarded)
    def cancel_job(jid: str) -> dict:
        job = worker.job(jid)
        job.cancel.set()
        if job.future is not None and job.future.cancel():
            job.state = "cancelled"
        return job.to_dict()

    @app.post("/v1/sessions/{sid}/refine", dependencies=guarded)
    def refine(sid: str, req: RefineRequest) -> dict:
        session = worker.session(sid)

        def work():
            with session.lock:
                return session.engine.refine(req.class_name, req.slice_index, req.points, req.point_labels,
                                             req.box, req.mode, req.reset)

        return {"slice_index": req.slice_index, "mask": mask_to_json(worker.run(work))}

    @app.post("/v1/sessions/{sid}/undo", dependencies=guarded)
    def undo(sid: str, req: ClassRequest) -> dict:
        session = worker.session(sid)
        with session.lock:
            return {"slices": session.engine.undo(req.class_name)}

    @app.get("/v1/sessions/{sid}/masks/{class_name}", dependencies=guarded,
             responses={200: {"content": {"application/octet-stream": {}}}})
    def get_masks(sid: str, class_name: str) -> Response:
        session = worker.session(sid)
        masks = masks_of(session.engine, class_name)
        return Response(pack_mask(masks), media_type="application/octet-stream",
                        headers={"X-Shape": json.dumps(list(masks.shape))})

    @app.put("/v1/sessions/{sid}/masks/{class_name}", dependencies=guarded,
             openapi_extra={"requestBody": {"required": True,
                                            "content": {"application/octet-stream": {"schema": {
                                                "type": "string", "format": "binary"}}}}})
    async def put_masks(sid: str, class_name: str, request: Request) -> dict:
        session = worker.session(sid)
        engine = session.engine
        shape = engine._require_volume().array.shape[:3]
        masks = unpack_mask(await request.body(), shape)
        name = engine.class_info(class_name).name
        with session.lock:
            engine.masks[name] = masks
        return {"class_name": name, "voxels": int(masks.sum())}

    return app


class _Unauthorized(Exception):  # noqa: N818 (internal signal, never leaves the app)
    pass


__all__ = ["create_app"]
