"""A :class:`~automedsam.contract.SegmentationEngine` whose work runs in a worker (``automedsam
serve``) on this machine or another: the same methods, events, results and errors as the in-process
:class:`~automedsam.engine.Engine`, over the protocol of :mod:`automedsam.service.protocol`.

Neither side keeps masks between calls (the caller owns them, see :mod:`automedsam.contract`), so a
worker crash loses nothing: ``reconnect`` opens a new session on the (restarted) worker and uploads
the volume again. Needs numpy, requests and pydantic (the ``service`` extra), never torch.

Coordinates are the engine's: slice index k, points (i, j), boxes (i0, j0, i1, j1), masks KJI.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .classes import ClassCatalog, ClassInfo, resolve_class
from .contract import (
    DEFAULT_PROMPT_NETWORK,
    TEACH_DECODER_LR,
    TEACH_EPOCHS,
    TEACH_NAME,
    TEACH_VAL_SLICES,
    ProgressEvent,
    SegmentationResult,
    TrainEvent,
    result_of,
)
from .errors import (
    InvalidInputError,
    NotFoundError,
    ProtocolMismatchError,
    ServiceError,
    ServiceUnavailableError,
)
from .service import protocol as p
from .service.codec import mask_from_json, mask_to_json, unpack_mask
from .volume import Volume

__all__ = ["ProtocolMismatchError", "RemoteEngine", "ServiceError", "ServiceUnavailableError"]


class RemoteEngine:
    """Talk to a worker at ``url`` with ``token``.

    ``bundle`` is a bundle file or folder on *this* machine (uploaded to the worker when the session
    opens; the worker reads bundles only from its own bundle folders), or the name of a bundle in the
    worker's bundle folders (``GET /v1/bundles``); ``backbone`` opens a manual-only session."""

    def __init__(self, url: str, token: str, *, bundle: str | None = None, backbone: str | None = None,
                 device: str | None = None, timeout: float = 60.0, poll_s: float = 0.1):
        import requests

        self.url = url.rstrip("/")
        self.timeout = timeout
        self.poll_s = poll_s
        self._http = requests.Session()
        self._http.headers["Authorization"] = f"Bearer {token}"
        self.model = {"bundle": bundle, "backbone": backbone, "device": device}
        self.volume: Volume | None = None
        self.session_id: str | None = None
        self.classes: list[dict] = []
        self._session_device = "unknown"
        self._extra_classes: dict[str, ClassInfo] = {}
        self.check_protocol()

    # -------------------------------------------------------------------------------- http
    def _call(self, method: str, path: str, *, timeout: float | None = None, **kwargs):
        import requests

        try:
            r = self._http.request(method, self.url + path, timeout=timeout or self.timeout, **kwargs)
        except requests.ConnectionError:
            raise ServiceUnavailableError(
                f"cannot reach the AutoMedSAM worker at {self.url}: is it running? (it may have crashed; "
                "restart it and call reconnect())"
            ) from None
        except requests.Timeout:
            raise ServiceUnavailableError(f"the worker at {self.url} did not answer within {timeout or self.timeout} s"
                                          ) from None
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
                code, message = err["code"], err["message"]
            except (ValueError, KeyError, TypeError):
                code, message = "http", r.text[:300]
            raise p.error_from(r.status_code, code, message)
        return r

    def _session_path(self, route: str, **names) -> str:
        return route.format(sid=self.session_id, **names)

    def check_protocol(self) -> dict:
        """``/health``; raises :class:`ProtocolMismatchError` naming what to upgrade."""
        health = self._call("GET", p.HEALTH, timeout=10).json()
        theirs = str(health.get("protocol"))
        if theirs != p.PROTOCOL:
            side = "the worker" if theirs < p.PROTOCOL else "this client (automedsam in Slicer or your script)"
            raise ProtocolMismatchError(
                f"the worker at {self.url} speaks protocol {theirs} (automedsam {health.get('version')}), this client "
                f"speaks {p.PROTOCOL}: upgrade {side} so both run the same automedsam version"
            )
        return health

    # ---------------------------------------------------------------------------- session
    def _ensure_session(self) -> str:
        if self.session_id is None:
            model = dict(self.model)
            if model.get("bundle"):
                model["bundle"] = self.upload_bundle(model["bundle"])
            reply = self._call("POST", p.SESSIONS, json=p.body(p.SessionRequest, **model),
                               timeout=max(self.timeout, 300)).json()
            self.session_id, self.classes = reply["session_id"], reply["classes"]
            self._session_device = reply.get("device", "unknown")
        return self.session_id

    def upload_bundle(self, bundle: str) -> str:
        """The worker's name for ``bundle``: a local bundle zip or folder is uploaded (the worker
        keeps it under its sha256); anything else is taken as a name on the worker."""
        import io
        import zipfile

        from .bundle import MANIFEST, WEIGHTS

        local = Path(bundle).expanduser()
        if local.is_dir() and (local / MANIFEST).is_file():
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
                for name in (MANIFEST, WEIGHTS):
                    z.write(local / name, name)
            data = buffer.getvalue()
        elif local.is_file() and local.suffix.lower() == ".zip":
            data = local.read_bytes()
        else:
            return str(bundle)
        reply = self._call("POST", p.BUNDLES, data=data, headers={"Content-Type": "application/octet-stream"},
                           timeout=max(self.timeout, 300))
        return reply.json()["bundle"]

    def open_session(self) -> list[dict]:
        """Open the session (loads the model on the worker) and return its classes."""
        self._ensure_session()
        return self.classes

    def reconnect(self) -> None:
        """After a worker restart: a new session with the same volume (nothing else lived there)."""
        self.check_protocol()
        self.session_id = None
        self._ensure_session()
        if self.volume is not None:
            self._upload(self.volume)

    def close(self) -> None:
        """Delete the worker session (the worker frees its volume and masks)."""
        if self.session_id is not None:
            with contextlib.suppress(ServiceError, ServiceUnavailableError, NotFoundError):  # already gone
                self._call("DELETE", self._session_path(p.SESSION), timeout=5)
        self.session_id = None

    def device_info(self) -> dict:
        """``{"device": the session's device, "gpu": {"name", "free_mb", "total_mb"} or None}``."""
        self._ensure_session()
        return {"device": self._session_device, "gpu": self.info()["gpu"]}

    def info(self) -> dict:
        """The worker's ``/v1/info``: protocol, version, device and GPU (name, free/total MB) or None."""
        return self._call("GET", p.INFO, timeout=10).json()

    # ---------------------------------------------------------------------------- classes
    @property
    def class_catalog(self) -> ClassCatalog:
        self._ensure_session()
        return ClassCatalog([ClassInfo.from_dict(c) for c in self.classes])

    def class_info(self, name: str) -> ClassInfo:
        """As :meth:`Engine.class_info`, from the session's classes."""
        catalog = self.class_catalog
        if name in catalog:
            return catalog.get(name)
        if catalog.classes and name not in self._extra_classes:
            raise InvalidInputError(f"class {name!r} is not one the model knows; it has: {', '.join(catalog.names())}")
        if name not in self._extra_classes:
            self._extra_classes[name] = resolve_class(name)
        return self._extra_classes[name]

    # ----------------------------------------------------------------------------- volume
    def require_volume(self) -> Volume:
        if self.volume is None or self.session_id is None:
            raise InvalidInputError("no volume set: call set_volume(volume) first")
        return self.volume

    def set_volume(self, volume: Volume) -> None:
        """Upload a volume (raw bytes + geometry)."""
        if not isinstance(volume, Volume):
            raise InvalidInputError(f"set_volume needs a Volume, got {type(volume).__name__}")
        self._ensure_session()
        self._upload(volume)
        self.volume = volume

    def _upload(self, volume: Volume) -> None:
        array = np.ascontiguousarray(volume.array)
        if array.dtype == np.float16:
            array = array.astype(np.float32)
        meta = p.body(p.VolumeMeta, shape=list(array.shape), dtype=str(array.dtype), spacing=list(volume.spacing),
                      origin=list(volume.origin), direction=volume.direction.reshape(-1).tolist(), name=volume.name)
        self._call("PUT", self._session_path(p.VOLUME), data=array.tobytes(),
                   headers={p.VOLUME_META_HEADER: json.dumps(meta), "Content-Type": "application/octet-stream"},
                   timeout=max(self.timeout, 600))

    def _job_masks(self, job_id: str, name: str) -> np.ndarray:
        """A finished job's ``(K, J, I)`` masks of class ``name``."""
        r = self._call("GET", p.JOB_MASKS.format(jid=job_id, class_name=name))
        return unpack_mask(r.content, tuple(json.loads(r.headers[p.SHAPE_HEADER])))

    # ---------------------------------------------------------------------------- segment
    def _follow(self, job: dict, cancel: threading.Event | None = None) -> Iterator[dict]:
        """Poll a job until it ends, yielding its state each time; a failed job raises the error
        the worker raised."""
        path = p.JOB.format(jid=job["id"])
        cancel_sent = False
        while True:
            if cancel is not None and cancel.is_set() and not cancel_sent:
                self._call("DELETE", path)
                cancel_sent = True
            job = self._call("GET", path).json()
            if job["state"] == "failed":
                err = job["error"] or {}
                raise p.error_from(500, err.get("code", "error"), err.get("message", "the job failed"))
            yield job
            if job["state"] in ("done", "cancelled"):
                return
            time.sleep(self.poll_s)

    @staticmethod
    def _event(job: dict, **extra) -> ProgressEvent:
        return ProgressEvent(job["state"] if job["state"] in ("done", "cancelled") else job["kind"], job["done"],
                             job["total"], job["message"], job["partial"], **extra)

    def segment(self, classes: Sequence[str], slices: Sequence[int] | None = None, *, cleanup: str | None = None,
                cancel: threading.Event | None = None) -> Iterator[ProgressEvent]:
        """As :meth:`Engine.segment`; the "done" event's result holds the masks."""
        volume = self.require_volume()
        infos = [self.class_info(c) for c in classes]
        body = p.body(p.SegmentRequest, classes=[i.name for i in infos],
                      slices=list(slices) if slices is not None else None, cleanup=cleanup)
        job = self._call("POST", self._session_path(p.SEGMENT), json=body).json()
        for state in self._follow(job, cancel):
            if state["state"] != "done":
                yield self._event(state)
                continue
            masks = {i.name: self._job_masks(job["id"], i.name) for i in infos}
            yield self._event(state, result=p.result_from_json(state["result"], volume, infos, masks))

    def segment_volume(self, classes: Sequence[str], slices: Sequence[int] | None = None, *,
                       cleanup: str | None = None, cancel: threading.Event | None = None) -> SegmentationResult:
        return result_of(self.segment(classes, slices, cleanup=cleanup, cancel=cancel))

    def refine(self, class_name: str, slice_index: int, points=None, point_labels=None, box=None,
               mode: str | None = None, reset: bool = False, mask=None) -> np.ndarray:
        """As :meth:`Engine.refine`; returns the new ``(J, I)`` mask."""
        self.require_volume()
        name = self.class_info(class_name).name
        body = p.body(p.RefineRequest, class_name=name, slice_index=int(slice_index),
                      points=None if points is None else np.asarray(points, float).reshape(-1, 2).tolist(),
                      point_labels=None if point_labels is None else np.asarray(point_labels, int).reshape(-1).tolist(),
                      box=None if box is None else np.asarray(box, float).reshape(-1).tolist(), mode=mode,
                      reset=bool(reset), mask=None if mask is None else mask_to_json(np.asarray(mask, bool)))
        return mask_from_json(self._call("POST", self._session_path(p.REFINE), json=body).json()["mask"])

    def propagate(self, class_name: str, from_slice: int, seed, direction: str = "both",
                  max_slices: int | None = None, cancel: threading.Event | None = None) -> Iterator[ProgressEvent]:
        """As :meth:`Engine.propagate`; the "done" event's result holds the masks written."""
        volume = self.require_volume()
        info = self.class_info(class_name)
        seed = np.asarray(seed, bool)
        if seed.ndim == 3 and seed.shape == volume.array.shape[:3] and 0 <= int(from_slice) < seed.shape[0]:
            seed = seed[int(from_slice)]
        body = p.body(p.PropagateRequest, class_name=info.name, from_slice=int(from_slice), seed=mask_to_json(seed),
                      direction=direction, max_slices=max_slices)
        job = self._call("POST", self._session_path(p.PROPAGATE), json=body).json()
        for state in self._follow(job, cancel):
            if state["state"] != "done":
                yield self._event(state)
                continue
            masks = {info.name: self._job_masks(job["id"], info.name)}
            yield self._event(state, result=p.result_from_json(state["result"], volume, [info], masks))

    # ------------------------------------------------------------------------------ teach
    def teach(self, labels: np.ndarray, classes: dict[str, int], save_to: str | Path, *,
              prompt_network: str = DEFAULT_PROMPT_NETWORK, epochs: int = TEACH_EPOCHS,
              train_slices: str | None = None, val_slices: str | None = TEACH_VAL_SLICES, lr: float | None = None,
              decoder_lr: float = TEACH_DECODER_LR, use_now: bool = True, name: str = TEACH_NAME,
              cancel: threading.Event | None = None) -> Iterator[TrainEvent]:
        """As :meth:`Engine.teach`: trained on the worker, the bundle downloaded to ``save_to``."""
        from .bundle import check_bundle_destination
        from .rescue import save_bytes_or_rescue

        volume = self.require_volume()
        labels = np.ascontiguousarray(labels, dtype=np.uint16)
        if labels.shape != volume.array.shape[:3]:
            raise InvalidInputError(f"labels {labels.shape} are not on the volume grid {volume.array.shape[:3]}")
        body = p.body(p.TeachRequest, classes=dict(classes), prompt_network=prompt_network, epochs=epochs,
                      train_slices=train_slices, val_slices=val_slices, lr=lr, decoder_lr=decoder_lr, use_now=use_now,
                      name=name)
        check_bundle_destination(save_to, overwrite=True)
        self._call("PUT", self._session_path(p.LABELS), data=labels.tobytes(),
                   headers={"Content-Type": "application/octet-stream"})
        job = self._call("POST", self._session_path(p.TEACH), json=body).json()
        for state in self._follow(job, cancel):
            partial = state["partial"] or {}
            stage = state["state"] if state["state"] in ("done", "cancelled") else partial.get("stage", "prepare")
            event = TrainEvent(stage, state["done"], state["total"], message=state["message"],
                               losses=partial.get("losses") or {}, metrics=partial.get("metrics") or {})
            if state["state"] == "done":
                data = self._call("GET", p.JOB_BUNDLE.format(jid=job["id"])).content
                path = save_bytes_or_rescue(data, Path(save_to), name)
                if use_now:  # the session now runs the new bundle; a reconnect must open it again
                    self.classes = state["result"]["classes"]
                    self.model = dict(self.model, bundle=str(path), backbone=None)
                event = TrainEvent("done", state["done"], state["total"], message=state["message"],
                                   metrics=state["result"].get("validation") or {}, bundle_path=str(path))
            yield event
