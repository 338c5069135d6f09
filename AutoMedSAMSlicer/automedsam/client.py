"""Client of the inference worker, with the in-process engine's methods (numpy + requests only).

``RemoteEngine`` mirrors :class:`automedsam.engine.Engine`: ``set_volume``, ``segment`` (an iterator
of progress events whose last one carries the result), ``refine``, ``undo``, ``propagate``. The
user's masks live in the client (``RemoteEngine.masks``): after a worker crash, ``reconnect`` opens a
new session on the (restarted) worker and uploads the volume and every mask again.

Coordinates are the engine's: slice index k, points (i, j), boxes (i0, j0, i1, j1), masks KJI.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .errors import AutoMedSAMError, InvalidInputError
from .generators import DEFAULT_GENERATOR
from .service import PROTOCOL
from .service.codec import mask_from_json, pack_mask, unpack_mask
from .volume import Volume


class ServiceError(AutoMedSAMError):
    """The worker answered with an error (``code`` is the stable error code)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"worker error {status} ({code}): {message}")
        self.status, self.code, self.message = status, code, message


class ServiceUnavailableError(AutoMedSAMError):
    """The worker cannot be reached (not started, crashed, or another address)."""


class ProtocolMismatchError(AutoMedSAMError):
    """Client and worker speak different protocol versions."""


class RemoteEvent(dict):
    """A progress event: ``stage``, ``done``, ``total``, ``message``, ``partial``; the ``done`` event
    of ``segment`` also has ``masks`` (class -> (K, J, I) bool) and ``summary``."""

    @property
    def stage(self) -> str:
        return self["stage"]

    @property
    def fraction(self) -> float:
        return self["done"] / self["total"] if self.get("total") else 0.0


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
        self.masks: dict[str, np.ndarray] = {}
        self.session_id: str | None = None
        self.classes: list[dict] = []
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
            if code == "invalid_input" or code == "invalid_request":
                raise InvalidInputError(message)
            raise ServiceError(r.status_code, code, message)
        return r

    def check_protocol(self) -> dict:
        """``/health``; raises :class:`ProtocolMismatchError` naming what to upgrade."""
        health = self._call("GET", "/health", timeout=10).json()
        theirs = str(health.get("protocol"))
        if theirs != PROTOCOL:
            side = "the worker" if theirs < PROTOCOL else "this client (automedsam in Slicer or your script)"
            raise ProtocolMismatchError(
                f"the worker at {self.url} speaks protocol {theirs} (automedsam {health.get('version')}), this client "
                f"speaks {PROTOCOL}: upgrade {side} so both run the same automedsam version"
            )
        return health

    # ------------------------------------------------------------------------------ engine API
    def _ensure_session(self) -> str:
        if self.session_id is None:
            model = dict(self.model)
            if model.get("bundle"):
                model["bundle"] = self.upload_bundle(model["bundle"])
            body = self._call("POST", "/v1/sessions", json=model, timeout=max(self.timeout, 300)).json()
            self.session_id, self.classes = body["session_id"], body["classes"]
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
        reply = self._call("POST", "/v1/bundles", data=data, headers={"Content-Type": "application/octet-stream"},
                           timeout=max(self.timeout, 300))
        return reply.json()["bundle"]

    def open_session(self) -> list[dict]:
        """Open the session (loads the model on the worker) and return its classes."""
        self._ensure_session()
        return self.classes

    def set_volume(self, volume: Volume) -> None:
        """Upload a volume (raw bytes + geometry). Clears the client's masks."""
        sid = self._ensure_session()
        self._upload(sid, volume)
        self.volume, self.masks = volume, {}

    def _upload(self, sid: str, volume: Volume) -> None:
        array = np.ascontiguousarray(volume.array)
        if array.dtype == np.float16:
            array = array.astype(np.float32)
        meta = {"shape": list(array.shape), "dtype": str(array.dtype), "spacing": list(volume.spacing),
                "origin": list(volume.origin), "direction": volume.direction.reshape(-1).tolist(),
                "name": volume.name}
        self._call("PUT", f"/v1/sessions/{sid}/volume", data=array.tobytes(),
                   headers={"X-Volume-Meta": json.dumps(meta), "Content-Type": "application/octet-stream"},
                   timeout=max(self.timeout, 600))

    def _masks(self, name: str) -> np.ndarray:
        r = self._call("GET", f"/v1/sessions/{self.session_id}/masks/{name}")
        return unpack_mask(r.content, tuple(json.loads(r.headers["X-Shape"])))

    def _follow(self, job: dict, cancel=None) -> Iterator[RemoteEvent]:
        jid = job["id"]
        cancel_sent = False
        while True:
            if cancel is not None and cancel.is_set() and not cancel_sent:
                self._call("DELETE", f"/v1/jobs/{jid}")
                cancel_sent = True
            job = self._call("GET", f"/v1/jobs/{jid}").json()
            event = RemoteEvent(stage=job["state"], done=job["done"], total=job["total"], message=job["message"],
                                partial=job["partial"])
            if job["state"] == "failed":
                err = job["error"] or {}
                if err.get("code") == "invalid_input":
                    raise InvalidInputError(err.get("message", ""))
                raise ServiceError(500, err.get("code", "error"), err.get("message", "job failed"))
            if job["state"] in ("done", "cancelled"):
                event["summary"] = job["result"]
                yield event
                return
            yield event
            time.sleep(self.poll_s)

    def segment(self, classes: Sequence[str], slices: Sequence[int] | None = None, *, cleanup: str | None = None,
                cancel=None) -> Iterator[RemoteEvent]:
        """Like :meth:`Engine.segment`; the final ``done`` event carries ``masks``."""
        self._require_volume()
        job = self._call("POST", f"/v1/sessions/{self.session_id}/segment",
                         json={"classes": list(classes), "slices": list(slices) if slices is not None else None,
                               "cleanup": cleanup}).json()
        for event in self._follow(job, cancel):
            if event.stage == "done":
                event["masks"] = {name: self._masks(name) for name in classes}
                for name, m in event["masks"].items():
                    self.masks[self._canonical(name)] = m
            yield event

    def refine(self, class_name: str, slice_index: int, points=None, point_labels=None, box=None,
               mode: str | None = None, reset: bool = False) -> np.ndarray:
        """Like :meth:`Engine.refine`; returns the new ``(J, I)`` mask and updates ``masks``."""
        self._require_volume()
        body = {"class_name": class_name, "slice_index": int(slice_index),
                "points": None if points is None else np.asarray(points, float).tolist(),
                "point_labels": None if point_labels is None else np.asarray(point_labels, int).tolist(),
                "box": None if box is None else np.asarray(box, float).tolist(), "mode": mode, "reset": bool(reset)}
        mask = mask_from_json(self._call("POST", f"/v1/sessions/{self.session_id}/refine", json=body).json()["mask"])
        self._local(class_name)[int(slice_index)] = mask
        return mask

    def undo(self, class_name: str) -> list[int] | None:
        slices = self._call("POST", f"/v1/sessions/{self.session_id}/undo", json={"class_name": class_name}).json()
        if slices["slices"] is not None:
            self.masks[self._canonical(class_name)] = self._masks(class_name)
        return slices["slices"]

    def propagate(self, class_name: str, from_slice: int, direction: str = "both", max_slices: int | None = None,
                  cancel=None) -> Iterator[RemoteEvent]:
        job = self._call("POST", f"/v1/sessions/{self.session_id}/propagate",
                         json={"class_name": class_name, "from_slice": int(from_slice), "direction": direction,
                               "max_slices": max_slices}).json()
        for event in self._follow(job, cancel):
            if event.stage == "done":
                self.masks[self._canonical(class_name)] = self._masks(class_name)
            yield event

    def train(self, labels: np.ndarray, classes: dict[str, int], *, generator: str = DEFAULT_GENERATOR,
              epochs: int = 40, train_slices: str | None = None, val_slices: str | None = "0::3",
              lr: float | None = None, decoder_lr: float = 1e-5, use_now: bool = True,
              cancel=None) -> Iterator[RemoteEvent]:
        """Teach classes from ``labels`` (``(K, J, I)`` label values on the uploaded volume's grid).

        Events carry epoch progress and ``partial`` losses/metrics; the final ``done`` event has
        ``bundle`` (the zip's bytes) and the summary's ``validation``. With ``use_now`` the session
        segments with the new bundle from then on.
        """
        self._require_volume()
        labels = np.ascontiguousarray(labels, dtype=np.uint16)
        if labels.shape != self.volume.array.shape[:3]:
            raise InvalidInputError(f"labels {labels.shape} are not on the volume grid {self.volume.array.shape[:3]}")
        self._call("PUT", f"/v1/sessions/{self.session_id}/labels", data=labels.tobytes(),
                   headers={"Content-Type": "application/octet-stream"})
        body = {"classes": classes, "generator": generator, "epochs": epochs, "train_slices": train_slices,
                "val_slices": val_slices, "lr": lr, "decoder_lr": decoder_lr, "use_now": use_now}
        job = self._call("POST", f"/v1/sessions/{self.session_id}/train", json=body).json()
        for event in self._follow(job, cancel):
            if event.stage == "done":
                event["bundle"] = self._call("GET", f"/v1/jobs/{job['id']}/bundle").content
                if use_now:  # the session now runs the new bundle; a reconnect must open it again
                    self.classes = event["summary"]["classes"]
                    self.model = dict(self.model, bundle=event["summary"]["bundle"], backbone=None)
            yield event

    def set_masks(self, class_name: str, masks: np.ndarray) -> None:
        """Like :meth:`Engine.set_masks`: replace the worker's masks of a class."""
        self._require_volume()
        masks = np.asarray(masks, dtype=bool)
        if masks.shape != self.volume.array.shape[:3]:
            raise InvalidInputError(f"masks {masks.shape} are not on the volume grid {self.volume.array.shape[:3]}")
        self._call("PUT", f"/v1/sessions/{self.session_id}/masks/{class_name}", data=pack_mask(masks),
                   headers={"Content-Type": "application/octet-stream"})
        self.masks[self._canonical(class_name)] = masks.copy()

    def info(self) -> dict:
        """The worker's ``/v1/info``: protocol, version, device and GPU (name, free/total MB) or None."""
        return self._call("GET", "/v1/info", timeout=10).json()

    def reconnect(self) -> None:
        """After a worker restart: new session, the same volume and the client's masks re-uploaded."""
        self.check_protocol()
        self.session_id = None
        sid = self._ensure_session()
        if self.volume is not None:
            self._upload(sid, self.volume)
            for name, masks in self.masks.items():
                self._call("PUT", f"/v1/sessions/{sid}/masks/{name}", data=pack_mask(masks),
                           headers={"Content-Type": "application/octet-stream"})

    def close(self) -> None:
        if self.session_id is not None:
            with contextlib.suppress(ServiceError, ServiceUnavailableError):
                self._call("DELETE", f"/v1/sessions/{self.session_id}", timeout=5)
        self.session_id = None

    # ---------------------------------------------------------------------------- helpers
    def _require_volume(self) -> None:
        if self.volume is None or self.session_id is None:
            raise InvalidInputError("no volume set: call set_volume(volume) first")

    def _canonical(self, name: str) -> str:
        """The session's spelling of a class name, resolved like the engine does (case, spaces and
        aliases); names the session does not know are kept as given (the worker refuses them)."""
        from .classes import ClassCatalog, ClassInfo

        catalog = ClassCatalog([ClassInfo.from_dict(c) for c in self.classes])
        return catalog.get(name).name if name in catalog else name

    def _local(self, class_name: str) -> np.ndarray:
        name = self._canonical(class_name)
        if name not in self.masks:
            self.masks[name] = np.zeros(self.volume.array.shape[:3], bool)
        return self.masks[name]
